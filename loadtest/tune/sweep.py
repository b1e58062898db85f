"""The tuner's configurations (``Point``), the servers that serve them and their measurements under wrk."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from loadtest.bench.wrk import run_wrk
from service.runtime import int8_gate_problem

TOKEN_BYTES = 32
CHANGE_TIMEOUT_S = 300  # a load of a big model in every worker (warm-up included)


@dataclass(frozen=True)
class Point:
    """One configuration: ``workers`` is the server's (NNSERVE_WORKERS), the rest the model's entry."""

    workers: int
    instances: int
    threads: int
    max_batch_size: int = 32
    delay_us: int = 0
    variant: str = "fp32"
    lone_threads: int = 0  # adaptive: a lone batch runs on a session with this many threads (0 = off)

    def entry(self, model: str) -> dict:
        """The models config entry (Triton's names) that serves this point's model settings."""
        return {"tag": model, "max_batch_size": self.max_batch_size,
                "dynamic_batching": {"max_queue_delay_microseconds": self.delay_us},
                "instance_group": [{"count": self.instances}],
                "parameters": {"intra_op_thread_count": {"string_value": str(self.threads)},
                               "lone_request_thread_count": {"string_value": str(self.lone_threads)}},
                "variant": self.variant}

    def describe(self) -> str:
        return (f"workers={self.workers} instances={self.instances} threads={self.threads} "
                f"max_batch_size={self.max_batch_size} delay={self.delay_us}us variant={self.variant}"
                + (f" lone_threads={self.lone_threads}" if self.lone_threads else ""))


@dataclass
class Measurement:
    concurrency: int
    goodput: float  # 2xx answers per second
    p50_ms: float
    p95_ms: float
    errors: int


@dataclass
class Result:
    point: Point
    runs: list[Measurement] = field(default_factory=list)
    failed: str = ""  # why the point could not be served or measured

    def to_json(self) -> dict:
        return {"point": asdict(self.point), "runs": [asdict(r) for r in self.runs], "failed": self.failed}


# -- the model, its variants and the request ------------------------------------------------------------------

@dataclass
class Target:
    """The model to tune: its store entries and the request every point gets."""

    model: str
    kind: str
    variants: dict[str, str]  # variant -> store tag, INT8 only where its gate passed
    excluded: dict[str, str]  # variant -> why it is not tried
    gates: dict[str, str]  # variant -> its accuracy gate at export, for the report
    endpoint: str  # path the load goes to
    body_args: list[str]  # post.lua's arguments


class NotInStore(LookupError):
    pass


IMAGE_ROUTES = {"classify": "scores", "features": "features"}  # an image model's routes -> the role each needs


def find_target(model: str, workdir: Path, image: Path | None = None, route: str | None = None) -> Target:
    """The store entries of ``model`` (NotInStore naming what the store has) and the request to send: an image
    model gets a PNG on ``route`` (/classify, or /features; default /classify where the model has class scores;
    decode and preprocessing included, as a client's upload), any other model zeros of its inputs on KServe v2
    /infer. ValueError for a route the model cannot serve."""
    import bentoml

    try:
        fp32 = bentoml.models.get(f"{model}:latest")
    except bentoml.exceptions.NotFound:
        names = sorted({m.tag.name for m in bentoml.models.list()})
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise NotInStore(f"model {model!r} is not in the BentoML model store ({home}); it holds: "
                         f"{', '.join(names) or 'nothing'}. Export it first: python -m export artifacts/{model} "
                         "(--int8 for the INT8 variant)") from None
    metadata: dict[str, Any] = dict(fp32.info.metadata)
    variants, excluded, gates = {"fp32": str(fp32.tag)}, {}, {}
    try:
        int8 = bentoml.models.get(f"{model}-int8:latest")
    except bentoml.exceptions.NotFound:
        excluded["int8"] = f"no {model}-int8 in the store (python -m export artifacts/{model} --int8)"
    else:
        int8_metadata: dict[str, Any] = dict(int8.info.metadata)
        why = int8_gate_problem(int8_metadata)
        if why is None:
            variants["int8"] = str(int8.tag)
            parity = int8_metadata.get("parity") or {}
            drop = {k: v for k, v in parity.items() if k.endswith(("_drop_points", "_delta"))}
            gates["int8"] = f"{int8.tag}: accuracy gate passed at export ({drop or parity})"
        else:
            excluded["int8"] = f"{int8.tag}: {why}"
    workdir.mkdir(parents=True, exist_ok=True)
    roles = metadata.get("roles", {})
    if "image" in roles:
        route = route or ("classify" if "scores" in roles else "features")
        if roles.get(IMAGE_ROUTES.get(route, "")) is None:
            served = [f"/{r}" for r, role in IMAGE_ROUTES.items() if role in roles]
            raise ValueError(f"{model} cannot be tuned on /{route}: it serves {', '.join(served) or 'neither'} "
                             f"of /classify and /features")
        png = image or workdir / "request.png"
        if image is None:
            png.write_bytes(noise_png(metadata["preprocessing"]))
        fields = [f"model={model}"] + (["format=npy"] if route == "features" else [])
        return Target(model, metadata["kind"], variants, excluded, gates, f"/{route}", ["multipart", str(png), *fields])
    if route:
        raise ValueError(f"{model} is a {metadata['kind']} model: it is tuned on KServe v2 /infer, not /{route}")
    body = workdir / "request.json"
    body.write_text(json.dumps(v2_request(metadata)))
    return Target(model, metadata["kind"], variants, excluded, gates, f"/v2/models/{model}/infer",
                  ["body", str(body), "application/json"])


def noise_png(preprocessing: dict) -> bytes:
    """A PNG of random pixels at the model's input size (a blank one would compress to nothing)."""
    from PIL import Image

    from models.preprocess import input_hw

    height, width = input_hw(preprocessing)
    channels = preprocessing.get("channels", 3)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def v2_request(metadata: dict) -> dict:
    """A KServe v2 JSON request: one item of zeros for each input (the kind's example input)."""
    from models.kinds import get_kind
    from models.runtime import TensorSpec

    datatypes = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}
    inputs = [TensorSpec(**t) for t in metadata["inputs"]]
    feeds = get_kind(metadata["kind"]).example_feeds(metadata, inputs, 1, 16)
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatypes[str(array.dtype)],
                        "data": array.ravel().tolist()} for name, array in feeds.items()]}


