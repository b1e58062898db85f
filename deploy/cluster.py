"""Local scale-out: N replicas of ``bentoml serve`` on loopback ports behind a real HAProxy.

What a Kubernetes Service + readiness probes + rolling updates do, played with local processes:

- HAProxy health-checks every replica on ``/readyz`` and retries a request that found no connection, an
  empty response or a timeout on another replica (``retry-on`` + ``option redispatch``);
- ``drain`` = endpoint removal (HAProxy's ``set server ... state drain``: no new requests, open ones go
  on), a pause (the pod's preStop), then SIGTERM: the pod's termination sequence;
- ``kill`` = SIGKILL to every process of a replica at once: a crashed container;
- each response says which replica served it (``X-Replica``, set by HAProxy) and which model version
  (``/classify``'s ``"model": "lenet5:<version>"``).

``python -m deploy.cluster`` (``make cluster``) runs every scenario on the store in ``BENTOML_HOME`` and
prints the numbers as JSON (docs/deploy.md has one run's). Load only ever goes to 127.0.0.1, bounded
in time and count.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from harness.server import REPO_ROOT, SERVICE, BackgroundThreads, LiveServer, _ready, free_port, stop_server

HAPROXY_TEMPLATE = """\
global
    maxconn 2000
    stats socket {socket} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 120s
    # a streamed 2000-character /generate runs up to ~60 s; a stalled server is cut at 120 s
    timeout server 120s
    timeout check 2s
    # A request that got no connection, no answer or a timeout goes to another replica (redispatch).
    # HAProxy keeps the request (bodies up to tune.bufsize, 16 KB) to replay it; a response already
    # under way (a stream) cannot be retried.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    # Wait for the whole request body before picking a server, so every request can be replayed.
    option http-buffer-request
