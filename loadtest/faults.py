"""Fault scenarios against a real ``bentoml serve``: a worker killed under load, a model that cannot load,
SIGTERM with streams in flight, large bodies past the limits. ``tests/test_faults.py`` asserts on what
they return; ``python -m loadtest.faults`` runs them on the store's models and prints the figures of
docs/reliability.md as JSON.

Every client is a Python thread with ``requests``, only to 127.0.0.1, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from harness.server import BackgroundThreads, LiveServer, running_server, worker_pids

PROBE_TIMEOUT_S = 5.0  # a health probe that takes longer counts as not answered
# BentoML logs this once per worker when its start-up hook (ours waits for the models) is done; from then
# on the worker accepts connections. Counting it is how a client tells that a replacement worker serves.
STARTED_LINE = "Completed async startup hook: start"


@dataclass
class Outcome:
    """One client request: start and end on time.monotonic(), HTTP status or the exception's name."""
    start: float
    end: float
    status: int | str

    @property
    def ok(self) -> bool:
        return self.status == 200


def digit_png() -> bytes:
    from harness.data import held_out_digits, png_bytes

    return png_bytes(held_out_digits()[0][0])


class ClassifyLoad(BackgroundThreads):
    """``threads`` closed-loop ``/classify`` clients (one request in flight each) until ``stop()``."""

    def __init__(self, url: str, image: bytes, threads: int) -> None:
        self.url, self.image = url, image
        self.outcomes: list[Outcome] = []
        super().__init__([self._run] * threads)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                response = session.post(f"{self.url}/classify", files={"image": self.image}, timeout=30)
                status: int | str = response.status_code
            except requests.RequestException as e:
                status = type(e).__name__
                session = requests.Session()  # its connection went with the worker
            self.outcomes.append(Outcome(start, time.monotonic(), status))


class HealthProbe(BackgroundThreads):
    """``/livez`` and ``/readyz`` every ``interval_s`` on fresh connections until ``stop()``."""

    def __init__(self, url: str, interval_s: float = 0.05) -> None:
        self.url, self.interval_s = url, interval_s
        self.outcomes: dict[str, list[Outcome]] = {"/livez": [], "/readyz": []}
        super().__init__([self._run])

    def _run(self) -> None:
        while not self._stop.is_set():
            for path, outcomes in self.outcomes.items():
                start = time.monotonic()
                try:
                    status: int | str = requests.get(self.url + path, timeout=PROBE_TIMEOUT_S).status_code
                except requests.RequestException as e:
                    status = type(e).__name__
                outcomes.append(Outcome(start, time.monotonic(), status))
            self._stop.wait(self.interval_s)


def started_workers(server: LiveServer) -> int:
    """Workers (first ones and replacements) that have finished starting and accept connections."""
    return server.log_path.read_text(errors="replace").count(STARTED_LINE) if server.log_path.exists() else 0


