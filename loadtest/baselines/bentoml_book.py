"""Baseline: BentoML by the book, as its docs show: one ``@bentoml.service`` with ``workers`` processes
(BentoML's guidance: one per CPU core for CPU-bound work), decode + ORT in the API, and with batching on
the adaptive-batching guide's batchable API (a list in, a list out; BentoML merges concurrent requests'
lists into one call of up to ``max_batch_size`` items, ``max_latency_ms`` 500 as nnserve's scale).

    BASELINE_WORKERS=2 BASELINE_MAX_BATCH=32 bentoml serve loadtest.baselines.bentoml_book:Lenet5 --port 8000

A batchable API takes exactly one argument (BentoML 1.4 raises otherwise), so this endpoint has no
``top_k`` field: it answers the top 5, what the bench asks of every server. The request is the same
multipart ``image`` upload; the batched answer is the batch's slice for it, a one-item list ``[{model,
predictions}]``. Access log off (as nnserve ships; it can only make BentoML faster).
"""

from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np

from loadtest.baselines.common import StoreModel, knob, ort_threads

WORKERS, MAX_BATCH = int(knob("WORKERS", 1)), int(knob("MAX_BATCH", 0))


@bentoml.service(workers=WORKERS, logging={"access": {"enabled": False}})
class Lenet5:
    def __init__(self) -> None:
        self.model = StoreModel.load("lenet5", ort_threads(WORKERS))

    if MAX_BATCH > 1:
        @bentoml.api(route="/classify", batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=500)
        def classify(self, image: list[Path]) -> list[dict]:
            x = np.stack([self.model.decode(path.read_bytes()) for path in image])
            return [self.model.top_k(logits) for logits in self.model.run(x, output="logits")]
    else:
        @bentoml.api(route="/classify")
        def classify(self, image: Path) -> dict:
            return self.model.top_k(self.model.run(self.model.decode(image.read_bytes())[None], output="logits")[0])