frontend nnserve
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Replica %s
    default-server check inter {check_ms}ms fall 2 rise 2
{servers}
"""


@dataclass
class Slot:
    """A place for a replica behind HAProxy: fixed ports, a server line in haproxy.cfg."""
    name: str
    http_port: int
    grpc_port: int
    server: LiveServer | None = None


@dataclass
class Result:
    """One request through the balancer."""
    kind: str  # classify | stream
    start: float
    seconds: float
    status: int | None  # None: no HTTP answer (connection error, cut stream)
    replica: str = ""
    version: str = ""
    error: str = ""
    complete: bool = True  # a stream: every requested character arrived


@dataclass
class Cluster:
    workdir: Path
    env: dict[str, str]
    slots: list[Slot]
    port: int = 0
    haproxy: subprocess.Popen | None = None
    socket_path: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def slot(self, name: str) -> Slot:
        return next(s for s in self.slots if s.name == name)

    def _spawned(self, name: str) -> LiveServer:
        server = self.slot(name).server
        if server is None:
            raise RuntimeError(f"no replica was spawned in slot {name} (Cluster.spawn)")
        return server

    # -- replicas ----------------------------------------------------------------------------------------

    def spawn(self, name: str, env: dict[str, str] | None = None) -> LiveServer:
        """Start ``bentoml serve`` in slot ``name``; does not wait for it (see ``wait_ready``)."""
        slot = self.slot(name)
        full_env = {**os.environ, **self.env, "NNSERVE_GRPC_PORT": str(slot.grpc_port), "BENTOML_DO_NOT_TRACK":
                    "True", "PYTHONUNBUFFERED": "1", **(env or {})}
        log_path = self.workdir / f"{name}.log"
        cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", SERVICE, "--host", "127.0.0.1", "--port",
               str(slot.http_port)]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        slot.server = LiveServer(f"http://127.0.0.1:{slot.http_port}", slot.grpc_port, process, log_path)
        if self.haproxy is not None:  # a new pod is a new endpoint: whatever state the slot was left in
            self.set_state(name, "ready")
        return slot.server

    def wait_ready(self, name: str, timeout_s: float = 240.0) -> float:
        """Seconds until the replica's /readyz says 200 (from now)."""
        server = self._spawned(name)
        start = time.monotonic()
        while not _ready(server.http_url):
            if not server.alive():
                raise RuntimeError(f"replica {name} exited with {server.process.returncode}:\n{server.log()}")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"replica {name} not ready after {timeout_s:.0f} s:\n{server.log()}")
            time.sleep(0.2)
        return time.monotonic() - start

    def kill(self, name: str) -> None:
        """SIGKILL to every process of the replica at once, as when a container dies."""
        server = self._spawned(name)
        processes = [psutil.Process(server.process.pid)]
        with contextlib.suppress(psutil.NoSuchProcess):
            processes += processes[0].children(recursive=True)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        server.process.wait(timeout=10)
        psutil.wait_procs(processes, timeout=10)

    def terminate(self, name: str, timeout_s: float = 120.0) -> tuple[float, int | None]:
        """SIGTERM to the replica's arbiter, as the kubelet does; (seconds until every process of it has
        exited, exit code). SIGKILL after ``timeout_s`` (the grace period)."""
        server = self._spawned(name)
        processes = [psutil.Process(server.process.pid)]
        with contextlib.suppress(psutil.NoSuchProcess):
            processes += processes[0].children(recursive=True)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=timeout_s)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        server.process.wait(timeout=10)
        return time.monotonic() - start, server.process.returncode

    # -- the balancer ------------------------------------------------------------------------------------

    def start_haproxy(self, check_ms: int = 500) -> None:
        self.port = free_port()
        self.socket_path = self.workdir / "haproxy.sock"
        servers = "\n".join(f"    server {s.name} 127.0.0.1:{s.http_port}" for s in self.slots)
        config = HAPROXY_TEMPLATE.format(socket=self.socket_path, port=self.port, check_ms=check_ms,
                                         servers=servers)
        path = self.workdir / "haproxy.cfg"
        path.write_text(config)
        check = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy.cfg invalid:\n{check.stdout}{check.stderr}")
        log = open(self.workdir / "haproxy.log", "ab")  # noqa: SIM115 - closed with the process
        self.haproxy = subprocess.Popen([haproxy_binary(), "-db", "-f", str(path)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def admin(self, command: str) -> str:
        """One command on HAProxy's runtime API (the stats socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def set_state(self, name: str, state: str) -> None:
        """ready | drain | maint for server ``name``."""
        self.admin(f"set server replicas/{name} state {state}")

    def status(self) -> dict[str, str]:
        """HAProxy's view: server name -> UP / DOWN / DRAIN / MAINT ..."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "replicas" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row["status"]
        return out

    def wait_status(self, name: str, status: str, timeout_s: float = 60.0) -> float:
        start = time.monotonic()
        while not self.status().get(name, "").startswith(status):
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"{name} not {status} in HAProxy after {timeout_s} s: {self.status()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def close(self) -> None:
        for slot in self.slots:
            if slot.server is not None and slot.server.alive():
                stop_server(slot.server)
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)


def haproxy_binary() -> str:
    """The haproxy executable, or RuntimeError saying how to get it."""
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/sbin/haproxy")
                                            if os.access(p, os.X_OK)), None)
    if path is None:
        raise RuntimeError("haproxy not installed: `apt-get install -y haproxy` (Debian package haproxy)")
    return path


@contextlib.contextmanager
def cluster(env: dict[str, str], names: tuple[str, ...] = ("r1", "r2", "r3", "r4"),
            workdir: Path | None = None) -> Iterator[Cluster]:
    """A Cluster with empty slots ``names`` (HAProxy sees them DOWN until a replica is spawned there)."""
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="nnserve-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ports: set[int] = set()
    slots = []
    for name in names:
        http_port, grpc_port = _two_free_ports(ports)
        slots.append(Slot(name, http_port, grpc_port))
    c = Cluster(workdir, env, slots)
    try:
        yield c
    finally:
        c.close()


def _two_free_ports(taken: set[int]) -> tuple[int, int]:
    out: list[int] = []
    while len(out) < 2:
        port = free_port()
        if port not in taken:
            taken.add(port)
            out.append(port)
    return out[0], out[1]


# -- load --------------------------------------------------------------------------------------------------


