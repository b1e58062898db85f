"""Baseline: LitServe 0.2.x, as its docs advise: a ``LitAPI`` whose ``decode_request`` / ``predict`` /
``encode_response`` run in LitServe's inference worker processes, ``workers_per_device`` of them on the CPU
(one API server process per inference worker, LitServe's default), and its batcher when
``max_batch_size`` > 1 (up to that many decoded requests, or ``batch_timeout`` seconds), one ORT call per
batch. Log level "warning", which LitServe's docs call good for production (no access log lines).

    python -m loadtest.baselines.litserve_server --port 8000 --workers 2 --max-batch-size 32 --wait-ms 1
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np

from loadtest.baselines.common import StoreModel, knob, ort_threads


class Lenet5API(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = StoreModel.load("lenet5", ort_threads(int(knob("WORKERS", 1))))

    def decode_request(self, request) -> tuple[np.ndarray, int]:
        # A multipart request arrives as starlette FormData (LitServe reads the form for us).
        return self.model.decode(request["image"].file.read()), int(request.get("top_k", 5))

    def batch(self, inputs: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, list[int]]:
        return np.stack([x for x, _ in inputs]), [k for _, k in inputs]

    def predict(self, batch):
        if isinstance(batch, tuple) and isinstance(batch[1], list):  # batched: (stacked inputs, top_ks)
            x, ks = batch
            return list(zip(self.model.run(x, output="logits"), ks, strict=True))
        x, k = batch
        return self.model.run(x[None], output="logits")[0], k

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: tuple[np.ndarray, int]) -> dict:
        logits, k = output
        return self.model.top_k(logits, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=int(knob("WORKERS", 1)), help="workers_per_device")
    parser.add_argument("--max-batch-size", type=int, default=int(knob("MAX_BATCH", 0)), help="0 or 1: no batching")
    parser.add_argument("--wait-ms", type=float, default=knob("WAIT_MS", 0), help="batch_timeout in ms")
    args = parser.parse_args()
    batching = {"max_batch_size": args.max_batch_size, "batch_timeout": args.wait_ms / 1000} \
        if args.max_batch_size > 1 else {}
    api = Lenet5API(api_path="/classify", **batching)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
