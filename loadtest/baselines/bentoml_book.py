"""Baseline (a): BentoML by the book: one service, one batchable API doing decode + ORT in one process.

    bentoml serve loadtest.baselines.bentoml_book:Lenet5Batched --port 8000

What BentoML's adaptive-batching guide shows: a ``@bentoml.service`` whose batchable ``@bentoml.api`` takes
a list of inputs and returns a list of outputs; BentoML's adaptive batcher merges concurrent requests'
lists into one call (up to 32 items, 500 ms latency bound like nnserve's default). Decoding happens inside
that call, in the same worker as ORT, one thread for the service (ORT gets every core).

A batchable API takes exactly one argument (BentoML 1.4 raises otherwise), so this endpoint has no
``top_k`` field: it answers the top 5, what the bench asks of every server. The request is still the same
multipart ``image`` upload; the answer is the batch's slice for it, a one-item list ``[{model,
predictions}]``.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np

from loadtest.baselines.common import StoreModel, ort_threads


@bentoml.service(workers=1, threads=1)
class Lenet5Batched:
    def __init__(self) -> None:
        self.model = StoreModel.load("lenet5", ort_threads(1))

    @bentoml.api(route="/classify", batchable=True, max_batch_size=32, max_latency_ms=500)
    def classify(self, image: list[Path]) -> list[dict]:
        x = np.stack([self.model.decode(path.read_bytes()) for path in image])
        return [self.model.top_k(logits) for logits in self.model.run(x, output="logits")]
