"""Locust load test of nnserve with latency budgets.

    locust -f loadtest/locustfile.py --headless -u 5 -r 5 -t 60s --host http://127.0.0.1:3000
    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 20s --host ... ClassifyUser   # one endpoint

One user class per endpoint (equal weights, so ``-u 5`` runs one of each): ``/classify`` (multipart PNG
of a real held-out MNIST digit), ``/features`` (npy), ``/generate`` plain and streamed, and KServe v2
``/v2/models/lenet5/infer`` (binary tensors). Users run a closed loop (no wait): ``-u N`` keeps N
requests in flight. Every response is checked (status, shape, length); a wrong one counts as a failure.

What the requests need (labels, preprocessing, tensor names and shapes) is read from the server
(``GET /models``, ``GET /v2/models/<name>``) at test start, never hard-coded. At the end every endpoint
is checked against its latency and error-rate budget (``--budgets``, default loadtest/budgets.json,
``none`` to skip): the run exits 1 and names each endpoint over budget.
"""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import gevent
import numpy as np
import tritonclient.http as triton_http
from locust import FastHttpUser, constant, events, task

from harness.data import held_out_digits, png_bytes, prompts, served_vocab
from models.preprocess import preprocess_uint8

log = logging.getLogger("nnserve.loadtest")

DEFAULT_BUDGETS = Path(__file__).with_name("budgets.json")
PERCENTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}
CLASSIFY_MODEL, FEATURES_MODEL, GENERATE_MODEL, KSERVE_MODEL = "lenet5", "vgg_fc7", "char_lstm", "lenet5"
KSERVE_BODIES = 64  # pre-encoded v2 requests: encoding per request would load the (shared) CPU we measure


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    parser.add_argument("--budgets", default=str(DEFAULT_BUDGETS),
                        help="JSON latency/error budgets per endpoint, or 'none' to skip the check")
    parser.add_argument("--generate-chars", type=int, default=100, help="max_new_chars of each /generate")


@dataclass
class Workload:
    """Everything users send: local inputs (digits, prompts) shaped by the server's description of its models."""

    pngs: list[bytes]
    labels: set[str]  # of the /classify model
    feature_dim: int
    kserve_bodies: list[tuple[bytes, int | None]]  # (body, JSON header length)
    kserve_outputs: dict[str, list[int]]  # output name -> shape of one item's answer
    prompts: list[str]
    generate_chars: int


DIGITS: np.ndarray | None = None  # uint8 [N, 28, 28] held-out digits
BUDGETS: dict[str, dict[str, float]] | None = None  # None: --budgets none
WORKLOAD: Workload | None = None


@events.init.add_listener
def load_inputs(environment, **_kwargs) -> None:
    """The slow part (importing scikit-learn, splitting MNIST: seconds on a busy box) runs here, before
    locust starts the -t clock; test_start only asks the server about its models. The budget table is
    read here too, so a broken one stops the run before it starts, not after."""
    global DIGITS, BUDGETS
    path = environment.parsed_options.budgets
    BUDGETS = None if path.lower() == "none" else load_budgets(path)
    started = time.perf_counter()
    DIGITS, _ = held_out_digits()
    # gevent's loop caches "now" and nothing ran it while we blocked: without this, locust's -t timer
    # (spawn_later, armed next) would count those seconds and could end the run before it starts.
    gevent.get_hub().loop.update_now()
    log.info("loaded %d held-out digits in %.1f s (prompts: at test start, in the served vocabulary)", len(DIGITS),
             time.perf_counter() - started)


def get_json(host: str, path: str) -> dict:
    with urllib.request.urlopen(host.rstrip("/") + path, timeout=30) as response:
        return json.load(response)


