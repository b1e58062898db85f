"""Baseline (b): LitServe 0.2.x with its own batching (max_batch_size 32, batch_timeout 5 ms).

    python -m loadtest.baselines.litserve_server --port 8000

LitServe by the book: a ``LitAPI`` whose ``decode_request`` / ``predict`` / ``encode_response`` run in
LitServe's inference worker process; its batcher gathers up to 32 decoded requests or waits 5 ms, and
``predict`` makes one ORT call for the batch. One inference worker (CPU) with ORT on every core, one API
server process in front of it (LitServe's default).
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np

from loadtest.baselines.common import StoreModel, ort_threads

MAX_BATCH_SIZE, BATCH_TIMEOUT_S = 32, 0.005


class Lenet5API(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = StoreModel.load("lenet5", ort_threads(1))

    def decode_request(self, request) -> tuple[np.ndarray, int]:
        # A multipart request arrives as starlette FormData (LitServe reads the form for us).
        return self.model.decode(request["image"].file.read()), int(request.get("top_k", 5))

    def batch(self, inputs: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, list[int]]:
        return np.stack([x for x, _ in inputs]), [k for _, k in inputs]

    def predict(self, batch: tuple[np.ndarray, list[int]]) -> list[tuple[np.ndarray, int]]:
        x, ks = batch
        return list(zip(self.model.run(x, output="logits"), ks, strict=True))

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: tuple[np.ndarray, int]) -> dict:
        logits, k = output
        return self.model.top_k(logits, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api = Lenet5API(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
