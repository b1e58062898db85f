"""Baseline (c): plain FastAPI + ONNX Runtime, no batching: one ORT call per request.

    BASELINE_ORT_THREADS=1 uvicorn loadtest.baselines.fastapi_app:app --workers 2 --port 8000

How a FastAPI model server is commonly written: sync endpoints (FastAPI runs them in its thread pool, ORT
releases the GIL), the models loaded once per worker process, several uvicorn workers for the cores.
``/classify`` (lenet5) answers like nnserve's; ``/features`` (vgg_fc7) returns the fc7 vector as JSON or,
with ``format=npy``, as .npy bytes (what the bench asks of both servers).
"""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, Response

from loadtest.baselines.common import StoreModel, ort_threads

WORKERS = 2  # the launcher starts uvicorn with --workers 2; ORT threads = cores / workers
THREADS = ort_threads(WORKERS)
LENET5 = StoreModel.load("lenet5", THREADS)
VGG_FC7 = StoreModel.load("vgg_fc7", THREADS)

app = FastAPI(title="baseline: FastAPI + ORT, no batching")


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/classify")
def classify(image: Annotated[bytes, File()], top_k: Annotated[int, Form()] = 5) -> dict:
    logits = LENET5.run(LENET5.decode(image)[None], output="logits")
    return LENET5.top_k(logits[0], top_k)


@app.post("/features")
def features(image: Annotated[bytes, File()], format: Annotated[str, Form()] = "json") -> Response:
    vector = VGG_FC7.run(VGG_FC7.decode(image)[None], output="fc7")[0].astype(np.float32)
    if format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, vector)
        return Response(buffer.getvalue(), media_type="application/x-npy")
    return Response(f'{{"dim": {vector.size}, "features": [{", ".join(map(str, vector.tolist()))}]}}',
                    media_type="application/json")
