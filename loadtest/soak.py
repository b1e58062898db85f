"""Soak run: a mixed load against a real ``bentoml serve`` for N seconds while the resident memory (RSS) of
every server process (the arbiter and each worker) is sampled once a second.

``python -m loadtest.soak --seconds 600`` (``make soak``) starts the server on the models of the store in
BENTOML_HOME, runs the load, writes a CSV of the samples, a PNG plot of RSS over time per process and a JSON summary,
and exits 1 if a worker grew past the bound (``--bound-mib``) after the warm-up. ``tests/test_soak.py``
runs the same for seconds on the tiny models.

The load, one client thread per kind, closed loop: ``/classify``, ``/features``, ``/generate``
(streamed and not), KServe v2 ``/infer``, and bad requests (a corrupt image, an unknown model, a prompt
outside the vocabulary, a malformed JSON body), each checked against its expected status. Only
127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests

from harness.server import LiveServer, running_server

MIB = 1 << 20
# Chosen from measurements (docs/reliability.md): after the warm-up a worker's RSS grew at most 0.3 MiB
# over 10 minutes and ~115,000 requests. 16 MiB leaves room for allocator noise (a rare large batch
# growing an arena) while a leak of ~150 bytes per request passes it within the 10-minute run.
DEFAULT_BOUND_MIB = 16.0


@dataclass
class Sample:
    t: float  # seconds since the load started
    pid: int
    role: str  # arbiter | worker-<n> (n: order of first appearance; a restarted worker gets a new n)
    rss_mib: float


@dataclass
class Tally:
    """Requests by kind: expected answers, unexpected ones (with a few examples), 503s (load shed)."""
    expected: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    shed: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status: int | str, want: int, detail: str = "") -> None:
        with self.lock:
            if status == want:
                self.expected[kind] += 1
            elif status == 503:
                self.shed[kind] += 1
            else:
                self.unexpected[kind] += 1
                if len(self.examples) < 10:
                    self.examples.append(f"{kind}: {status} (wanted {want}) {detail[:200]}")

    def total(self) -> int:
        return sum(self.expected.values()) + sum(self.unexpected.values()) + sum(self.shed.values())


def requests_by_kind(url: str, image: bytes, prompt: str) -> dict[str, Callable[[requests.Session], tuple]]:
    """kind -> one request: (status or exception name, expected status, detail)."""
    x = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    v2_body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}

    def classify(s: requests.Session) -> tuple:
        r = s.post(f"{url}/classify", files={"image": image}, data={"top_k": "3"}, timeout=60)
        return r.status_code, 200, r.text

    def features(s: requests.Session) -> tuple:
        r = s.post(f"{url}/features", files={"image": image}, data={"normalize": "true"}, timeout=60)
        return r.status_code, 200, r.text

    def generate(s: requests.Session) -> tuple:
        r = s.post(f"{url}/generate", json={"prompt": prompt, "max_new_chars": 100, "seed": 1}, timeout=60)
        return r.status_code, 200, r.text

    def generate_stream(s: requests.Session) -> tuple:
        with s.post(f"{url}/generate", json={"prompt": prompt, "max_new_chars": 200, "stream": True}, timeout=60,
                    stream=True) as r:
            # decode_unicode=True would yield bytes (and the join raise) for an answer naming no charset
            text = b"".join(r.iter_content(None)).decode("utf-8", errors="replace")
        complete = r.status_code == 200 and len(text) == 200
        return (200 if complete else f"{r.status_code} after {len(text)} characters"), 200, text

    def v2(s: requests.Session) -> tuple:
        r = s.post(f"{url}/v2/models/lenet5/infer", json=v2_body, timeout=60)
        return r.status_code, 200, r.text

    mistakes = itertools.cycle(range(4))

    def bad(s: requests.Session) -> tuple:
        # A different mistake each time, in turn: each must get its 4xx, none a 5xx.
        turn = next(mistakes)
        if turn == 0:
            r, want = s.post(f"{url}/classify", files={"image": image[: len(image) // 2]}, timeout=60), 400
        elif turn == 1:
            r, want = s.post(f"{url}/classify", files={"image": image}, data={"model": "nope"}, timeout=60), 404
        elif turn == 2:
            r, want = s.post(f"{url}/generate", json={"prompt": "\u2603" * 10}, timeout=60), 400
        else:
            r, want = s.post(f"{url}/generate", data=b'{"prompt": ', timeout=60,
                             headers={"content-type": "application/json"}), 400
        return r.status_code, want, r.text

    return {"classify": classify, "features": features, "generate": generate, "generate_stream": generate_stream,
            "v2": v2, "bad": bad}


class Sampler:
    """RSS of the arbiter and of every process under it, once per ``interval_s``."""

    def __init__(self, root_pid: int, interval_s: float = 1.0) -> None:
        self.root = psutil.Process(root_pid)
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.roles: dict[int, str] = {root_pid: "arbiter"}
        self.start = time.monotonic()

    def sample(self) -> None:
        t = time.monotonic() - self.start
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in processes:
            if p.pid not in self.roles:
                self.roles[p.pid] = f"worker-{sum(r.startswith('worker') for r in self.roles.values()) + 1}"
            try:
                self.samples.append(Sample(round(t, 2), p.pid, self.roles[p.pid], p.memory_info().rss / MIB))
            except psutil.NoSuchProcess:
                pass

    def latest(self) -> dict[str, float]:
        last = {}
        for s in self.samples:
            last[s.role] = s.rss_mib
        return last


def growth(samples: list[Sample], warmup_s: float) -> dict[str, dict]:
    """Per process: RSS at the first sample after the warm-up (baseline), the largest after it, growth."""
    out: dict[str, dict] = {}
    for role in sorted({s.role for s in samples}):
        after = [s for s in samples if s.role == role and s.t >= warmup_s]
        if not after:
            continue
        base, peak, end = after[0].rss_mib, max(s.rss_mib for s in after), after[-1].rss_mib
        out[role] = {"pid": after[0].pid, "baseline_mib": round(base, 1), "peak_mib": round(peak, 1),
                     "end_mib": round(end, 1), "growth_mib": round(peak - base, 1)}
    return out


def soak(server: LiveServer, seconds: float, warmup_s: float, bound_mib: float, out_dir: Path,
         plot_path: Path | None = None, progress_s: float = 10.0, log: Callable[[str], None] | None = None) -> dict:
    """Run the load on ``server`` for ``seconds``; write soak.csv, soak.json and the plot (default
    ``out_dir/soak-rss.png``); return the summary (``ok``: no worker grew past ``bound_mib`` and
    every answer was the expected one or a 503)."""
    from harness.data import held_out_digits, png_bytes, prompts, served_vocab

    say = log or (lambda line: print(f"[soak] {line}", file=sys.stderr, flush=True))
    image = png_bytes(held_out_digits()[0][0])
    kinds = requests_by_kind(server.http_url, image, prompts(1, vocab=served_vocab(server.http_url))[0])
    tally, stop = Tally(), threading.Event()

    def client(kind: str, one: Callable) -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                status, want, detail = one(session)
            except requests.RequestException as e:
                status, want, detail = type(e).__name__, 200, str(e)
                session = requests.Session()
            tally.add(kind, status, want, detail)

    sampler = Sampler(server.process.pid)
    threads = [threading.Thread(target=client, args=item, daemon=True, name=f"soak-{item[0]}")
               for item in kinds.items()]
    for thread in threads:
        thread.start()
    next_progress = progress_s
    while (elapsed := time.monotonic() - sampler.start) < seconds:
        sampler.sample()
        if elapsed >= next_progress:
            rss = ", ".join(f"{role} {mib:.0f}" for role, mib in sorted(sampler.latest().items()))
            say(f"{elapsed:5.0f} s  {tally.total()} requests ({sum(tally.unexpected.values())} unexpected, "
                f"{sum(tally.shed.values())} shed)  RSS MiB: {rss}")
            next_progress += progress_s
        time.sleep(max(0.0, sampler.interval_s - (time.monotonic() - sampler.start - elapsed)))
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    sampler.sample()

    per_process = growth(sampler.samples, warmup_s)
    workers = {role: g for role, g in per_process.items() if role.startswith("worker")}
    summary = {
        "seconds": seconds, "warmup_s": warmup_s, "bound_mib": bound_mib,
        "requests": tally.total(), "expected": dict(tally.expected), "unexpected": dict(tally.unexpected),
        "shed_503": dict(tally.shed), "unexpected_examples": tally.examples, "processes": per_process,
        "worst_worker_growth_mib": max((g["growth_mib"] for g in workers.values()), default=None),
        "restarted_workers": len(workers) - len(worker_roles_alive(sampler)),
    }
    summary["within_bound"] = bool(workers) and all(g["growth_mib"] <= bound_mib for g in workers.values())
    summary["ok"] = summary["within_bound"] and not tally.unexpected
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(sampler.samples, out_dir / "soak.csv")
    write_atomic(out_dir / "soak.json", json.dumps(summary, indent=2).encode())
    plot(sampler.samples, plot_path or out_dir / "soak-rss.png", warmup_s, bound_mib, per_process)
    say(f"done: {tally.total()} requests, worst worker growth after warm-up "
        f"{summary['worst_worker_growth_mib']} MiB (bound {bound_mib} MiB), "
        f"{sum(tally.unexpected.values())} unexpected answers -> {'ok' if summary['ok'] else 'FAILED'}")
    return summary


def worker_roles_alive(sampler: Sampler) -> list[str]:
    last_t = max((s.t for s in sampler.samples), default=0.0)
    return [s.role for s in sampler.samples if s.t == last_t and s.role.startswith("worker")]


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these are reports
    os.replace(tmp, path)


def write_csv(samples: list[Sample], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["t_s", "pid", "role", "rss_mib"])
    writer.writerows([s.t, s.pid, s.role, round(s.rss_mib, 2)] for s in samples)
    write_atomic(path, buffer.getvalue().encode())


def plot(samples: list[Sample], path: Path, warmup_s: float, bound_mib: float, per_process: dict) -> None:
    """RSS over time, one line per process; the warm-up end and each worker's bound dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for role in sorted({s.role for s in samples}):
        mine = [s for s in samples if s.role == role]
        line, = ax.plot([s.t for s in mine], [s.rss_mib for s in mine], label=f"{role} (pid {mine[0].pid})")
        if role in per_process and role.startswith("worker"):
            ax.axhline(per_process[role]["baseline_mib"] + bound_mib, color=line.get_color(), linestyle=":",
                       linewidth=1)
    ax.axvline(warmup_s, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"RSS of every server process under mixed load (dotted: baseline + {bound_mib:g} MiB bound)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline sample")
    parser.add_argument("--bound-mib", type=float, default=DEFAULT_BOUND_MIB,
                        help="largest growth of a worker's RSS after the warm-up")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"), help="soak.csv, soak.json, plot")
    parser.add_argument("--plot", type=Path, help="the PNG (default: OUT/soak-rss.png)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    store = home / "models"
    work = Path(tempfile.mkdtemp(prefix="nnserve-soak-"))
    env = {"BENTOML_HOME": str(home), "NNSERVE_WORKERS": str(args.workers)}
    print(f"[soak] serving the models of {store}; server log {work / 'server.log'}", file=sys.stderr, flush=True)
    with running_server(work / "server.log", env) as server:
        summary = soak(server, args.seconds, args.warmup, args.bound_mib, args.out, args.plot)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