def wait_until(condition, timeout_s: float = 120.0) -> float | None:
    """Seconds until ``condition()`` held (polled every 50 ms), None if it did not within ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def kill_worker_under_load(server: LiveServer, image: bytes, threads: int = 4, before_s: float = 2.0,
                           after_s: float = 5.0, workers: int = 2, kills_before: int = 0) -> dict:
    """SIGKILL one worker while ``threads`` clients send /classify; health probed throughout.

    Starts once ``workers`` workers serve (``kills_before``: workers killed earlier on this server, whose
    replacements must be serving too: killing the only serving worker measures something else), and
    returns once the replacement serves. Returns the counts and times (seconds from the kill) the
    reliability doc reports: failed requests, first success after the kill, end of the last failure,
    first whole second with no failure, when the replacement started and when it served."""
    if wait_until(lambda: started_workers(server) >= workers + kills_before) is None:
        raise RuntimeError(f"fewer than {workers} workers serving:\n{server.log()}")
    before = worker_pids(server)
    started = started_workers(server)
    with HealthProbe(server.http_url) as probe, ClassifyLoad(server.http_url, image, threads) as load:
        time.sleep(before_s)
        victim = before[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # Load goes on for after_s and until the replacement serves: the arbiter reaps the dead worker
        # and starts the replacement on its own schedule (~5 s measured), which then loads its models.
        replaced_s = serving_s = None
        while (elapsed := time.monotonic() - killed_at) < after_s or (serving_s is None and elapsed < 120):
            if replaced_s is None and set(worker_pids(server)) - set(before):
                replaced_s = round(elapsed, 2)
            if serving_s is None and started_workers(server) > started:
                serving_s = round(elapsed, 2)
            time.sleep(0.05)
    after = worker_pids(server)
    failed = [o for o in load.outcomes if not o.ok]
    successes_after = [o.end - killed_at for o in load.outcomes if o.ok and o.start >= killed_at]
    return {
        "threads": threads, "workers_before": before, "victim": victim, "workers_after": after,
        "replacement_started_s": replaced_s, "replacement_serving_s": serving_s,
        "requests": len(load.outcomes), "failed": len(failed),
        "failed_statuses": sorted({str(o.status) for o in failed}),
        "failed_in_flight_at_kill": sum(o.start <= killed_at <= o.end for o in failed),
        "first_success_after_kill_s": min(successes_after, default=None),
        "last_failure_end_s": max((o.end - killed_at for o in failed), default=None),
        "first_clean_second": first_clean_second(load.outcomes, killed_at),
        "health": {path: summarize(outcomes, killed_at) for path, outcomes in probe.outcomes.items()},
    }


def first_clean_second(outcomes: list[Outcome], since: float) -> int | None:
    """Index n of the first second [since + n, since + n + 1) in which requests ended and none failed."""
    seconds: dict[int, list[bool]] = {}
    for o in outcomes:
        if o.end >= since:
            seconds.setdefault(int(o.end - since), []).append(o.ok)
    return next((n for n in sorted(seconds) if all(seconds[n])), None)


def summarize(outcomes: list[Outcome], killed_at: float) -> dict:
    """Answers by status, the slowest answer in seconds, and the failures that were not in flight at the
    kill (a probe the victim had accepted dies with it, like any of its requests)."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[str(o.status)] = counts.get(str(o.status), 0) + 1
    return {"statuses": counts, "max_s": round(max((o.end - o.start for o in outcomes), default=0.0), 3),
            "failed_not_in_flight_at_kill": sum(not o.ok and not o.start <= killed_at <= o.end for o in outcomes)}


def truncated_copy(source_tag: str, name: str) -> str:
    """Register a copy of the store model ``source_tag`` as ``name`` with its ONNX file cut to half its
    size (a failed copy or disk); returns the new tag. Uses the store of this process's BENTOML_HOME."""
    return store_copy(source_tag, name, truncate=True)


def store_copy(source_tag: str, name: str, truncate: bool = False) -> str:
    """Register a copy of the store model ``source_tag`` as a new version of ``name`` (its ONNX file cut to
    half its size with ``truncate``); returns the new tag."""
    import bentoml

    source = bentoml.models.get(source_tag)
    metadata: dict[str, Any] = dict(source.info.metadata)
    with bentoml.models.create(name, metadata=metadata, labels=dict(source.info.labels)) as model:
        for path in Path(source.path).iterdir():
            if path.is_file() and path.name != "model.yaml":
                shutil.copy2(path, model.path_of(path.name))
        if truncate:
            onnx = Path(model.path_of(metadata["onnx_file"]))
            onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    return str(model.tag)


