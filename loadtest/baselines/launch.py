"""Start one baseline server on a free port, wait until it is ready, stop it afterwards (whatever happens).

    with running_baseline("fastapi", log_path, env) as server:
        server.http_url  # http://127.0.0.1:PORT, serving POST /classify (and /features for fastapi)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from harness.server import LiveServer, free_port, start_process, stop_server

# name -> (label for the report, routes it serves, readiness path)
BASELINES = {
    "bentoml": ("BentoML by the book (batchable API)", ("/classify",), "/readyz"),
    "litserve": ("LitServe (batch 32, 5 ms)", ("/classify",), "/health"),
    "fastapi": ("FastAPI + ORT, 2 workers", ("/classify", "/features"), "/health"),
}


def baseline_command(name: str, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if name == "bentoml":
        return [str(bin_dir / "bentoml"), "serve", "loadtest.baselines.bentoml_book:Lenet5Batched",
                "--host", "127.0.0.1", "--port", str(port)]
    if name == "litserve":
        return [sys.executable, "-m", "loadtest.baselines.litserve_server", "--port", str(port)]
    if name == "fastapi":
        # uvicorn's defaults with [standard] installed: uvloop + httptools, as for every other server here.
        return [sys.executable, "-m", "uvicorn", "loadtest.baselines.fastapi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "2", "--no-access-log"]
    raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")


@contextlib.contextmanager
def running_baseline(name: str, log_path: Path, env: dict[str, str] | None = None,
                     timeout_s: float = 180.0) -> Iterator[LiveServer]:
    """``env`` should carry BENTOML_HOME and the BASELINE_<MODEL>_TAG pins (see common.py)."""
    port = free_port()
    server = start_process(baseline_command(name, port), port, log_path, env, ready_path=BASELINES[name][2],
                           timeout_s=timeout_s)
    try:
        yield server
    finally:
        stop_server(server)
