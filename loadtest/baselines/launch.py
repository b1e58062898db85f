"""Start one baseline server on a free port in a given configuration, wait until it is ready, stop it
afterwards (whatever happens); and the grid of configurations the bench sweeps for each peer.

    with running_baseline(Config("fastapi", workers=2), log_path, env) as server:
        server.http_url  # http://127.0.0.1:PORT, serving POST /classify (and /features for fastapi)

Every peer is run as its own docs advise for a 2-core machine: worker processes per core where it has
them, its batching with its documented knobs (on, off, and two waits), uvloop + httptools under uvicorn
(uvicorn picks them when installed), ONNX Runtime with nnserve's session options and cores / workers
intra-op threads, nnserve's decode + preprocessing code (loadtest/baselines/common.py), and the access
log off, as nnserve ships (one log line per request costs ~20% of a small request; for LitServe that is its
documented production log level, "warning"): switching it off can only make a peer faster.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.server import REPO_ROOT, LiveServer, free_port, start_process, stop_server

# name -> (label for the report, routes it serves on the lenet5 rows, readiness path)
BASELINES = {
    "bentoml": ("BentoML by the book", ("/classify",), "/readyz"),
    "litserve": ("LitServe", ("/classify",), "/health"),
    "fastapi": ("FastAPI + ORT", ("/classify", "/features"), "/health"),
    "mlserver": ("MLServer (custom ONNX runtime)", ("/v2/models/lenet5/infer",), "/v2/models/lenet5/ready"),
    # KServe v2 with Triton's binary tensor extension, as tritonclient sends it (stacks.V2_BINARY).
    "triton": ("Triton 2.51 (Python backend + ORT)", ("/v2/models/lenet5/infer (binary)",), "/v2/health/ready"),
    # The limit: nnserve's HTTP stack (bentoml serve, 2 workers, uvicorn + uvloop + httptools, a raw ASGI
    # route) reading the same body and answering a fixed JSON: no parsing, no model (limit.py).
    "limit": ("bare HTTP stack (fixed JSON)", ("/classify",), "/readyz"),
}
# The HTTP stack each server ran on, printed beside its rows (issue 26). uvicorn picks uvloop + httptools when
# installed (the bench extra); MLServer's own venv gets uvloop from MLSERVER_PINS and httptools with uvicorn[standard].
HTTP_STACKS = {
    "nnserve": "bentoml serve: uvicorn + uvloop + httptools, raw ASGI front door",
    "nnserve-int8": "bentoml serve: uvicorn + uvloop + httptools, raw ASGI front door",  # realsize's INT8 pick
    "limit": "bentoml serve: uvicorn + uvloop + httptools, raw ASGI route",
    "bentoml": "bentoml serve: uvicorn + uvloop + httptools",
    "litserve": "LitServe: FastAPI on uvicorn + uvloop + httptools",
    "fastapi": "FastAPI on uvicorn + uvloop + httptools",
    "mlserver": "MLServer: FastAPI on uvicorn + uvloop 0.21 (its own venv)",
    "triton": "Triton's C++ front ends (libevhtp HTTP, gRPC); model in its Python backend",
}
MLSERVER_VENV = REPO_ROOT / ".venv-mlserver"


def http_stack(server: str) -> str:
    """HTTP_STACKS[server]; for MLServer whether its venv has httptools (else uvicorn parses with h11)."""
    text = HTTP_STACKS.get(server, "")
    if server == "mlserver":
        found = any((MLSERVER_VENV / "lib").glob("python*/site-packages/httptools"))
        text += " + httptools" if found else "; httptools not installed there: h11"
    return text
# uvloop 0.21: MLServer 1.7.1's parallel workers call asyncio.get_event_loop() outside a running loop, which
# uvloop 0.22+ refuses ("There is no current event loop"): with a newer one every parallel worker dies at start.
MLSERVER_PINS = ("mlserver==1.7.1", "onnxruntime==1.32.0", "uvloop==0.21.0")


@dataclass(frozen=True)
class Config:
    """One way to run a peer: worker processes (Triton: model instances), its batching (max items, wait in
    ms; 0 = off), and ORT intra-op threads per process (0: cores / workers, never oversubscribing)."""

    peer: str
    workers: int = 1
    max_batch: int = 0  # 0: batching off
    wait_ms: float = 0.0
    threads: int = 0

    @property
    def ort_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // max(1, self.workers))

    def describe(self) -> str:
        if not self.max_batch:
            batching = "no batching"
        elif self.peer == "bentoml":  # BentoML's adaptive batcher sets its own wait, bounded by max_latency_ms
            batching = f"adaptive batching <= {self.max_batch} (max_latency_ms 500)"
        elif self.peer == "triton":
            batching = f"dynamic batching <= {self.max_batch}, max_queue_delay {self.wait_ms:g} ms"
        else:
            batching = f"batch <= {self.max_batch}, wait {self.wait_ms:g} ms"
        unit = {"mlserver": "parallel_workers", "litserve": "workers_per_device",
                "triton": "instances"}.get(self.peer, "workers")
        threads = f", {self.threads} ORT thread{'s' * (self.threads > 1)}" if self.threads else ""
        return f"{unit}={self.workers}{threads}, {batching}"

    def env(self) -> dict[str, str]:
        return {"BASELINE_WORKERS": str(self.workers), "BASELINE_MAX_BATCH": str(self.max_batch),
                "BASELINE_WAIT_MS": f"{self.wait_ms:g}", "BASELINE_ORT_THREADS": str(self.ort_threads)}


def grid(peer: str, cores: int | None = None) -> list[Config]:
    """The configurations swept for ``peer``: 1 worker and one per core (2 on this box) x its batching
    off / on with a short and a longer wait. FastAPI has no batching: its workers x ORT threads (1 and all
    cores each: a lone request on every core, or one per worker) instead; BentoML's adaptive batcher has no
    fixed wait (max_latency_ms bounds it: 500 ms, nnserve's queue timeout scale); Triton's instances x its
    dynamic batching off or with max_queue_delay 0, 1 and 5 ms (what Model Analyzer sweeps)."""
    per_core = max(1, cores or os.cpu_count() or 1)
    workers = sorted({1, per_core})
    if peer == "fastapi":
        return [Config(peer, w, threads=t) for w in workers for t in sorted({1, per_core})]
    if peer == "triton":
        return [Config(peer, w, b, wait) for w in workers
                for b, wait in ((0, 0.0), (32, 0.0), (32, 1.0), (32, 5.0))]
    if peer == "bentoml":
        return [Config(peer, w, b, 0.0) for w in workers for b in (0, 32)]
    if peer in ("litserve", "mlserver"):
        return [Config(peer, w, b, wait) for w in workers for b, wait in ((0, 0.0), (32, 1.0), (32, 5.0))]
    if peer == "limit":
        return [Config(peer, 2)]
    raise ValueError(f"unknown baseline {peer!r}; known: {sorted(BASELINES)}")


def baseline_command(config: Config, port: int, workdir: Path | None = None) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if config.peer in ("bentoml", "limit"):
        module = "loadtest.baselines.bentoml_book:Lenet5" if config.peer == "bentoml" else \
            "loadtest.baselines.limit:Limit"
        return [str(bin_dir / "bentoml"), "serve", module, "--host", "127.0.0.1", "--port", str(port)]
    if config.peer == "litserve":
        return [sys.executable, "-m", "loadtest.baselines.litserve_server", "--port", str(port)]
    if config.peer == "fastapi":
        # uvicorn's defaults with [standard] installed: uvloop + httptools, as for every other server here.
        return [sys.executable, "-m", "uvicorn", "loadtest.baselines.fastapi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(config.workers), "--no-access-log"]
    if config.peer == "mlserver":
        if workdir is None:
            raise ValueError("MLServer needs a folder for its model repository")
        return [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(workdir)]
    raise ValueError(f"unknown baseline {config.peer!r}; known: {sorted(BASELINES)}")


def ensure_mlserver() -> str | None:
    """Create MLServer's own venv (.venv-mlserver: its fastapi pin conflicts with the bench extra) if it is
    missing; None when ready, else why MLServer cannot run."""
    from loadtest.baselines.venvs import own_venv

    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    problem = own_venv(MLSERVER_VENV, MLSERVER_PINS, mlserver.exists())
    if problem is None and not mlserver.exists():
        return f"{mlserver} missing after pip install"
    return problem


@contextlib.contextmanager
def running_baseline(config: Config | str, log_path: Path, env: dict[str, str] | None = None,
                     timeout_s: float = 180.0) -> Iterator[LiveServer]:
    """``env`` should carry BENTOML_HOME and the BASELINE_<MODEL>_TAG pins (see common.py); a bare name runs
    the peer's first grid configuration with one worker per core."""
    if isinstance(config, str):
        config = Config(config, os.cpu_count() or 1)
    port = free_port()
    workdir = None
    if config.peer == "triton":
        with running_triton(config, port, log_path, env or {}, timeout_s) as server:
            yield server
        return
    if config.peer == "mlserver":
        from loadtest.baselines.mlserver.__main__ import write_repository

        workdir = log_path.with_suffix(".mlserver")
        write_repository(workdir, (env or {}).get("BASELINE_LENET5_TAG", "lenet5:latest"), port, config)
    server = start_process(baseline_command(config, port, workdir), port, log_path,
                           {**(env or {}), **config.env()}, ready_path=BASELINES[config.peer][2],
                           timeout_s=timeout_s)
    try:
        yield server
    finally:
        # A peer's graceful shutdown is not measured: MLServer waits ~30 s for its workers; 10 s, then kill.
        stop_server(server, grace_s=10)


@contextlib.contextmanager
def running_triton(config: Config, port: int, log_path: Path, env: dict[str, str],
                   timeout_s: float) -> Iterator[LiveServer]:
    """Triton from .venv-triton (triton_server.ensure_triton makes it) on ``port`` (HTTP) and a free gRPC port,
    serving the models ``BASELINE_TRITON_MODELS`` names, in ``config``."""
    from loadtest.baselines import triton_server

    workdir = log_path.with_suffix(".triton")
    specs = triton_server.served_specs({**os.environ, **env})
    triton_server.write_repository(workdir, specs, config.workers, config.max_batch, config.wait_ms,
                                   config.ort_threads)
    grpc_port = free_port()
    server = start_process(triton_server.command(workdir, port, grpc_port), port, log_path,
                           {**env, **config.env(), **triton_server.environment()},
                           ready_path=BASELINES["triton"][2], timeout_s=timeout_s, grpc_port=grpc_port)
    try:
        yield server
    finally:
        stop_server(server, grace_s=10)
