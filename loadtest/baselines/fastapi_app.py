"""Baseline (c): plain FastAPI + ONNX Runtime, no batching: one ORT call per request.

    BASELINE_WORKERS=2 uvicorn loadtest.baselines.fastapi_app:app --workers 2 --no-access-log --port 8000
    BASELINE_CLASSIFY_MODEL=effnet_b0 BASELINE_FEATURES_MODEL= uvicorn loadtest.baselines.fastapi_app:app ...

How a FastAPI model server is commonly written: sync endpoints (FastAPI runs them in its thread pool, ORT
releases the GIL), the models loaded once per worker process, several uvicorn workers for the cores.
``/classify`` answers like nnserve's; ``/features`` returns the feature vector as JSON or, with
``format=npy``, as .npy bytes (what the bench asks of both servers).

Which store models: ``BASELINE_CLASSIFY_MODEL`` (default lenet5) for ``/classify``, ``BASELINE_FEATURES_MODEL``
(default vgg_fc7; empty: no ``/features`` route) for ``/features``, each pinned by ``BASELINE_<NAME>_TAG``
(common.py). Unknown form fields (nnserve's ``model``) are ignored, so the bench sends both servers the same
bytes.
"""

from __future__ import annotations

import io
import os
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, Response

from loadtest.baselines.common import StoreModel, knob, ort_threads, output_name, served_models

WORKERS = int(knob("WORKERS", 2))  # uvicorn --workers (the launcher sets both); ORT threads = cores / workers

THREADS = ort_threads(WORKERS)
CLASSIFY_MODEL, FEATURES_MODEL = served_models(os.environ)
CLASSIFIER = StoreModel.load(CLASSIFY_MODEL, THREADS)
SCORES = output_name(CLASSIFIER, "scores", "logits")

app = FastAPI(title="baseline: FastAPI + ORT, no batching")


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/classify")
def classify(image: Annotated[bytes, File()], top_k: Annotated[int, Form()] = 5) -> dict:
    logits = CLASSIFIER.run(CLASSIFIER.decode(image)[None], output=SCORES)
    return CLASSIFIER.top_k(logits[0], top_k)


if FEATURES_MODEL:  # the route exists only when a model serves it: a missing one would answer 500s
    EXTRACTOR = StoreModel.load(FEATURES_MODEL, THREADS)
    FEATURES = output_name(EXTRACTOR, "features", "fc7")

    @app.post("/features")
    def features(image: Annotated[bytes, File()], format: Annotated[str, Form()] = "json") -> Response:
        vector = EXTRACTOR.run(EXTRACTOR.decode(image)[None], output=FEATURES)[0].astype(np.float32)
        if format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, vector)
            return Response(buffer.getvalue(), media_type="application/x-npy")
        return Response(f'{{"dim": {vector.size}, "features": [{", ".join(map(str, vector.tolist()))}]}}',
                        media_type="application/json")