# -- the servers ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(model: str, workers: int, workdir: Path, cores: int) -> Iterator[Server]:
    """A real nnserve server with ``workers`` workers serving only ``model``, its management API on."""
    from harness.server import running_server

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"models-{workers}w.yaml"
    config.write_text(json.dumps({"models": {model: {"tag": model}}}))
    token = workdir / "management-token"
    if not token.exists():
        token.write_text(os.urandom(TOKEN_BYTES).hex())
        token.chmod(0o600)
    state = Path(tempfile.mkdtemp(prefix=f"state-{workers}w-", dir=workdir))
    env = {"NNSERVE_WORKERS": str(workers), "NNSERVE_MODELS_CONFIG": str(config),
           "NNSERVE_MANAGEMENT_TOKEN_FILE": str(token), "NNSERVE_STATE_DIR": str(state),
           "NNSERVE_CHANGE_TIMEOUT_S": str(CHANGE_TIMEOUT_S), "NNSERVE_PLAYGROUND": "0",
           "NNSERVE_CPUS": str(cores)}
    with running_server(workdir / f"server-{workers}w.log", env) as live:
        yield Server(live.http_url, token.read_text().strip(), workers, live.log)


@dataclass
class Server:
    url: str
    token: str
    workers: int
    log: object  # () -> the server's log tail

    def apply(self, model: str, entry: dict) -> dict:
        """Serve ``entry`` for ``model`` through the management API; RuntimeError with the server's reason."""
        return apply_entry(self.url, self.token, model, entry)


def apply_entry(url: str, token: str, model: str, entry: dict) -> dict:
    """POST .../load with ``entry`` as the config (Triton's load with a config override): every worker serves it
    when this returns; RuntimeError with the server's answer otherwise."""
    response = requests.post(f"{url}/v2/repository/models/{model}/load", timeout=CHANGE_TIMEOUT_S + 30,
                             json={"parameters": {"config": json.dumps(entry)}},
                             headers={"authorization": f"Bearer {token}"})
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:500]}")
    return response.json()


