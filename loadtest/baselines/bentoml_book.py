"""Baseline: BentoML by the book, as its docs show: one ``@bentoml.service`` with ``workers`` processes
(BentoML's guidance: one per CPU core for CPU-bound work), decode + ORT in the API, and with batching on
the adaptive-batching guide's batchable API (a list in, a list out; BentoML merges concurrent requests'
lists into one call of up to ``max_batch_size`` items, ``max_latency_ms`` 500 as nnserve's scale).

    BASELINE_WORKERS=2 BASELINE_MAX_BATCH=32 bentoml serve loadtest.baselines.bentoml_book:Lenet5 --port 8000

A batchable API takes exactly one argument (BentoML 1.4 raises otherwise), so this endpoint has no
``top_k`` field: it answers the top 5, what the bench asks of every server. The request is the same
multipart ``image`` upload; the batched answer is the batch's slice for it, a one-item list ``[{model,
predictions}]``. Access log off (as nnserve ships; it can only make BentoML faster).

``/classify`` serves ``BASELINE_CLASSIFY_MODEL`` (default lenet5) and ``/features`` ``BASELINE_FEATURES_MODEL``
(default vgg_fc7; empty: no route), batched alike. ``/features`` answers JSON (``{"dim", "features"}``, a
one-item list when batched): a BentoML API returns one serialized value per item, not the .npy bytes the
bench asks of the other servers, so this row carries a JSON encoding the others do not.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np

from loadtest.baselines.common import StoreModel, knob, ort_threads, output_name, served_models

WORKERS, MAX_BATCH = int(knob("WORKERS", 1)), int(knob("MAX_BATCH", 0))
CLASSIFY_MODEL, FEATURES_MODEL = served_models(os.environ)


def features_answer(vector: np.ndarray) -> dict:
    return {"dim": int(vector.size), "features": vector.astype(np.float32).tolist()}


@bentoml.service(workers=WORKERS, logging={"access": {"enabled": False}})
class Lenet5:
    def __init__(self) -> None:
        self.model = StoreModel.load(CLASSIFY_MODEL, ort_threads(WORKERS))
        self.scores = output_name(self.model, "scores", "logits")
        if FEATURES_MODEL:
            self.extractor = StoreModel.load(FEATURES_MODEL, ort_threads(WORKERS))
            self.features_output = output_name(self.extractor, "features", "fc7")

    if MAX_BATCH > 1:
        @bentoml.api(route="/classify", batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=500)
        def classify(self, image: list[Path]) -> list[dict]:
            x = np.stack([self.model.decode(path.read_bytes()) for path in image])
            return [self.model.top_k(logits) for logits in self.model.run(x, output=self.scores)]
    else:
        @bentoml.api(route="/classify")
        def classify(self, image: Path) -> dict:
            return self.model.top_k(self.model.run(self.model.decode(image.read_bytes())[None], output=self.scores)[0])

    if FEATURES_MODEL and MAX_BATCH > 1:
        @bentoml.api(route="/features", batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=500)
        def features(self, image: list[Path]) -> list[dict]:
            x = np.stack([self.extractor.decode(path.read_bytes()) for path in image])
            return [features_answer(v) for v in self.extractor.run(x, output=self.features_output)]
    elif FEATURES_MODEL:
        @bentoml.api(route="/features")
        def features(self, image: Path) -> dict:
            x = self.extractor.decode(image.read_bytes())[None]
            return features_answer(self.extractor.run(x, output=self.features_output)[0])
