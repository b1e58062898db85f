"""The dynamic batcher's queue policy through the real server: a full queue answers 503 with
Retry-After at once, and a request far larger than max_batch_size runs (split and reassembled) and
leaves nothing behind for the small requests after it.

Its own server (one worker, a queue of one request, a 1.5 s batching delay) so that two concurrent
requests deterministically meet a full queue: the first waits out the delay, the second finds no room.
The same server admits 3 requests in progress (NNSERVE_MAX_CONCURRENT_REQUESTS): three uploads left
half-sent hold them, and the next is refused at the front door while health and GET /models answer."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from service import images

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(own_server):
    env = {"NNSERVE_WORKERS": "1", "NNSERVE_MAX_QUEUE_SIZE": "1", "NNSERVE_MAX_QUEUE_DELAY_MS": "1500",
           "NNSERVE_QUEUE_TIMEOUT_MS": "30000", "NNSERVE_MAX_CONCURRENT_REQUESTS": "3"}
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
        # Whichever request reaches the queue first waits out the 1.5 s delay; the other finds it full.
        while not first.done():
            second = infer(server.http_url, 1)
            if second.status_code == 503:
                break
    answers = {r.status_code: r for r in (first.result(), second)}
    assert sorted(answers) == [200, 503], ([(r.status_code, r.text) for r in answers.values()], server.log())
    refused = answers[503]
    assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1
    assert "NNSERVE_MAX_QUEUE_SIZE" in refused.json()["error"]


def test_a_request_larger_than_max_batch_size_runs_and_small_ones_follow(server):
    big = infer(server.http_url, 1000)  # 32 chunks of at most 32 items
    assert big.status_code == 200, big.text
    length = int(big.headers["inference-header-content-length"])
    logits = np.frombuffer(big.content[length:], dtype=np.float32)
    assert logits.size == 1000 * 10
    small = infer(server.http_url, 1)
    assert small.status_code == 200, small.text


def half_sent_upload(url: str) -> socket.socket:
    """A /classify request whose body never finishes: it holds one request slot until the socket closes."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\n")
    return sock


def test_past_the_concurrency_limit_requests_are_refused_but_health_answers(server):
    png_bytes = images.blank_png(28)
    url = server.http_url
    holders = [half_sent_upload(url) for _ in range(3)]
    try:
        deadline = time.monotonic() + 60  # the holders reach the app in the background: poll (liveness only)
        while True:
            refused = requests.post(f"{url}/classify", files={"image": ("d.png", png_bytes, "image/png")}, timeout=30)
            if refused.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused.status_code == 503, (refused.status_code, refused.text)
        assert "NNSERVE_MAX_CONCURRENT_REQUESTS" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        assert requests.get(f"{url}/livez", timeout=10).status_code == 200
        ready = requests.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
        assert requests.get(f"{url}/models", timeout=10).status_code == 200
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert 'nnserve_http_responses_total{code="503",route="classify"}' in metrics
    finally:
        for sock in holders:
            sock.close()
    deadline = time.monotonic() + 60
    while True:  # the closed uploads free their slots once the server notices the disconnects
        answer = requests.post(f"{url}/classify", files={"image": ("d.png", png_bytes, "image/png")}, timeout=30)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert answer.status_code == 200, answer.text


def test_grpc_listens_on_the_http_host_only(server):
    import psutil

    # start_server runs `bentoml serve --host 127.0.0.1`; gRPC must not listen on every interface.
    workers = psutil.Process(server.process.pid).children(recursive=True)
    addresses = {c.laddr.ip.removeprefix("::ffff:") for w in workers for c in w.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.grpc_port}
    assert addresses == {"127.0.0.1"}, addresses  # (gRPC may bind it as the IPv4-mapped ::ffff:127.0.0.1)