class Load(BackgroundThreads):
    """Closed-loop client threads against the balancer, bounded by ``max_seconds`` and ``max_requests``;
    ``stop()`` ends them early. Every request's outcome lands in ``results``."""

    join_timeout_s = 180.0

    def __init__(self, url: str, image: bytes, classify_threads: int, stream_threads: int = 0,
                 stream_chars: int = 300, max_seconds: float = 120.0, max_requests: int = 100_000) -> None:
        self.url, self.image, self.stream_chars = url, image, stream_chars
        self.results: list[Result] = []
        self.active_streams: dict[int, str] = {}  # thread id -> replica, for streams whose headers arrived
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + max_seconds
        self._budget = max_requests
        super().__init__([functools.partial(self._run, self._classify)] * classify_threads
                         + [functools.partial(self._run, self._stream)] * stream_threads)

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or time.monotonic() > self._deadline or self._budget <= 0:
                return False
            self._budget -= 1
            return True

    def _run(self, one: Callable[[requests.Session], Result]) -> None:
        with requests.Session() as session:
            while self._take():
                result = one(session)
                with self._lock:
                    self.results.append(result)

    def _classify(self, session: requests.Session) -> Result:
        start = time.monotonic()
        try:
            r = session.post(self.url + "/classify", files={"image": ("digit.png", self.image, "image/png")},
                             timeout=60)
        except requests.RequestException as e:
            return Result("classify", start, time.monotonic() - start, None, error=type(e).__name__)
        version = r.json().get("model", "") if r.status_code == 200 else ""
        return Result("classify", start, time.monotonic() - start, r.status_code, r.headers.get("X-Replica", ""),
                      version, "" if r.ok else r.text[:200])

    def _stream(self, session: requests.Session) -> Result:
        start = time.monotonic()
        body: dict[str, Any] = {"prompt": "The ", "max_new_chars": self.stream_chars, "seed": 1, "stream": True}
        try:
            with session.post(self.url + "/generate", json=body, stream=True, timeout=120) as r:
                self.active_streams[threading.get_ident()] = r.headers.get("X-Replica", "")
                # decode_unicode=True would yield bytes (and the join raise) for an answer naming no charset
                text = b"".join(r.iter_content(chunk_size=None)).decode("utf-8", errors="replace") if r.ok else r.text
        except requests.RequestException as e:
            return Result("stream", start, time.monotonic() - start, None, error=type(e).__name__, complete=False)
        finally:
            self.active_streams.pop(threading.get_ident(), None)
        return Result("stream", start, time.monotonic() - start, r.status_code, r.headers.get("X-Replica", ""),
                      r.headers.get("X-Model", ""), "" if r.ok else text[:200],
                      complete=(not r.ok) or len(text) == self.stream_chars)


def served(r: Result) -> bool:
    """A 2xx answer and, for a stream, every requested character: the only outcome that is not a failure."""
    return r.status is not None and 200 <= r.status < 300 and r.complete


