"""Start the real server (`bentoml serve service.service:NNServe`), or a baseline server, in a subprocess:
tests, benchmarks, load tests and the local cluster (deploy/cluster.py).

One server per test session (a start costs several seconds): free HTTP and gRPC ports, its own
BENTOML_HOME (the tests' model store), output to a log file that failing tests can show, ready once
``/readyz`` answers 200, shut down with SIGTERM (the arbiter stops its workers gracefully, shutdown hooks
run) and killed, workers included, if it hangs.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "service.service:NNServe"


def ephemeral_range() -> tuple[int, int]:
    """The ports the OS gives outgoing connections (Linux: ip_local_port_range; elsewhere IANA's range)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_port() -> int:
    """A TCP port nobody listens on right now, below the OS's ephemeral range. A port the OS picked (bind to
    0) is an ephemeral one: between the pick and the server's bind, an outgoing connection (BentoML's own
    sockets at start-up, a load generator) could be given it, and the server would fail to bind (seen once:
    the gRPC port)."""
    low = ephemeral_range()[0]
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(max(1024, low - 12000), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # that range is full: the OS's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    http_url: str  # e.g. http://127.0.0.1:40123
    grpc_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self, tail_chars: int = 20000) -> str:
        """The server's stdout+stderr so far (the last ``tail_chars``): put it in assertion messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail_chars:]

    def alive(self) -> bool:
        return self.process.poll() is None


class BackgroundThreads:
    """Client threads running ``targets`` (loops that end once ``self._stop`` is set) in the background of a
    ``with`` block; ``stop()`` (or leaving the block) sets it and joins them."""

    join_timeout_s = 60.0

    def __init__(self, targets: Sequence[Callable[[], None]]) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=target, daemon=True) for target in targets]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.join_timeout_s)


def worker_pids(server: LiveServer) -> list[int]:
    """PIDs of the live worker processes: circus starts them as children of the arbiter. A killed worker
    stays a zombie child until the arbiter reaps it; it is not listed."""
    import psutil

    try:
        children = psutil.Process(server.process.pid).children()
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(pids)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_process(cmd: list[str], http_port: int, log_path: Path, env: dict[str, str] | None = None,
                  ready_path: str = "/readyz", timeout_s: float = 240.0, grpc_port: int = 0,
                  root: Path = REPO_ROOT) -> LiveServer:
    """Start any HTTP server command (nnserve, or a baseline of loadtest/baselines) listening on
    ``http_port`` and wait until ``ready_path`` answers 200. ``root``: the checkout it runs from (its
    working directory and first import path: another release's git worktree serves its own code)."""
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1", **(env or {})}
    if root != REPO_ROOT:
        full_env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [full_env.get("PYTHONPATH")])])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        # Own session: a Ctrl-C meant for pytest does not hit the server half-way; stop_server stops it.
        process = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{http_port}", grpc_port, process, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while not _ready(server.http_url + ready_path):
            if not server.alive():
                raise RuntimeError(f"{shlex.join(cmd)} exited with {process.returncode} before it was ready; "
                                   f"log {log_path}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(cmd)} not ready after {timeout_s:.0f} s; log {log_path}:\n"
                                   f"{server.log()}")
            time.sleep(0.5)
    except BaseException:  # not ready, or Ctrl-C while waiting: no server is left behind (its own session)
        stop_server(server)
        raise
    return server


def start_server(log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 240.0,
                 ready_path: str = "/readyz", root: Path = REPO_ROOT) -> LiveServer:
    """Start ``bentoml serve`` and wait until ``ready_path`` says 200 (``/readyz``: models loaded and
    warmed up; ``/livez`` for a server that is not meant to become ready). ``root``: the checkout whose
    service it serves (default this one; the bench's ``--previous`` row: a git worktree of an older commit)."""
    http_port, grpc_port = free_port(), free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    cmd = [str(bentoml_cli), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(http_port)]
    return start_process(cmd, http_port, log_path, {"NNSERVE_GRPC_PORT": str(grpc_port), **(env or {})},
                         ready_path=ready_path, timeout_s=timeout_s, grpc_port=grpc_port, root=root)


def stop_server(server: LiveServer, grace_s: float = 30.0) -> int | None:
    """SIGTERM to the arbiter (graceful), SIGKILL if it hangs; then any worker it left behind.

    SIGTERM rather than SIGINT: a shell running pytest in the background starts it with SIGINT ignored,
    and the server would inherit that. Circus puts every worker in its own session, so the workers are
    found through the process tree (psutil, a BentoML dependency), not the arbiter's process group.
    """
    import psutil

    try:
        workers = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    if server.alive():
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)
    _, still_running = psutil.wait_procs(workers, timeout=10)
    for worker in still_running:  # left behind by an arbiter that died: they would keep the ports
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    return server.process.returncode


@contextlib.contextmanager
def running_server(log_path: Path, env: dict[str, str] | None = None,
                   ready_path: str = "/readyz", root: Path = REPO_ROOT) -> Iterator[LiveServer]:
    server = start_server(log_path, env, ready_path=ready_path, root=root)
    try:
        yield server
    finally:
        stop_server(server)