def measure(server: Server, target: Target, point: Point, concurrencies: list[int], seconds: float) -> Result:
    """Apply ``point`` (its workers are the server's), check one request, warm it up at the highest
    concurrency for a second (batch shapes ORT has not run yet), let its backlog drain, then each
    concurrency for ``seconds``."""
    result = Result(point)
    try:
        server.apply(target.model, point.entry(target.model))
    except (RuntimeError, requests.RequestException) as e:
        result.failed = f"not served: {e}"
        return result
    url = server.url + target.endpoint
    try:
        warm = run_wrk(url, target.body_args, max(concurrencies), min(1.0, seconds))
        if warm.requests == 0 or warm.status_errors == warm.requests:
            result.failed = "every warm-up request failed (see the server log)"
            return result
        # The server still works off what the warm-up's clients left queued when wrk stopped (a slow point:
        # 100+ ms); one lone request waits behind it, so the first measured run starts on an idle server.
        run_wrk(url, target.body_args, 1, 0.2)
        for c in concurrencies:
            run = run_wrk(url, target.body_args, c, seconds)
            result.runs.append(Measurement(c, round(run.ok_rps, 2), run.p50_ms, run.p95_ms, run.errors))
    except RuntimeError as e:
        result.failed = f"measurement failed: {e}"
    return result


# -- the search ----------------------------------------------------------------------------------------------

def execution_points(cores: int, variant: str = "fp32") -> list[Point]:
    """Stage 1: workers x instances x intra-op threads whose threads fit the cores (never oversubscribed),
    default batching. On 2 cores: 1x1x1, 1x1x2, 1x2x1, 2x1x1."""
    workers = sorted({w for w in (1, 2, cores // 2, cores) if 1 <= w <= cores})
    points = []
    for w in workers:
        for instances in (1, 2):
            for threads in sorted({1, 2, cores // (w * instances)}):
                if threads >= 1 and w * instances * threads <= cores:
                    points.append(Point(w, instances, threads, variant=variant))
    return points


BATCH_SIZES = (1, 8, 32)
DELAYS_US = (0, 2000)


def batching_points(base: Point) -> list[Point]:
    """Stage 2: max_batch_size x max_queue_delay on an execution point (a delay means nothing at batch 1)."""
    out = [Point(base.workers, base.instances, base.threads, size, delay, base.variant)
           for size in BATCH_SIZES for delay in DELAYS_US if not (size == 1 and delay)]
    return [p for p in out if p != base]


def adaptive_points(best: list[Point], cores: int) -> list[Point]:
    """Stage 3: the adaptive policy on the best points: all of a worker's cores for a batch that is the only
    work (a lone-request session), the instances' own sessions under load; on a point with one instance, two
    instances sharing the cores instead."""
    out = []
    for p in best:
        lone = max(1, cores // p.workers)
        instances = max(2, p.instances)
        threads = p.threads if p.instances >= 2 else max(1, cores // (p.workers * instances))
        if lone > threads:
            out.append(Point(p.workers, instances, threads, p.max_batch_size, p.delay_us, p.variant, lone))
    return out


def score(result: Result, budget_ms: float | None) -> tuple[bool, float, float]:
    """(meets the budget, geometric-mean goodput over the concurrencies, worst p95 / budget)."""
    if result.failed or not result.runs:
        return False, 0.0, math.inf
    goodputs = [max(r.goodput, 1e-9) for r in result.runs]
    gmean = float(np.exp(np.mean(np.log(goodputs))))
    worst = max(r.p95_ms for r in result.runs) / budget_ms if budget_ms else 0.0
    meets = not any(r.errors for r in result.runs) and (budget_ms is None or worst <= 1.0)
    return meets, gmean, worst


def rank(results: list[Result], budget_ms: float | None) -> list[Result]:
    """Best first: meeting the budget, then the highest geometric-mean goodput."""
    def key(r: Result) -> tuple:
        meets, gmean, _ = score(r, budget_ms)
        return (not meets, -gmean)
    return sorted(results, key=key)


def pick(results: list[Result], budget_ms: float | None, variant: str | None = None) -> Result | None:
    """The best result that meets the budget (of ``variant`` when given), or None."""
    return next((r for r in rank(results, budget_ms)
                 if score(r, budget_ms)[0] and (variant is None or r.point.variant == variant)), None)


class Clock:
    """The sweep's time limit: a point is started only if its estimated cost still fits."""

    def __init__(self, limit_s: float) -> None:
        self.start, self.limit_s = time.monotonic(), limit_s
        self.point_s: list[float] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fits(self, first_guess_s: float, extra_s: float = 0.0) -> bool:
        estimate = max(self.point_s) if self.point_s else first_guess_s
        return self.elapsed() + estimate + extra_s <= self.limit_s
