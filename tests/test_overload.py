"""The dynamic batcher's queue policy through the real server: a full queue answers 503 with
Retry-After at once, and a request far larger than max_batch_size runs (split and reassembled) and
leaves nothing behind for the small requests after it.

Its own server (one worker, a queue of one request, a 1.5 s batching delay) so that two concurrent
requests deterministically meet a full queue: the first waits out the delay, the second finds no room."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(own_server):
    env = {"NNSERVE_WORKERS": "1", "NNSERVE_MAX_QUEUE_SIZE": "1", "NNSERVE_MAX_QUEUE_DELAY_MS": "1500",
           "NNSERVE_QUEUE_TIMEOUT_MS": "30000"}
    with own_server("overload", env) as live:
        yield live


def infer(url: str, batch: int) -> requests.Response:
    x = np.random.default_rng(batch).normal(size=(batch, 1, 32, 32)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    header = json.dumps(body).encode()
    return requests.post(f"{url}/v2/models/lenet5/infer", data=header + x.tobytes(), timeout=120,
                         headers={"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"})


def test_a_full_queue_answers_503_with_retry_after(server):
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(infer, server.http_url, 1)
        responses = [first]
        # The first request now waits out the 1.5 s delay in the queue; the next ones find it full.
        while not first.done():
            second = infer(server.http_url, 1)
            if second.status_code == 503:
                break
        responses.append(first.result())
    assert first.result().status_code == 200, first.result().text
    assert second.status_code == 503, (second.status_code, second.text, server.log())
    assert second.headers["retry-after"].isdigit() and int(second.headers["retry-after"]) >= 1
    assert "NNSERVE_MAX_QUEUE_SIZE" in second.json()["error"]


def test_a_request_larger_than_max_batch_size_runs_and_small_ones_follow(server):
    big = infer(server.http_url, 1000)  # 32 chunks of at most 32 items
    assert big.status_code == 200, big.text
    length = int(big.headers["inference-header-content-length"])
    logits = np.frombuffer(big.content[length:], dtype=np.float32)
    assert logits.size == 1000 * 10
    small = infer(server.http_url, 1)
    assert small.status_code == 200, small.text