def build_workload(host: str, generate_chars: int) -> Workload:
    assert DIGITS is not None, "load_inputs (locust's init event) loads the digits before the test starts"
    models = {m["name"]: m for m in get_json(host, "/models")["models"]}
    for name in (CLASSIFY_MODEL, FEATURES_MODEL, GENERATE_MODEL, KSERVE_MODEL):
        if not models.get(name, {}).get("version"):
            raise RuntimeError(f"the server does not serve model {name!r} (ready): {sorted(models)}")
    features_out = {o["name"]: o["shape"] for o in models[FEATURES_MODEL]["outputs"]}["fc7"]

    # KServe: the digits preprocessed exactly as the model's store metadata says, batch 1 each.
    meta = get_json(host, f"/v2/models/{KSERVE_MODEL}")
    # The graph's float input (encoded images go to the model's front end, <model>.image: docs/kserve.md).
    (tensor,) = meta["inputs"]
    x = preprocess_uint8(DIGITS[:KSERVE_BODIES], models[KSERVE_MODEL]["preprocessing"])
    if list(x.shape[1:]) != tensor["shape"][1:]:
        raise RuntimeError(f"{KSERVE_MODEL} takes {tensor['shape']}, preprocessing gives {list(x.shape[1:])}")
    bodies = []
    outputs = [triton_http.InferRequestedOutput(o["name"], binary_data=True) for o in meta["outputs"]]
    for item in x:
        infer_input = triton_http.InferInput(tensor["name"], [1, *item.shape], tensor["datatype"])
        infer_input.set_data_from_numpy(item[None])  # binary tensor extension (tritonclient's default)
        bodies.append(triton_http.InferenceServerClient.generate_request_body([infer_input], outputs))
    return Workload(
        pngs=[png_bytes(d) for d in DIGITS], labels=set(models[CLASSIFY_MODEL]["labels"]),
        feature_dim=int(features_out[-1]), kserve_bodies=bodies,
        kserve_outputs={o["name"]: [1, *o["shape"][1:]] for o in meta["outputs"]},
        prompts=prompts(vocab=served_vocab(host, GENERATE_MODEL)), generate_chars=generate_chars)


@events.test_start.add_listener
def on_test_start(environment, **_kwargs) -> None:
    global WORKLOAD
    started = time.perf_counter()
    try:
        WORKLOAD = build_workload(environment.host, environment.parsed_options.generate_chars)
    except Exception as e:  # server down, models missing, ...: stop at once with the reason, not N failures
        log.error("cannot build the workload from %s: %s: %s", environment.host, type(e).__name__, e)
        environment.process_exit_code = 1
        gevent.spawn(environment.runner.quit)
        return
    log.info("workload ready in %.1f s: %d PNG digits, %d v2 bodies, %d prompts", time.perf_counter() - started,
             len(WORKLOAD.pngs), len(WORKLOAD.kserve_bodies), len(WORKLOAD.prompts))


def http_error(response) -> str:
    """What a failed request says: status and the start of the body (a dropped connection has neither)."""
    body = (response.text or "")[:300] if response.content else ""
    return f"HTTP {response.status_code}: {body or getattr(response, 'error', None) or 'no body'}"


class NNServeUser(FastHttpUser):
    """geventhttpclient-based: several times cheaper per request than requests, and the client shares
    the CPU with the server on a small box."""

    abstract = True
    wait_time = constant(0)  # closed loop: -u N keeps N requests in flight

    def on_start(self) -> None:
        self.rng = np.random.default_rng()
        while WORKLOAD is None:  # users may spawn while test_start is still building it
            gevent.sleep(0.1)
        self.work = WORKLOAD

    def pick(self, items: list):
        return items[int(self.rng.integers(len(items)))]


class ClassifyUser(NNServeUser):
    @task
    def classify(self) -> None:
        files = {"image": ("digit.png", self.pick(self.work.pngs), "image/png")}
        with self.client.post("/classify", files=files, data={"model": CLASSIFY_MODEL},
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_error(response))
                return
            predictions = response.json().get("predictions") or []
            if not predictions or not {p["label"] for p in predictions} <= self.work.labels:
                response.failure(f"unexpected predictions: {predictions!r}"[:300])


class FeaturesUser(NNServeUser):
    @task
    def features(self) -> None:
        files = {"image": ("digit.png", self.pick(self.work.pngs), "image/png")}
        with self.client.post("/features", files=files, data={"model": FEATURES_MODEL, "format": "npy"},
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_error(response))
                return
            vector = np.load(io.BytesIO(response.content))
            if vector.shape != (self.work.feature_dim,) or vector.dtype != np.float32:
                response.failure(f"features {vector.dtype}{list(vector.shape)}, expected float32"
                                 f"[{self.work.feature_dim}]")


class GenerateUser(NNServeUser):
    """Plain ``/generate``: one JSON answer once all characters are sampled."""

    @task
    def generate(self) -> None:
        body = {"prompt": self.pick(self.work.prompts), "max_new_chars": self.work.generate_chars,
                "model": GENERATE_MODEL, "temperature": 0.8}
        with self.client.post("/generate", json=body, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_error(response))
                return
            text = response.json().get("text", "")
            if len(text) != self.work.generate_chars:
                response.failure(f"got {len(text)} characters, asked for {self.work.generate_chars}")