def wait_loaded(server: LiveServer, timeout_s: float = 120.0) -> list[dict]:
    """GET /models once no model is loading any more (ready or failed) in the worker that answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        models = requests.get(f"{server.http_url}/models", timeout=30).json()["models"]
        if all(m["state"] != "loading" for m in models) or time.monotonic() > deadline:
            return models
        time.sleep(0.2)


def corrupt_model_report(server: LiveServer, image: bytes, watch_s: float = 5.0) -> dict:
    """What a server serving a truncated lenet5 answers once loading is over; worker PIDs watched for
    ``watch_s`` (a crash loop would replace them). Start the server with ready_path="/livez"."""
    wait_loaded(server)
    pids = worker_pids(server)
    time.sleep(watch_s)
    url = server.http_url

    def answer(response: requests.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = response.text[:500]
        return {"status": response.status_code, "body": body}

    metrics = requests.get(f"{url}/metrics", timeout=30).text
    return {
        "workers_before": pids, "workers_after": worker_pids(server),
        "classify_lenet5": answer(requests.post(f"{url}/classify", files={"image": image}, timeout=30)),
        "features_vgg_fc7": answer(requests.post(f"{url}/features", files={"image": image}, timeout=30)),
        "generate_char_lstm": answer(requests.post(f"{url}/generate", timeout=30,
                                                   json={"prompt": "The ", "max_new_chars": 20, "seed": 1})),
        "models": answer(requests.get(f"{url}/models", timeout=30)),
        "v2_lenet5_ready": answer(requests.get(f"{url}/v2/models/lenet5/ready", timeout=30)),
        "readyz": answer(requests.get(f"{url}/readyz", timeout=30)),
        "livez": answer(requests.get(f"{url}/livez", timeout=30)),
        "metric_lines": [line for line in metrics.splitlines() if line.startswith("nnserve_model_ready")],
    }


def sigterm_with_streams(server: LiveServer, streams: int, max_new_chars: int, exit_bound_s: float) -> dict:
    """Open ``streams`` streamed /generate requests, SIGTERM the arbiter once the first characters have
    arrived, probe with new requests until the process exits (at most ``exit_bound_s``)."""
    results: dict[int, dict] = {}
    started = threading.Event()
    sent_at = 0.0  # when SIGTERM went out (time.monotonic())

    def stream(i: int) -> None:
        nonlocal sent_at
        chars, status, error = 0, None, ""
        try:
            with requests.post(f"{server.http_url}/generate", stream=True, timeout=120,
                               json={"prompt": "The ", "max_new_chars": max_new_chars, "seed": i,
                                     "stream": True}) as response:
                status = response.status_code
                for chunk in response.iter_content(None, decode_unicode=True):
                    started.set()
                    chars += len(chunk)
        except requests.RequestException as e:
            error = type(e).__name__
        results[i] = {"status": status, "chars": chars, "complete": status == 200 and chars == max_new_chars,
                      "error": error, "end_s": round(time.monotonic() - sent_at, 2) if sent_at else None}

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    if not started.wait(60):
        raise RuntimeError(f"no stream started within 60 s:\n{server.log()}")
    sent_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    # New clients that have not heard of the shutdown: a fresh connection every 0.2 s until exit.
    probes: list[tuple[float, str]] = []
    deadline = sent_at + exit_bound_s
    while server.alive() and time.monotonic() < deadline:
        start = time.monotonic()
        try:
            outcome = str(requests.get(f"{server.http_url}/livez", timeout=1).status_code)
        except requests.RequestException as e:
            outcome = type(e).__name__
        probes.append((round(start - sent_at, 2), outcome))
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    try:
        server.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        exit_s: float | None = time.monotonic() - sent_at
    except subprocess.TimeoutExpired:
        exit_s = None
    unserved = [t for t, outcome in probes if not outcome.isdigit()]
    served_later = sum(outcome.isdigit() for t, outcome in probes if unserved and t > unserved[0])
    return {"streams": [results.get(i, {"status": None, "complete": False}) for i in range(streams)],
            "max_new_chars": max_new_chars, "complete": sum(r["complete"] for r in results.values()),
            "probes_after_sigterm": probes, "first_unserved_probe_s": unserved[0] if unserved else None,
            "served_after_first_unserved": served_later,
            "exit_s": None if exit_s is None else round(exit_s, 2), "returncode": server.process.returncode}


def large_bodies(server: LiveServer, rounds: int, sizes_mib: tuple[int, ...] = (40, 48, 56, 64)) -> dict:
    """Bodies of ``sizes_mib`` (and a few bytes) with Content-Length and chunked, none of which may stay in
    a worker's memory: past the /classify (10 MiB) and /generate (64 KiB) limits, so 413 before they are
    read; /v2 takes up to 64 MiB, so it reads the smaller ones whole and answers 400 (not JSON), the 64 MiB
    one 413. RSS of every worker after one warm-up round and after ``rounds`` more (each round: every size
    x every request below)."""
    import psutil

    url = server.http_url
    boundary = "nnserve-large-body"
    # Starts like a real upload; the limit (10 MiB) is passed long before the part ends.
    form_head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                 "Content-Type: image/png\r\n\r\n").encode()
    kinds = {
        "classify": ("/classify", {"Content-Type": f"multipart/form-data; boundary={boundary}"}, form_head),
        "generate": ("/generate", {"Content-Type": "application/json"}, b'{"prompt": "'),
        "v2": ("/v2/models/lenet5/infer", {"Content-Type": "application/json"}, b'{"inputs": [{"data": ['),
    }

    def send(path: str, headers: dict, head: bytes, size: int, chunked: bool) -> int | str:
        filler = b"7" * (1 << 20)

        def chunks():
            yield head
            for _ in range(size >> 20):
                yield filler
        try:
            data = chunks() if chunked else head + filler * (size >> 20)
            return requests.post(url + path, data=data, headers=headers, timeout=120).status_code
        except requests.RequestException as e:  # the server may close while we are still sending
            return type(e).__name__

    def one_round() -> dict[str, int]:
        statuses: dict[str, int] = {}
        for size in sizes_mib:
            for kind, (path, headers, head) in kinds.items():
                for chunked in (False, True):
                    status = send(path, headers, head, size << 20, chunked)
                    key = f"{kind} {'chunked' if chunked else 'content-length'} {status}"
                    statuses[key] = statuses.get(key, 0) + 1
        return statuses

    def rss() -> dict[int, float]:
        return {pid: round(psutil.Process(pid).memory_info().rss / 2**20, 1) for pid in worker_pids(server)}

    first = one_round()
    before = rss()
    statuses: dict[str, int] = dict(first)
    for _ in range(rounds):
        for key, n in one_round().items():
            statuses[key] = statuses.get(key, 0) + n
    after = rss()
    return {"sizes_mib": list(sizes_mib), "rounds": rounds, "requests": sum(statuses.values()),
            "mib_sent": sum(sizes_mib) * len(kinds) * 2 * (rounds + 1), "statuses": statuses,
            "rss_mib_before": before, "rss_mib_after": after,
            "growth_mib": {pid: round(after[pid] - before[pid], 1) for pid in before if pid in after}}


def main(argv: list[str] | None = None) -> int:
    """Every scenario on the models of the store in BENTOML_HOME (default ~/bentoml); JSON on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4, help="/classify client threads in the kill run")
    parser.add_argument("--streams", type=int, default=6, help="streams open at SIGTERM")
    parser.add_argument("--kills", type=int, default=3, help="workers killed one after the other (same server)")
    parser.add_argument("--scenarios", default="kill,sigterm,bound,large,corrupt",
                        help="comma-separated subset of kill,sigterm,bound,large,corrupt")
    parser.add_argument("--large-rounds", type=int, default=10, help="rounds of large bodies (each: 24 bodies)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    store = home / "models"
    work = Path(tempfile.mkdtemp(prefix="nnserve-faults-"))

    def say(what: str) -> None:
        print(f"[faults] {what}", file=sys.stderr, flush=True)

    image = digit_png()
    report: dict = {"store": str(store)}
    # A queue timeout long enough for streams waiting for the single decode slot of the SIGTERM runs.
    env = {"BENTOML_HOME": str(home), "NNSERVE_WORKERS": "2",
           "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    scenarios = set(args.scenarios.split(","))
    if "kill" in scenarios:
        with running_server(work / "kill.log", env) as server:
            report["kill"] = []
            for n in range(args.kills):
                say(f"worker SIGKILL under load ({n + 1} of {args.kills})")
                report["kill"].append(kill_worker_under_load(server, image, threads=args.threads, kills_before=n))
    if "sigterm" in scenarios:
        say("SIGTERM with streams open (2000 characters each, one decode slot: they run one after the other)")
        with running_server(work / "sigterm.log", {**env, "NNSERVE_GENERATION_BATCH_SIZE": "1"}) as server:
            report["sigterm"] = sigterm_with_streams(server, args.streams, 2000, exit_bound_s=120)
    if "bound" in scenarios:
        say("SIGTERM with a 1 s drain bound")
        with running_server(work / "sigterm-bound.log", {**env, "NNSERVE_GENERATION_BATCH_SIZE": "1",
                                                          "NNSERVE_DRAIN_TIMEOUT_S": "1"}) as server:
            report["sigterm_bound_1s"] = sigterm_with_streams(server, args.streams, 2000, exit_bound_s=120)
    if "large" in scenarios:
        say(f"large bodies past the limits, {args.large_rounds + 1} rounds")
        with running_server(work / "large.log", env) as server:
            report["large_bodies"] = large_bodies(server, args.large_rounds)
    if "corrupt" not in scenarios:
        return finish(report, args.out, work)
    say("truncated lenet5 (in a scratch store beside the real one)")
    scratch = work / "scratch-home" / "models"
    scratch.mkdir(parents=True)
    for entry in store.iterdir():  # the real models read-only through symlinks; the copy is written here
        (scratch / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-c", "import sys; from loadtest.faults import truncated_copy; "
                    "print(truncated_copy('lenet5:latest', 'lenet5-truncated'))"], check=True,
                   env={**os.environ, "BENTOML_HOME": str(scratch.parent)}, cwd=Path(__file__).resolve().parent.parent)
    with running_server(work / "corrupt.log", {**env, "BENTOML_HOME": str(scratch.parent),
                                               "NNSERVE_LENET5_TAG": "lenet5-truncated:latest"},
                        ready_path="/livez") as server:
        report["corrupt"] = corrupt_model_report(server, image)
    return finish(report, args.out, work)


def finish(report: dict, out: Path | None, work: Path) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
