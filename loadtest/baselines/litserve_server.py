"""Baseline: LitServe 0.2.x, as its docs advise: a ``LitAPI`` whose ``decode_request`` / ``predict`` /
``encode_response`` run in LitServe's inference worker processes, ``workers_per_device`` of them on the CPU
(one API server process per inference worker, LitServe's default), and its batcher when
``max_batch_size`` > 1 (up to that many decoded requests, or ``batch_timeout`` seconds), one ORT call per
batch. Log level "warning", which LitServe's docs call good for production (no access log lines).

Two LitAPIs on one LitServer (LitServe's multiple endpoints): ``/classify`` (``BASELINE_CLASSIFY_MODEL``,
default lenet5, top-k JSON) and ``/features`` (``BASELINE_FEATURES_MODEL``, default vgg_fc7; empty: no
route), the feature vector as .npy bytes with ``format=npy`` (what the bench asks of every server), else
JSON; both batched alike.

    python -m loadtest.baselines.litserve_server --port 8000 --workers 2 --max-batch-size 32 --wait-ms 1
"""

from __future__ import annotations

import argparse
import io
import os

import litserve as ls
import numpy as np
from starlette.responses import Response

from loadtest.baselines.common import StoreModel, knob, ort_threads, output_name, served_models


class ClassifyAPI(ls.LitAPI):
    """/classify: the request's top-k answer; ``self.output`` is the scores tensor."""

    role, default_output = "scores", "logits"

    def __init__(self, model_name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name

    def setup(self, device: str) -> None:
        self.model = StoreModel.load(self.model_name, ort_threads(int(knob("WORKERS", 1))))
        self.output = output_name(self.model, self.role, self.default_output)

    def request_option(self, request) -> int:
        return int(request.get("top_k", 5))

    def decode_request(self, request) -> tuple[np.ndarray, int]:
        # A multipart request arrives as starlette FormData (LitServe reads the form for us).
        return self.model.decode(request["image"].file.read()), self.request_option(request)

    def batch(self, inputs: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, list[int]]:
        return np.stack([x for x, _ in inputs]), [k for _, k in inputs]

    def predict(self, batch):
        if isinstance(batch, tuple) and isinstance(batch[1], list):  # batched: (stacked inputs, top_ks)
            x, ks = batch
            return list(zip(self.model.run(x, output=self.output), ks, strict=True))
        x, k = batch
        return self.model.run(x[None], output=self.output)[0], k

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: tuple[np.ndarray, int]) -> dict:
        logits, k = output
        return self.model.top_k(logits, k)


class FeaturesAPI(ClassifyAPI):
    """/features: the feature vector, .npy bytes for ``format=npy`` (option 1), else JSON (option 0)."""

    role, default_output = "features", "fc7"

    def request_option(self, request) -> int:
        return int(request.get("format", "json") == "npy")

    def encode_response(self, output: tuple[np.ndarray, int]):
        vector, npy = output
        vector = vector.astype(np.float32)
        if npy:
            buffer = io.BytesIO()
            np.save(buffer, vector)
            return Response(buffer.getvalue(), media_type="application/x-npy")
        return {"dim": int(vector.size), "features": vector.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=int(knob("WORKERS", 1)), help="workers_per_device")
    parser.add_argument("--max-batch-size", type=int, default=int(knob("MAX_BATCH", 0)), help="0 or 1: no batching")
    parser.add_argument("--wait-ms", type=float, default=knob("WAIT_MS", 0), help="batch_timeout in ms")
    args = parser.parse_args()
    batching = {"max_batch_size": args.max_batch_size, "batch_timeout": args.wait_ms / 1000} \
        if args.max_batch_size > 1 else {}
    classify_model, features_model = served_models(os.environ)
    apis: list[ls.LitAPI] = [ClassifyAPI(classify_model, api_path="/classify", **batching)]
    if features_model:
        apis.append(FeaturesAPI(features_model, api_path="/features", **batching))
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