def summary(results: list[Result], seconds: float | None = None) -> dict:
    """Counts by outcome, throughput and latency. Strict: what is not ``served`` is ``failed``: a 503 too
    (a shed request is one the client did not get served: a rollout or a drain must cost none), any other
    non-2xx answer, no answer, a stream cut short."""
    ok = [r for r in results if served(r)]
    failed = [r for r in results if not served(r)]
    latencies = sorted(r.seconds for r in ok)
    span = seconds or (max(r.start + r.seconds for r in results) - min(r.start for r in results) if results else 0)

    def pct(q: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    by_replica: dict[str, int] = {}
    for r in ok:
        by_replica[r.replica] = by_replica.get(r.replica, 0) + 1
    non_2xx: dict[str, int] = {}
    for r in failed:
        if r.status is not None and not 200 <= r.status < 300:
            non_2xx[str(r.status)] = non_2xx.get(str(r.status), 0) + 1
    return {"requests": len(results), "ok": len(ok), "failed": len(failed),
            # of the failed: answers by status, and requests with no answer or a stream cut short
            "failed_non_2xx": dict(sorted(non_2xx.items())),
            "failed_no_answer_or_cut": len(failed) - sum(non_2xx.values()),
            "failures": sorted({f"{r.status} {r.error}" for r in failed})[:5],
            "per_s": round(len(ok) / span, 1) if span else None, "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "by_replica": dict(sorted(by_replica.items()))}


def png_digit() -> bytes:
    from harness.data import held_out_digits, png_bytes

    images, _ = held_out_digits()
    return png_bytes(images[0])


# -- scenarios ---------------------------------------------------------------------------------------------


def scenario_throughput(c: Cluster, image: bytes, replicas: int, seconds: float, threads: int) -> dict:
    """Closed-loop /classify through the balancer with ``replicas`` of the running ones in service."""
    running = [s.name for s in c.slots if s.server is not None and s.server.alive()]
    for i, name in enumerate(running):
        c.set_state(name, "ready" if i < replicas else "maint")
    for name in running[:replicas]:
        c.wait_status(name, "UP")
    with Load(c.url, image, threads, max_seconds=seconds) as load:
        time.sleep(seconds)
    for name in running:
        c.set_state(name, "ready")
    return {"replicas": replicas, "threads": threads, **summary(load.results, seconds)}


def scenario_kill(c: Cluster, image: bytes, victim: str, seconds: float, threads: int) -> dict:
    """SIGKILL one replica a third into a load run; then restart it under load and time until the
    balancer sends it requests again."""
    with Load(c.url, image, threads, max_seconds=seconds * 3 + 240) as load:
        time.sleep(seconds / 3)
        killed_at = time.monotonic()
        c.kill(victim)
        time.sleep(seconds * 2 / 3)
        during = summary([r for r in load.results if r.start + r.seconds >= killed_at - 1])
        restart = time.monotonic()
        c.spawn(victim)
        ready_s = c.wait_ready(victim)
        c.wait_status(victim, "UP", timeout_s=30)
        first = None
        while first is None and time.monotonic() - restart < ready_s + 30:
            first = next((r.start + r.seconds - restart for r in list(load.results)
                          if r.replica == victim and r.start >= restart), None)
            time.sleep(0.05)
    return {"victim": victim, "load_threads": threads, "around_kill": during,
            "restart_to_ready_s": round(ready_s, 1),
            "restart_to_first_request_s": round(first, 1) if first is not None else None,
            "whole_run": summary(load.results)}


def scenario_drain(c: Cluster, image: bytes, victim: str, threads: int, streams: int, stream_chars: int,
                   pre_stop_s: float, use_balancer: bool = True) -> dict:
    """Streams + /classify under load; then ``victim`` leaves as a pod does: out of the balancer
    (drain, when ``use_balancer``), ``pre_stop_s`` pause, SIGTERM; its open streams must finish."""
    with Load(c.url, image, threads, streams, stream_chars, max_seconds=300) as load:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and victim not in list(load.active_streams.values()):
            time.sleep(0.05)  # SIGTERM only while the victim has a stream open: that is what is tested
        open_on_victim = list(load.active_streams.values()).count(victim)
        started = time.monotonic()
        if use_balancer:
            c.set_state(victim, "drain")
        time.sleep(pre_stop_s)
        exit_s, code = c.terminate(victim)
        time.sleep(2.0)
        load.stop()
    around = [r for r in load.results if r.start + r.seconds >= started]
    streams_on_victim = [r for r in around if r.kind == "stream" and r.replica == victim]
    return {"victim": victim, "balancer_drain_first": use_balancer, "pre_stop_s": pre_stop_s,
            "sigterm_to_exit_s": round(exit_s, 1), "exit_code": code,
            "streams_on_victim_finished": sum(served(r) for r in streams_on_victim),
            "streams_on_victim": len(streams_on_victim), "streams_open_on_victim_at_drain": open_on_victim,
            "classify": summary([r for r in around if r.kind == "classify"]),
            "streams": summary([r for r in around if r.kind == "stream"])}


def scenario_roll(c: Cluster, image: bytes, old: list[str], new: list[str], new_env: dict[str, str],
                  threads: int, pre_stop_s: float) -> dict:
    """Rolling update, maxSurge 1 / maxUnavailable 0: for each old replica, start a new one with
    ``new_env`` (e.g. NNSERVE_LENET5_TAG=lenet5:<B>), wait until the balancer has it UP, then drain and
    stop the old one. Which version answered each request shows whether traffic moved cleanly."""
    steps = []
    with Load(c.url, image, threads, max_seconds=600) as load:
        time.sleep(1.0)
        for before, after in zip(old, new, strict=True):
            start = time.monotonic()
            c.spawn(after, new_env)
            ready_s = c.wait_ready(after)
            c.wait_status(after, "UP", timeout_s=30)
            c.set_state(before, "drain")
            time.sleep(pre_stop_s)
            exit_s, _ = c.terminate(before)
            steps.append({"new": after, "old": before, "ready_s": round(ready_s, 1),
                          "old_exit_s": round(exit_s, 1), "step_s": round(time.monotonic() - start, 1)})
        time.sleep(1.0)
    answered = [r.version for r in sorted(load.results, key=lambda r: r.start + r.seconds) if served(r)]
    first_new = next((i for i, v in enumerate(answered) if v != answered[0]), len(answered))
    last_old = max((i for i, v in enumerate(answered) if v == answered[0]), default=-1)
    return {"steps": steps, **summary(load.results), "first_version": answered[0] if answered else None,
            "last_version": answered[-1] if answered else None,
            "versions": sorted(set(answered)),
            # responses between the first new-version answer and the last old-version one: both served
            "overlap_responses": max(0, last_old - first_new + 1)}


def tiny_store() -> dict[str, str]:
    """The test suite's tiny models (trained in seconds, tests/conftest.py) exported into a temporary
    BENTOML_HOME, plus a second export of lenet5 to roll to: the replicas' env."""
    home = Path(tempfile.mkdtemp(prefix="nnserve-cluster-store-"))
    os.environ["BENTOML_HOME"] = str(home / "bentoml")  # before bentoml is imported (export imports it)
    from export.pipeline import Options, export_artifact
    from models.train import main as train

    env = {"BENTOML_HOME": os.environ["BENTOML_HOME"]}
    opts = Options(bench_runs=3, report_dir=home / "exported")
    for kind in ("lenet5", "vgg_fc7", "char_lstm", "char_gru"):
        train([kind, "--tiny", "--out", str(home / "artifacts" / kind)])
        env[f"NNSERVE_{kind.upper()}_TAG"] = export_artifact(home / "artifacts" / kind, opts).tags["fp32"]
    env["NEW_LENET5_TAG"] = export_artifact(home / "artifacts" / "lenet5", opts).tags["fp32"]
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load phase")
    parser.add_argument("--threads", type=int, default=8, help="/classify client threads")
    parser.add_argument("--streams", type=int, default=4, help="streamed /generate client threads (drain)")
    parser.add_argument("--stream-chars", type=int, default=400)
    parser.add_argument("--pre-stop", type=float, default=2.0, help="pause between drain and SIGTERM (s)")
    parser.add_argument("--new-lenet5-tag", help="lenet5 tag for the rolling update (default: roll the same)")
    parser.add_argument("--tiny", action="store_true", help="train the tiny test models into a temporary store "
                        "(about a minute) and roll lenet5 to a second export of it; default: the store's models")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "loadtest" / "results" / "cluster.json")
    args = parser.parse_args(argv)
    haproxy_binary()
    env: dict[str, str] = {}
    if args.tiny:
        env = tiny_store()
        args.new_lenet5_tag = env.pop("NEW_LENET5_TAG")
    image = png_digit()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                    "load_avg_start": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}}
    report["env"] = env

    def say(what: str) -> None:  # progress on stderr; the report goes to stdout and --out
        print(f"[cluster {time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)

    say("starting HAProxy and replicas r1, r2")
    with cluster(env) as c:
        c.start_haproxy()
        for name in ("r1", "r2"):
            c.spawn(name)
        report["startup_s"] = [round(c.wait_ready(name), 1) for name in ("r1", "r2")]
        say("throughput, 1 then 2 replicas")
        report["throughput"] = [scenario_throughput(c, image, n, args.seconds, args.threads) for n in (1, 2)]
        say("SIGKILL r2 under load, restart it")
        report["kill"] = scenario_kill(c, image, "r2", args.seconds, args.threads)
        say("SIGTERM r2 without draining it first")
        report["sigterm_without_drain"] = scenario_drain(c, image, "r2", args.threads, args.streams,
                                                         args.stream_chars, 0.0, use_balancer=False)
        c.spawn("r2")
        c.wait_ready("r2")
        c.wait_status("r2", "UP")
        say("drain r2 (balancer drain, preStop pause, SIGTERM) with streams open")
        report["drain"] = scenario_drain(c, image, "r2", args.threads, args.streams, args.stream_chars,
                                         args.pre_stop)
        c.spawn("r2")
        c.wait_ready("r2")
        c.wait_status("r2", "UP")
        new_env = {"NNSERVE_LENET5_TAG": args.new_lenet5_tag} if args.new_lenet5_tag else {}
        say("rolling r1, r2 -> r3, r4 (new lenet5 version)")
        report["roll"] = scenario_roll(c, image, ["r1", "r2"], ["r3", "r4"], new_env, args.threads, args.pre_stop)
    report["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)  # atomic: a reader never sees half a report
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