class GenerateStreamUser(NNServeUser):
    """Streamed ``/generate``. Recorded twice: "first char" is the time to the response headers (the service
    answers once the first character is sampled), "complete" the time to the last character."""

    @task
    def generate_stream(self) -> None:
        body = {"prompt": self.pick(self.work.prompts), "max_new_chars": self.work.generate_chars,
                "model": GENERATE_MODEL, "temperature": 0.8, "stream": True}
        start = time.perf_counter()
        with self.client.post("/generate", json=body, stream=True, catch_response=True,
                              name="/generate [stream] first char") as response:
            if response.status_code != 200:
                response.failure(http_error(response))
                return
            error, raw = None, b""
            try:
                raw = b"".join(response.iter_content(chunk_size=4096, decode_content=False))
                chars = len(raw.decode("utf-8"))
                if chars != self.work.generate_chars:
                    error = f"stream ended after {chars} characters, asked for {self.work.generate_chars}"
            except Exception as e:  # connection dropped mid-stream, bad UTF-8
                error = f"{type(e).__name__}: {e}"
        self.environment.events.request.fire(
            request_type="STREAM", name="/generate [stream] complete",
            response_time=1000 * (time.perf_counter() - start), response_length=len(raw),
            exception=RuntimeError(error) if error else None, context={})


class KServeUser(NNServeUser):
    """KServe v2 REST with the binary tensor extension, bodies encoded by tritonclient itself."""

    @task
    def infer(self) -> None:
        body, header_length = self.pick(self.work.kserve_bodies)
        headers = {"Content-Type": "application/octet-stream"}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        with self.client.post(f"/v2/models/{KSERVE_MODEL}/infer", data=body, headers=headers,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_error(response))
                return
            length = response.headers.get("Inference-Header-Content-Length")
            result = triton_http.InferenceServerClient.parse_response_body(
                response.content, header_length=int(length) if length else None)
            for name, shape in self.work.kserve_outputs.items():
                array = result.as_numpy(name)
                if array is None or list(array.shape) != shape:
                    response.failure(f"output {name}: {None if array is None else list(array.shape)}, "
                                     f"expected {shape}")


# -- budgets ---------------------------------------------------------------------------------------


def load_budgets(path: str) -> dict[str, dict[str, float]]:
    """{endpoint name: {"p50_ms"?, "p95_ms"?, "p99_ms"?, "max_error_rate"}}."""
    budgets = json.loads(Path(path).read_text())
    for name, budget in budgets.items():
        unknown = set(budget) - {*PERCENTILES, "max_error_rate"}
        if unknown:
            raise ValueError(f"{path}: budget of {name!r} has unknown keys {sorted(unknown)}")
    return budgets


def check_budgets(stats, budgets: dict[str, dict[str, float]]) -> list[str]:
    """One line per broken budget, naming the endpoint (empty: all met). ``stats`` is locust's
    RequestStats. An endpoint that got requests but has no budget is a violation too: the table must
    cover everything the locustfile sends."""
    violations = []
    for entry in sorted(stats.entries.values(), key=lambda e: e.name):
        if entry.num_requests == 0:
            continue
        budget = budgets.get(entry.name)
        if budget is None:
            violations.append(f"{entry.name}: no budget in the table")
            continue
        error_rate = entry.num_failures / entry.num_requests
        if error_rate > budget.get("max_error_rate", 0.0):
            violations.append(f"{entry.name}: error rate {error_rate:.2%} ({entry.num_failures}/{entry.num_requests}) "
                              f"> budget {budget.get('max_error_rate', 0.0):.2%}")
        for key, fraction in PERCENTILES.items():
            if key in budget:
                measured = entry.get_response_time_percentile(fraction)
                if measured > budget[key]:
                    violations.append(f"{entry.name}: {key.removesuffix('_ms')} {measured:.0f} ms > budget "
                                      f"{budget[key]:g} ms")
    return violations


@events.quitting.add_listener
def enforce_budgets(environment, **_kwargs) -> None:
    """Set the exit code from the budgets; an earlier failure (no workload) or a crashed user wins."""
    if environment.process_exit_code or BUDGETS is None:
        return
    checked = sum(1 for e in environment.stats.entries.values() if e.num_requests)
    violations = check_budgets(environment.stats, BUDGETS) if checked else ["no request was made"]
    for line in violations:
        log.error("BUDGET EXCEEDED %s", line)
    if violations:
        environment.process_exit_code = 1
    elif not environment.runner.exceptions:
        log.info("all budgets met (%d endpoints, %s)", checked, environment.parsed_options.budgets)
        environment.process_exit_code = 0  # failures within the error-rate budget do not fail the run
