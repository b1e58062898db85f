"""The rows of part 2 (run by compare.py) and of other parts: the same requests against one server under wrk.

``/classify`` (lenet5, PNG upload) on nnserve and each peer; ``/features`` (vgg_fc7, npy answer) on
nnserve and every peer with such a route; KServe v2 ``/v2/models/lenet5/infer`` (JSON tensor) on nnserve
and MLServer, and with Triton's binary tensor extension (the body tritonclient.http sends, the scores
output asked as binary) on nnserve and Triton. Each at every ``--connections`` level (closed loop), after
one checked request: the answer's top label must be the same on every server (same model, same
preprocessing), else the comparison would be meaningless.

An endpoint is the URL path, plus `` (binary)`` for the binary-tensor rows (same path as the JSON rows).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.bench.common import log
from loadtest.bench.promscrape import batch_histogram, scrape
from loadtest.bench.wrk import HEADER_LENGTH, RequestFiles, WrkResult, multipart_body, run_wrk

NNSERVE = "nnserve"
PREVIOUS = "previous"  # nnserve as of another commit (--previous REF), on the same model store
BINARY = " (binary)"


def v2_binary(model: str) -> str:
    """The endpoint of ``model``'s KServe v2 rows in Triton's binary tensor extension."""
    return f"/v2/models/{model}/infer{BINARY}"


def route(endpoint: str) -> str:
    """The URL path of an endpoint."""
    return endpoint.removesuffix(BINARY)


CLASSIFY, FEATURES, V2 = "/classify", "/features", "/v2/models/lenet5/infer"
V2_BINARY = v2_binary("lenet5")  # = launch.BASELINES["triton"]'s route
BATCHED_MODEL = {CLASSIFY: "lenet5", FEATURES: "vgg_fc7", V2: "lenet5", V2_BINARY: "lenet5"}  # nnserve's batcher


@dataclass
class StackRun:
    server: str  # nnserve or a baseline name
    endpoint: str
    result: WrkResult
    mean_batch: float = float("nan")  # nnserve only, from /metrics
    batches: str = ""
    round_no: int = 0  # the interleaved round (1, 2, ...); 0: the sweep, or a part without rounds
    config: str = ""  # the server's configuration (compare.Unit.describe)
    load: str = ""  # load average (1/5/15 min) just before the row
    cpu_ms_per_request: float = float("nan")  # the server processes' CPU time over the row / requests


def top_label(answer: Any) -> str:
    """The first prediction's label, from nnserve's ``{"predictions": [...]}`` or a one-item list of it
    (BentoML's batchable API answers the request's slice of the batch)."""
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    return answer["predictions"][0]["label"]


def check_answer(url: str, endpoint: str, files: RequestFiles) -> str:
    """One request of the kind wrk will send; what it answered (the top label, or the feature size)."""
    fields = {"format": "npy"} if endpoint == FEATURES else (files.classify_fields if endpoint == CLASSIFY else {})
    headers = {}
    if endpoint.endswith(BINARY):
        if files.v2_binary is None:
            raise ValueError("these request files have no binary KServe v2 body")
        body, content_type = files.v2_binary.read_bytes(), "application/octet-stream"
        headers = {HEADER_LENGTH: str(files.v2_binary_json_size)}
    elif endpoint == V2:
        if files.v2_json is None:
            raise ValueError("these request files have no KServe v2 body")
        body, content_type = files.v2_json.read_bytes(), "application/json"
    else:
        body, content_type = multipart_body(files.png.read_bytes(), fields)
    request = urllib.request.Request(url + route(endpoint), data=body, headers={"Content-Type": content_type,
                                                                               **headers})
    with urllib.request.urlopen(request, timeout=60) as response:
        data = response.read()
        json_size = response.headers.get(HEADER_LENGTH)
    if endpoint == FEATURES:
        return f"{len(data)}-byte npy vector"
    if endpoint.endswith(BINARY):
        return binary_answer(data, json_size)
    if endpoint == V2:
        outputs = {o["name"]: o for o in json.loads(data)["outputs"]}
        logits = outputs["logits"]["data"]
        return f"class index {max(range(len(logits)), key=logits.__getitem__)}"
    return f"label {top_label(json.loads(data))}"


def binary_answer(data: bytes, json_size: str | None) -> str:
    """A binary-extension answer in words: its first output's argmax (scores) or size (features)."""
    import tritonclient.http as http

    result = http.InferenceServerClient.parse_response_body(data, header_length=int(json_size) if json_size else None)
    output = result.get_response()["outputs"][0]
    values = result.as_numpy(output["name"])
    if values is None:
        raise ValueError(f"binary answer without tensor data: {result.get_response()}")
    return f"{output['name']} {list(values.shape)}, argmax {int(np.argmax(values[0]))}"


def wrk_args(endpoint: str, files: RequestFiles) -> list[str]:
    if endpoint.endswith(BINARY):
        return files.v2_binary_args()
    return {CLASSIFY: files.classify_args, FEATURES: files.features_args, V2: files.v2_args}[endpoint]()


def measure(server: str, url: str, endpoints: tuple[str, ...], files: RequestFiles, connections: list[int],
            seconds: float, metrics: bool = False, model: str | None = None) -> tuple[list[StackRun], dict[str, str]]:
    """Every endpoint at every concurrency level; ``metrics``: nnserve's batch histograms too, of ``model``
    (default: the model each endpoint's requests go to in the main rows, BATCHED_MODEL)."""
    runs, answers = [], {}
    for endpoint in endpoints:
        answers[endpoint] = check_answer(url, endpoint, files)
        for c in connections:
            before = scrape(url) if metrics else {}
            result = run_wrk(url + route(endpoint), wrk_args(endpoint, files), c, seconds)
            run = StackRun(server, endpoint, result)
            if metrics:
                hist = batch_histogram(before, scrape(url), model or BATCHED_MODEL[endpoint], "dynamic")
                run.mean_batch, run.batches = hist.mean, hist.describe()
            log(f"  {server:9s} {endpoint:24s} c={c:<3d} {result.rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                f"p95 {result.p95_ms:7.2f}  p99 {result.p99_ms:7.2f}  errors {result.errors}"
                + (f"  mean batch {run.mean_batch:.2f}" if metrics else ""))
            runs.append(run)
    return runs, answers
