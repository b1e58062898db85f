"""Issue 15, measured: what changing the served models costs while a real two-worker server serves.

``python -m loadtest.lifecycle`` (``make lifecycle``): default-version switches and load/unload cycles under a
32-connection wrk ``/classify`` load with ``/generate`` streams running, the RSS of every worker over 50
load/unload cycles, the time from a load call to every worker serving, and management under stress (two
clients changing the models back to back under the same load; ``--stress-only`` runs that part alone).
Writes loadtest/results/lifecycle.json, the results section of docs/lifecycle.md and docs/img/lifecycle-*.png.
What is measured and the targets: docs/lifecycle.md. Models: the user's store (BENTOML_HOME, else
~/bentoml); the scenario's own copies (``lifecycle-digits``, ``lifecycle-vgg``) are deleted at the end.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import secrets
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from harness.server import REPO_ROOT, LiveServer, running_server
from loadtest.bench.common import load_average, machine, write_atomic

MIB = 1 << 20
TARGETS = {"non_2xx": 0, "cut_streams": 0, "p99_ratio": 1.5, "failed_changes": 0, "rss_mib": 10.0,
           "change_answer_s": 5.0}
DIGITS, VGG = "lifecycle-digits", "lifecycle-vgg"  # the scenario's store names
SERVED = "lenet5"  # lifecycle-digits is served under this name: /classify's default model
BEGIN, END = "<!-- lifecycle:begin -->", "<!-- lifecycle:end -->"


def say(line: str) -> None:
    print(f"[lifecycle {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# -- pure parts (tests/test_loadtest_lifecycle.py) ------------------------------------------------------------

def parse_sse(text: str) -> tuple[str, dict | None, str | None]:
    """A /generate event stream -> (the characters of its data events, the ``end`` event's JSON or None,
    the ``error`` event's data or None)."""
    chars, end, error = [], None, None
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data = "", []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        joined = "\n".join(data)
        if event == "end":
            end = json.loads(joined)
        elif event == "error":
            error = joined
        elif not event:
            chars.append(joined)
    return "".join(chars), end, error


def stream_cut(status: int | str, body: str, want_chars: int) -> str | None:
    """Why a stream counts as cut (None: complete): not 200, an error event, no end event, short."""
    if status != 200:
        return f"status {status}"
    try:
        text, end, error = parse_sse(body)
    except ValueError as e:
        return f"unreadable end event ({e})"
    if error is not None:
        return f"error event: {error[:200]}"
    if end is None:
        return f"no end event after {len(text)} characters"
    if len(text) != want_chars:
        return f"{len(text)} characters of {want_chars}"
    return None


def http_codes(metrics_text: str) -> dict[tuple[str, str], float]:
    """``nnserve_http_responses_total`` by (route, code) from a /metrics page."""
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("nnserve_http_responses_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            out[(labels.get("route", ""), labels.get("code", ""))] = float(line.rsplit(" ", 1)[1])
    return out


def codes_delta(before: dict, after: dict) -> dict[str, int]:
    """Responses counted between two scrapes, as {"route code": n} (zero rows left out)."""
    return {f"{r} {c}": int(after[(r, c)] - before.get((r, c), 0)) for r, c in sorted(after)
            if after[(r, c)] - before.get((r, c), 0) > 0}


def median_p99(phases: list[dict], kind: str) -> float:
    return statistics.median(p["p99_ms"] for p in phases if p["kind"] == kind)


def judge(result: dict) -> list[dict]:
    """The table of docs/lifecycle.md: one row per target, with the measured value and met / MISSED (the
    parts a run left out, e.g. ``--stress-only``, have no rows)."""
    rows = judge_parts(result) if "load" in result else []
    return rows + (judge_stress(result["stress"]) if "stress" in result else [])


def judge_stress(stress: dict) -> list[dict]:
    """Part 4, management under stress: every change answered 2xx (or 409 to a race's loser) within
    TARGETS["change_answer_s"]; no inference answer other than 2xx; no cut stream; every worker's final
    report at the final generation."""
    changes = stress["changes"]
    bad = [c for c in changes if c["status"] not in (200, 409)]
    slow = [c for c in changes if c["call_s"] > TARGETS["change_answer_s"]]
    slowest = max((c["call_s"] for c in changes), default=0.0)
    non_2xx = stress["wrk_errors"] + stress["probe_failures"] + stress["stream_not_200"]
    finals = ", ".join(f"worker {w}: {g}" for w, g in sorted(stress["final_reports"].items()))
    rows = [
        ("4a", f"changes answered 2xx or 409 within {TARGETS['change_answer_s']:g} s",
         f"{len(changes) - len(bad) - len(slow)} of {len(changes)} ({sum(c['status'] == 200 for c in changes)} 2xx, "
         f"{sum(c['status'] == 409 for c in changes)} 409, {len(bad)} other, {len(slow)} slower; slowest "
         f"{slowest:.2f} s)", not bad and not slow),
        ("4b", "non-2xx inference answers during the changes", f"{non_2xx} (wrk {stress['wrk_errors']}, probe "
         f"{stress['probe_failures']}, streams {stress['stream_not_200']}) of {stress['answers']:,}",
         non_2xx <= TARGETS["non_2xx"]),
        ("4c", "cut /generate streams during the changes", f"{stress['cut_streams']} of {stress['streams']}"
         if stress["streams"] else "not measured (no text model)",
         stress["cut_streams"] <= TARGETS["cut_streams"] if stress["streams"] else None),
        ("4d", "every worker's report at the final generation", f"final generation {stress['final_generation']}; "
         f"{finals or 'no report'}", bool(finals) and all(g == stress["final_generation"]
                                                          for g in stress["final_reports"].values())),
    ]
    return [{"id": i, "what": w, "measured": m, "met": met} for i, w, m, met in rows]


def judge_parts(result: dict) -> list[dict]:
    load, memory, timing = result["load"], result["memory"], result["timing"]
    non_2xx = load["wrk_errors"] + load["probe_failures"] + load["stream_not_200"]
    quiet, switch, cycle = (median_p99(load["phases"], k) for k in ("quiet", "switch", "cycle"))
    ratio, cycle_ratio = switch / quiet, cycle / quiet
    worst = max(abs(d) for d in memory["drift_mib"].values())
    rows = [
        ("1a", "non-2xx answers under load", f"{non_2xx} (wrk {load['wrk_errors']}, probe {load['probe_failures']}, "
         f"streams {load['stream_not_200']}) of {load['answers']:,}", non_2xx <= TARGETS["non_2xx"]),
        ("1b", "cut /generate streams", f"{load['cut_streams']} of {load['streams']}" if load["streams"]
         else "not measured (no text model)", load["cut_streams"] <= TARGETS["cut_streams"] if load["streams"]
         else None),
        ("1c", f"p99 switch / quiet <= {TARGETS['p99_ratio']:g}",
         f"{ratio:.2f} ({switch:.1f} ms / {quiet:.1f} ms, medians of {load['rounds']} rounds)",
         ratio <= TARGETS["p99_ratio"]),
        ("1d", "changes not answered 200", f"{load['failed_changes']} of {load['changes']}",
         load["failed_changes"] <= TARGETS["failed_changes"]),
        ("2", f"worker RSS back within {TARGETS['rss_mib']:g} MiB after {memory['cycles']} cycles",
         ", ".join(f"worker {w}: {d:+.1f} MiB" for w, d in sorted(memory["drift_mib"].items())),
         worst <= TARGETS["rss_mib"]),
        ("3", "load call -> every worker serving (median)", "; ".join(
            f"{m}: {t['call_s_median']:.2f} s (answer's seconds {t['seconds_median']:.2f})" for m, t in timing.items()),
         None),
        ("-", "p99 cycle / quiet (no target)", f"{cycle_ratio:.2f} ({cycle:.1f} ms)", None),
    ]
    return [{"id": i, "what": w, "measured": m, "met": met} for i, w, m, met in rows]


def render(result: dict) -> str:
    """The results section of docs/lifecycle.md (between the markers)."""
    info = result["info"]
    verdict = {True: "met", False: "**MISSED**", None: "reported"}
    lines = [f"Run {info['date']} on {info['cpu']} ({info['os']}); {info['versions']}.", "",
             f"Command: `{info['command']}` ({info['seconds']:.0f} s). Served: {info['served']}.",
             f"Load average (1/5/15 min) at start {info['load_start']}, at end {info['load_end']}.", "",
             "| # | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['what']} | {r['measured']} | {verdict[r['met']]} |" for r in result["judged"]]
    if "load" in result:
        lines += render_parts(result)
    if "stress" in result:
        lines += render_stress(result["stress"])
    lines += ["", f"Server log: {result['log']['errors']} ERROR/Traceback lines, {result['log']['freed']} "
              "'freed' lines (a version freed after its drain)."]
    lines += [f"    {x}" for x in result["log"]["examples"]]
    return "\n".join(lines)


def render_stress(stress: dict) -> list[str]:
    """Part 4's paragraph: the change clients, their answers by kind, the load beside them."""
    kinds: dict[str, dict[str, int]] = {}
    for c in stress["changes"]:
        kind = kinds.setdefault(c["what"].split(" ")[0], {})
        kind[str(c["status"])] = kind.get(str(c["status"]), 0) + 1
    times = sorted(c["call_s"] for c in stress["changes"] if c["status"] == 200)
    median = statistics.median(times) if times else float("nan")
    return ["", f"Part 4, management under stress: {stress['clients']} clients each making {stress['per_client']} "
            f"changes back to back ({stress['seconds']:.0f} s; a race lost with 409 retried after 10-100 ms) "
            f"while wrk ran /classify on {stress['connections']} "
            f"connections ({stress['requests']:,} requests) and {stress['stream_clients']} /generate streams "
            f"({stress['streams']} streams); load avg {stress['load_avg']}.", "",
            "Answers by kind of change (status: n): " + "; ".join(
                f"{k} {dict(sorted(v.items()))}" for k, v in sorted(kinds.items())) + ".",
            f"Seconds per 2xx change: median {median:.2f}, max {times[-1] if times else float('nan'):.2f}.",
            f"Server responses counted by its /metrics over part 4 (route code: n): {stress['server_codes']}."]


def render_parts(result: dict) -> list[str]:
    """Parts 1 to 3."""
    load = result["load"]
    lines = ["", "![latency over time, switches and cycles marked](img/lifecycle-latency.png)", "",
              "Part 1, per phase (wrk, 32 connections; changes: seconds per call, the answer's `seconds` in brackets):",
              "", "| round | phase | load avg | requests | req/s | p50 ms | p99 ms | max ms | wrk errors | changes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in load["phases"]:
        changes = ", ".join(f"{c['what']} {c['call_s']:.2f} ({c['seconds']:.2f})" if c["status"] == 200
                            else f"{c['what']} **{c['status']}**" for c in p["changes"]) or "-"
        lines.append(f"| {p['round']} | {p['kind']} | {p['load_avg']} | {p['requests']:,} | {p['rps']:,.0f} | "
                     f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['max_ms']:.0f} | {p['errors']}{jumped(p)} | "
                     f"{changes} |")
    lines += ["", f"Streams: {load['streams']} of {load['stream_chars']} characters ({load['text_model']}), "
              f"{load['cut_streams']} cut" + (": " + "; ".join(load["cut_examples"]) if load["cut_examples"] else ""),
              f"Probe: {load['probe_answers']:,} answers, {load['probe_failures']} not 200; versions that answered "
              f"it: {load['probe_versions']}.",
              f"Server responses counted by its /metrics over part 1 (route code: n): {load['server_codes']}.", ""]
    memory = result["memory"]
    lines += ["![worker RSS over the load/unload cycles](img/lifecycle-rss.png)", "",
              f"Part 2: {memory['cycles']} load/unload cycles of `{VGG}`, load avg {memory['load_avg']}; per worker "
              "baseline, after the last unload, largest after any unload, largest while loaded (MiB):", "",
              "| worker | pid | baseline | after last unload | max after unload | max loaded | restarted |",
              "|---|---|---|---|---|---|---|"]
    for w, row in sorted(memory["workers"].items()):
        lines.append(f"| {w} | {row['pid']} | {row['baseline']:.1f} | {row['end']:.1f} | {row['max_unloaded']:.1f} | "
                     f"{row['max_loaded']:.1f} | {row['restarted']} |")
    lines += ["", "Part 3 (no client load), seconds per load call; the answer's `seconds`; ready probes after "
              "each answer:", "", "| model | load avg | call s (each) | median | answer's seconds median | "
              "ready probes not 200 |", "|---|---|---|---|---|---|"]
    for m, t in result["timing"].items():
        lines.append(f"| {m} | {t['load_avg']} | {', '.join(f'{x:.2f}' for x in t['call_s'])} | "
                     f"{t['call_s_median']:.2f} | {t['seconds_median']:.2f} | {t['probes_not_200']} |")
    if load["cycle_load_s"]:
        loads, unloads = statistics.median(load["cycle_load_s"]), statistics.median(load["cycle_unload_s"])
        lines += ["", f"Under load (part 1's cycles): load calls median {loads:.2f} s, unload calls median "
                  f"{unloads:.2f} s."]
    return lines


def jumped(phase: dict) -> str:
    jump = phase.get("clock_jump_s", 0.0)
    return f" (wall clock jumped {jump:+.0f} s)" if abs(jump) > 1 else ""


def steady(series: list[float], window: int = 4, tolerance_mib: float = 1.0) -> bool:
    """The last ``window`` RSS samples within ``tolerance_mib`` of each other."""
    tail = series[-window:]
    return len(tail) == window and max(tail) - min(tail) <= tolerance_mib


def update_doc(doc: str, section: str) -> str:
    head, rest = doc.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{section}\n{END}{rest.split(END, 1)[1]}"


# -- the live parts ---------------------------------------------------------------------------------------------

@dataclass
class Change:
    what: str
    t0: float  # time.monotonic() at the call and at its answer
    t1: float
    status: int | str
    seconds: float = float("nan")  # the answer's own field
    error: str = ""

    @property
    def call_s(self) -> float:
        return self.t1 - self.t0


@dataclass
class Clients:
    """The probe and the streams of part 1, in background threads until ``stop``."""
    url: str
    png: bytes
    prompt: str
    stream_chars: int
    streams: int
    stop: threading.Event = field(default_factory=threading.Event)
    probe: list = field(default_factory=list)  # (t, latency ms, status, version)
    stream_results: list = field(default_factory=list)  # (t0, t1, cut reason or None)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._probe, daemon=True)]
        threads += [threading.Thread(target=self._stream, args=(i,), daemon=True) for i in range(self.streams)]
        for t in threads:
            t.start()
        return threads

    def _probe(self) -> None:
        session = requests.Session()
        while not self.stop.wait(0.05):
            t0 = time.monotonic()
            status: int | str  # the HTTP status, or the exception's name
            try:
                r = session.post(f"{self.url}/classify", files={"image": self.png}, timeout=30)
                status, version = r.status_code, r.json().get("model", ":").split(":")[-1] if r.ok else ""
            except (requests.RequestException, ValueError) as e:
                status, version = type(e).__name__, ""
                session = requests.Session()
            self.probe.append((t0, (time.monotonic() - t0) * 1e3, status, version))

    def _stream(self, i: int) -> None:
        session, n = requests.Session(), 0
        while not self.stop.is_set():
            t0, body, status = time.monotonic(), "", 0
            try:
                with session.post(f"{self.url}/generate", stream=True, timeout=120,
                                  headers={"accept": "text/event-stream"},
                                  json={"prompt": self.prompt, "max_new_chars": self.stream_chars, "stream": True,
                                        "seed": i * 100_000 + n}) as r:
                    status = r.status_code
                    # decode_unicode=True would yield bytes (and the join raise) for an answer naming no charset
                    body = b"".join(r.iter_content(None)).decode("utf-8", errors="replace")
                cut = stream_cut(status, body, self.stream_chars)
            except requests.RequestException as e:
                cut = f"{type(e).__name__} after {len(body)} bytes: {str(e)[:150]}"
                session = requests.Session()
            self.stream_results.append((t0, time.monotonic(), cut, status))
            n += 1


def manage(url: str, token: str, what: str, path: str, body: dict, quiet: tuple = ()) -> Change:
    t0 = time.monotonic()
    try:
        r = requests.post(f"{url}/v2/repository/models/{path}", json=body, timeout=300,
                          headers={"authorization": f"Bearer {token}"})
        answer = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        change = Change(what, t0, time.monotonic(), r.status_code, float(answer.get("seconds", "nan")),
                        "" if r.ok else r.text[:300])
    except requests.RequestException as e:
        change = Change(what, t0, time.monotonic(), type(e).__name__, error=str(e)[:300])
    if change.status != 200 and change.status not in quiet:
        say(f"  {what}: {change.status} {change.error}")
    return change


def worker_reports(state_dir: Path) -> dict[int, dict]:
    out = {}
    for path in (state_dir / "workers").glob("*.json"):
        try:
            out[int(path.stem)] = json.loads(path.read_text())
        except (ValueError, OSError):
            pass
    return out


def settled(state_dir: Path, workers: int, timeout_s: float = 120.0) -> bool:
    """Every worker reports nothing draining (a retired version is freed, its memory given back)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports = worker_reports(state_dir)
        if len(reports) >= workers and not any(r.get("draining") for r in reports.values()):
            return True
        time.sleep(0.05)
    return False


def worker_rss(server: LiveServer, state_dir: Path) -> dict[int, tuple[int, float]]:
    """worker index -> (pid, RSS MiB), for the reporting workers that are children of the server."""
    children = {p.pid: p for p in psutil.Process(server.process.pid).children()}
    out = {}
    for w, report in worker_reports(state_dir).items():
        if report["pid"] in children:
            out[w] = (report["pid"], children[report["pid"]].memory_info().rss / MIB)
    return out


def steady_rss(server: LiveServer, state_dir: Path, timeout_s: float = 15.0) -> dict[int, tuple[int, float]]:
    """worker_rss once every worker's RSS has held still for about a second (sampled every 0.25 s): a worker
    reports its drain done before its gc.collect() and malloc_trim(0) give the memory back."""
    history: dict[int, list[float]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        now = worker_rss(server, state_dir)
        for w, (_, mib) in now.items():
            history.setdefault(w, []).append(mib)
        if all(steady(h) for h in history.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.25)


def ready_probes(url: str, name: str, version: str, n: int = 10) -> int:
    """Not-200 answers of ``n`` version-ready checks, each on a new connection (either worker may answer)."""
    bad = 0
    for _ in range(n):
        try:
            r = requests.get(f"{url}/v2/models/{name}/versions/{version}/ready", timeout=30,
                             headers={"connection": "close"})
            bad += r.status_code != 200
        except requests.RequestException:
            bad += 1
    return bad


def time_to_serve(url: str, token: str, name: str, version: str, reps: int) -> dict:
    """Part 3: ``reps`` times load ``version`` of the served ``name`` (timed), probe it, unload it."""
    calls, probes = [], 0
    load_avg = load_average()
    for _ in range(reps):
        change = manage(url, token, f"load {name} {version}", f"{name}/load", {"parameters": {"version": version}})
        calls.append(change)
        probes += ready_probes(url, name, version) if change.status == 200 else 0
        manage(url, token, f"unload {name} {version}", f"{name}/unload", {"parameters": {"version": version}})
    ok = [c for c in calls if c.status == 200]
    say(f"time to serve {name}: {', '.join(f'{c.call_s:.2f}' for c in calls)} s; {probes} ready probes not 200")
    return {"load_avg": load_avg, "call_s": [round(c.call_s, 3) for c in ok], "seconds": [c.seconds for c in ok],
            "call_s_median": statistics.median(c.call_s for c in ok) if ok else float("nan"),
            "seconds_median": statistics.median(c.seconds for c in ok) if ok else float("nan"),
            "failed": len(calls) - len(ok), "probes_not_200": probes}


def run_phase(url: str, token: str, png_path: Path, kind: str, rnd: int, seconds: float, connections: int,
              versions: dict, actions: int, start_index: int) -> dict:
    """One wrk run of ``seconds``; ``actions`` switches or load/unload cycles spread evenly over it."""
    from loadtest.bench.wrk import run_wrk

    result: dict = {}
    load_avg = load_average()

    def load() -> None:
        result["wrk"] = run_wrk(f"{url}/classify", ["multipart", str(png_path)], connections, seconds)
        result["end"], result["wall_end"] = time.monotonic(), time.time()

    wrk = threading.Thread(target=load)
    t0, wall0 = time.monotonic(), time.time()
    wrk.start()
    changes = []
    for i in range(actions if kind != "quiet" else 0):
        time.sleep(max(0.0, t0 + seconds * (i + 0.5) / actions - time.monotonic()))
        if kind == "switch":
            target = versions["A"] if (start_index + i) % 2 == 0 else versions["B"]
            changes.append(manage(url, token, f"default {target[:6]}", f"{SERVED}/traffic",
                                  {"default_version": target}))
        else:
            body = {"parameters": {"version": versions["C"]}}
            changes.append(manage(url, token, "load C", f"{SERVED}/load", body))
            changes.append(manage(url, token, "unload C", f"{SERVED}/unload", body))
    wrk.join()
    t_end = result["end"]
    w = result["wrk"]
    spilled = sum(c.t1 > t_end for c in changes)
    # wrk times with the wall clock: a step of it (a VM paused, then resumed) times out every request in flight
    jump = (result["wall_end"] - wall0) - (t_end - t0)
    say(f"round {rnd} {kind:6s}: {w.requests} requests, p50 {w.p50_ms:.1f} ms, p99 {w.p99_ms:.1f} ms, "
        f"{w.errors} errors, {len(changes)} changes ({spilled} ended after wrk), load avg {load_avg}"
        + (f"; the wall clock jumped {jump:+.1f} s" if abs(jump) > 1 else ""))
    return {"kind": kind, "round": rnd, "t0": t0, "t1": t_end, "load_avg": load_avg, "requests": w.requests,
            "rps": w.rps, "p50_ms": w.p50_ms, "p99_ms": w.p99_ms, "max_ms": w.max_ms, "errors": w.errors,
            "status_errors": w.status_errors, "socket_errors": w.socket_errors, "spilled": spilled,
            "clock_jump_s": round(jump, 2),
            "changes": [asdict(c) | {"call_s": c.call_s} for c in changes]}


def load_part(server: LiveServer, token: str, png: bytes, png_path: Path, versions: dict, text_model: str | None,
              args) -> dict:
    """Part 1: rounds of quiet / switch / cycle phases under wrk, with the probe and the streams."""
    from harness.data import prompts, served_vocab

    url = server.http_url
    per_round = args.changes // args.rounds
    prompt = prompts(1, vocab=served_vocab(url, text_model) if text_model else None)[0]  # within its vocabulary
    clients = Clients(url, png, prompt, args.stream_chars, args.streams if text_model else 0)
    before = http_codes(requests.get(f"{url}/metrics", timeout=30).text)
    threads = clients.start()
    phases = []
    try:
        for rnd in range(1, args.rounds + 1):
            for kind in ("quiet", "switch", "cycle"):
                phases.append(run_phase(url, token, png_path, kind, rnd, args.phase_seconds, args.connections,
                                        versions, per_round, (rnd - 1) * per_round))
    finally:
        clients.stop.set()
        for t in threads:
            t.join(timeout=180)
    after = http_codes(requests.get(f"{url}/metrics", timeout=30).text)
    changes = [c for p in phases for c in p["changes"]]
    cuts = [r for r in clients.stream_results if r[2]]
    probe_ok = [p for p in clients.probe if p[2] == 200]
    return {
        "rounds": args.rounds, "connections": args.connections, "phase_seconds": args.phase_seconds,
        "phases": phases, "t0": phases[0]["t0"],
        "answers": sum(p["requests"] for p in phases) + len(clients.probe) + len(clients.stream_results),
        "wrk_errors": sum(p["errors"] for p in phases),
        "probe_answers": len(clients.probe), "probe_failures": len(clients.probe) - len(probe_ok),
        "probe_versions": dict(sorted({v: sum(p[3] == v for p in probe_ok) for v in {p[3] for p in probe_ok}}
                                      .items())),
        "probe": clients.probe, "text_model": text_model, "stream_chars": args.stream_chars,
        "streams": len(clients.stream_results), "stream_not_200": sum(r[3] != 200 for r in clients.stream_results),
        "cut_streams": len(cuts), "cut_examples": [r[2] for r in cuts[:5]],
        "stream_times": [(r[0], r[1], r[2]) for r in clients.stream_results],
        "changes": len(changes), "failed_changes": sum(c["status"] != 200 for c in changes),
        "cycle_load_s": [c["call_s"] for c in changes if c["what"] == "load C" and c["status"] == 200],
        "cycle_unload_s": [c["call_s"] for c in changes if c["what"] == "unload C" and c["status"] == 200],
        "server_codes": codes_delta(before, after),
    }


def memory_part(server: LiveServer, token: str, state_dir: Path, cycles: int, workers: int) -> dict:
    """Part 2: load / unload the whole ``lifecycle-vgg`` ``cycles`` times; RSS per worker after each."""
    url = server.http_url
    settled(state_dir, workers)
    baseline = steady_rss(server, state_dir)
    load_avg = load_average()
    samples = []  # (cycle, "loaded" | "unloaded", worker, pid, MiB)
    failed = 0
    for cycle in range(1, cycles + 1):
        loaded = manage(url, token, f"load {VGG}", f"{VGG}/load", {})
        samples += [(cycle, "loaded", w, pid, mib) for w, (pid, mib) in worker_rss(server, state_dir).items()]
        unloaded = manage(url, token, f"unload {VGG}", f"{VGG}/unload", {})
        failed += (loaded.status != 200) + (unloaded.status != 200)
        if not settled(state_dir, workers):
            say(f"  cycle {cycle}: a worker still drains after 120 s")
        samples += [(cycle, "unloaded", w, pid, mib) for w, (pid, mib) in steady_rss(server, state_dir).items()]
        if cycle % 10 == 0:
            say(f"memory cycle {cycle}: " + ", ".join(f"worker {s[2]} {s[4]:.1f} MiB" for s in samples[-workers:]))
    out_workers, drift = {}, {}
    for w, (pid, base) in sorted(baseline.items()):
        mine = [s for s in samples if s[2] == w]
        unloaded_mib = [s[4] for s in mine if s[1] == "unloaded"]
        out_workers[w] = {"pid": pid, "baseline": base, "end": unloaded_mib[-1], "max_unloaded": max(unloaded_mib),
                          "max_loaded": max(s[4] for s in mine if s[1] == "loaded"),
                          "restarted": any(s[3] != pid for s in mine)}
        drift[w] = unloaded_mib[-1] - base
    return {"cycles": cycles, "load_avg": load_avg, "failed_changes": failed, "baseline": baseline,
            "samples": samples, "workers": out_workers, "drift_mib": drift}


def change_script(client: int, versions: dict) -> list[tuple[str, str, dict]]:
    """One change client's cycle of (what, path, body). Client 0 loads, unloads and reloads version C; client 1
    switches the default between A and B, splits the traffic and reloads. Neither touches what the other's
    next change needs, so every change is valid whatever the order: only the race for the lock is lost."""
    a, b, c = versions["A"], versions["B"], versions["C"]
    if client % 2 == 0:
        return [("load C", f"{SERVED}/load", {"parameters": {"version": c}}),
                ("reload", f"{SERVED}/load", {}),
                ("unload C", f"{SERVED}/unload", {"parameters": {"version": c}})]
    return [(f"default {a[:6]}", f"{SERVED}/traffic", {"default_version": a}),
            ("split 50/50", f"{SERVED}/traffic", {"weights": {a: 50, b: 50}}),
            (f"default {b[:6]}", f"{SERVED}/traffic", {"default_version": b}),
            ("reload", f"{SERVED}/load", {})]


def stress_part(server: LiveServer, token: str, png: bytes, png_path: Path, versions: dict, state_dir: Path,
                text_model: str | None, workers: int, args) -> dict:
    """Part 4, management under stress: ``args.stress_clients`` clients each make ``args.stress_changes``
    changes back to back (a 409, lost to the other client, repeats that change shortly) while wrk runs
    /classify on ``args.connections`` connections and ``args.stress_streams`` /generate streams run."""
    from harness.data import prompts, served_vocab
    from loadtest.bench.wrk import run_wrk

    url = server.http_url
    prompt = prompts(1, vocab=served_vocab(url, text_model) if text_model else None)[0]
    clients = Clients(url, png, prompt, args.stream_chars, args.stress_streams if text_model else 0)
    load_avg = load_average()
    before = http_codes(requests.get(f"{url}/metrics", timeout=30).text)
    done = threading.Event()
    slices: list = []

    def load() -> None:  # wrk runs for a fixed time: slices of it until the changes are done
        while not done.is_set():
            slices.append(run_wrk(f"{url}/classify", ["multipart", str(png_path)], args.connections, 5))

    def changer(client: int, out: list) -> None:
        script, step, rng = change_script(client, versions), 0, random.Random(client)
        # Each client gets args.stress_changes changes made; a race it loses (409) it retries after a short
        # pause, as a client that honours the answer does. Bounded: a server that only said 409 ends it too.
        while step < args.stress_changes and len(out) < 10 * args.stress_changes:
            what, path, body = script[step % len(script)]
            answer = manage(url, token, what, path, body, quiet=(409,))
            out.append(answer)
            if answer.status == 409:
                time.sleep(rng.uniform(0.01, 0.1))
            else:
                step += 1  # made, or failed (judged): the next one

    threads = clients.start()
    wrk = threading.Thread(target=load, daemon=True)
    wrk.start()
    time.sleep(1.0)  # the load is on before the first change
    t0 = time.monotonic()
    results: list[list[Change]] = [[] for _ in range(args.stress_clients)]
    changers = [threading.Thread(target=changer, args=(i, results[i])) for i in range(args.stress_clients)]
    for t in changers:
        t.start()
    for t in changers:
        t.join()
    seconds = time.monotonic() - t0
    done.set()
    clients.stop.set()
    wrk.join(timeout=120)
    for t in threads:
        t.join(timeout=180)
    after = http_codes(requests.get(f"{url}/metrics", timeout=30).text)
    final = json.loads((state_dir / "state.json").read_text())["generation"]
    deadline = time.monotonic() + 30  # the last change was answered once every worker reported it
    while time.monotonic() < deadline and not all(r["generation"] == final for r in worker_reports(state_dir).values()):
        time.sleep(0.1)
    changes = [asdict(c) | {"call_s": c.call_s, "client": i} for i, mine in enumerate(results) for c in mine]
    cuts = [r for r in clients.stream_results if r[2]]
    stress = {
        "clients": args.stress_clients, "per_client": args.stress_changes, "seconds": seconds,
        "connections": args.connections, "stream_clients": clients.streams, "load_avg": load_avg,
        "requests": sum(w.requests for w in slices), "wrk_errors": sum(w.errors for w in slices),
        "probe_failures": sum(p[2] != 200 for p in clients.probe),
        "streams": len(clients.stream_results), "stream_not_200": sum(r[3] != 200 for r in clients.stream_results),
        "cut_streams": len(cuts), "cut_examples": [r[2] for r in cuts[:5]],
        "answers": sum(w.requests for w in slices) + len(clients.probe) + len(clients.stream_results),
        "changes": changes, "final_generation": final,
        "final_reports": {w: r["generation"] for w, r in sorted(worker_reports(state_dir).items())
                          if w <= workers},
        "server_codes": codes_delta(before, after),
    }
    judged = judge_stress(stress)
    say(f"stress: {len(changes)} changes in {seconds:.0f} s; " + "; ".join(f"{r['id']} {r['measured']}"
                                                                          for r in judged))
    return stress


def plot_latency(load: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = load["t0"]
    fig, ax = plt.subplots(figsize=(12, 5), dpi=110)
    shades = {"quiet": "#ffffff", "switch": "#e8f0ff", "cycle": "#fff3e0"}
    for p in load["phases"]:
        ax.axvspan(p["t0"] - t0, p["t1"] - t0, color=shades[p["kind"]], zorder=0)
        ax.hlines(p["p99_ms"], p["t0"] - t0, p["t1"] - t0, color="k", linewidth=2, zorder=3,
                  label="wrk p99 of the phase" if p is load["phases"][0] else "")
        for c in p["changes"]:
            color = "tab:blue" if c["what"].startswith("default") else "tab:orange" if c["what"].startswith("load") \
                else "tab:green"
            ax.axvline(c["t0"] - t0, color=color, linewidth=0.8, alpha=0.8, zorder=1)
    versions = sorted({v for *_, v in load["probe"] if v})
    for v in versions:
        pts = [(t - t0, ms) for t, ms, s, ver in load["probe"] if ver == v]
        xs, ys = zip(*pts, strict=True)
        ax.scatter(xs, ys, s=4, label=f"probe, answered by {v[:8]}", zorder=2)
    bad = [(t - t0, ms) for t, ms, s, _ in load["probe"] if s != 200]
    if bad:
        xs, ys = zip(*bad, strict=True)
        ax.scatter(xs, ys, s=30, marker="x", color="red", label="probe not 200", zorder=4)
    for c, what in (("tab:blue", "default-version switch"), ("tab:orange", "load C"), ("tab:green", "unload C")):
        ax.plot([], [], color=c, label=what)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (white: quiet, blue: switch, orange: cycle phases)")
    ax.set_ylabel("/classify latency (ms, log)")
    ax.set_title(f"/classify under wrk ({load['connections']} connections) + {load['text_model'] or 'no'} streams: "
                 "probe latency, changes marked")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4)
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_rss(memory: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for w, base in sorted(memory["baseline"].items()):
        mine = [s for s in memory["samples"] if s[2] == w]
        line, = ax.plot([0] + [s[0] for s in mine if s[1] == "unloaded"],
                        [base[1]] + [s[4] for s in mine if s[1] == "unloaded"], marker=".",
                        label=f"worker {w}, after unload (0: baseline)")
        ax.plot([s[0] for s in mine if s[1] == "loaded"], [s[4] for s in mine if s[1] == "loaded"], alpha=0.4,
                color=line.get_color(), linestyle="--", label=f"worker {w}, loaded")
        ax.axhspan(base[1] - TARGETS["rss_mib"], base[1] + TARGETS["rss_mib"], color=line.get_color(), alpha=0.08)
    ax.set_xlabel(f"load/unload cycle of {VGG}")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"Worker RSS over {memory['cycles']} load/unload cycles "
                 f"(band: baseline +/- {TARGETS['rss_mib']:g} MiB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path)


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def log_evidence(log_path: Path) -> dict:
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    errors = [x for x in lines if "ERROR" in x or "Traceback" in x]
    return {"errors": len(errors), "freed": sum("freed" in x for x in lines), "examples": errors[:8]}


def store_models() -> dict[str, str]:
    """{name: newest tag} of the store's models this scenario may use."""
    import bentoml

    out = {}
    for name in ("lenet5", "vgg_fc7", "char_gru", "char_lstm"):
        try:
            out[name] = str(bentoml.models.get(f"{name}:latest").tag)
        except bentoml.exceptions.NotFound:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of quiet / switch / cycle phases (>= 2)")
    parser.add_argument("--phase-seconds", type=float, default=20.0)
    parser.add_argument("--changes", type=int, default=20, help="default switches, and load/unload cycles, in all")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--stream-chars", type=int, default=300)
    parser.add_argument("--memory-cycles", type=int, default=50)
    parser.add_argument("--timing-reps", type=int, default=5)
    parser.add_argument("--stress-clients", type=int, default=2, help="part 4: clients changing the models")
    parser.add_argument("--stress-changes", type=int, default=200,
                        help="part 4: changes each client makes, back to back (a lost race is retried)")
    parser.add_argument("--stress-streams", type=int, default=4, help="part 4: /generate streams meanwhile")
    parser.add_argument("--stress-only", action="store_true",
                        help="run part 4 alone (a smoke run: with --stress-changes 10 it takes a minute; "
                             "implies --no-doc)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "loadtest" / "results")
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "lifecycle.md")
    parser.add_argument("--no-doc", action="store_true", help="write only --out (no doc, no docs/img PNGs)")
    args = parser.parse_args(argv)
    args.no_doc = args.no_doc or args.stress_only
    if args.rounds < 2 or args.changes % args.rounds:
        parser.error("--rounds must be >= 2 and divide --changes")
    import bentoml

    from harness.data import held_out_digits, png_bytes
    from loadtest.faults import store_copy

    store = store_models()
    missing = [m for m in (("lenet5",) if args.stress_only else ("lenet5", "vgg_fc7")) if m not in store]
    if missing:
        say(f"the model store ({os.environ.get('BENTOML_HOME', '~/bentoml')}) has no {', '.join(missing)}: run "
            "`make export` (trains what artifacts/ lacks, then exports and registers it)")
        return 2
    text_model = next((m for m in ("char_gru", "char_lstm") if m in store), None)
    if text_model is None:
        say("no char_gru or char_lstm in the store: the /generate streams are skipped (make export makes them)")
    started, load_start = time.monotonic(), load_average()
    work = Path(tempfile.mkdtemp(prefix="nnserve-lifecycle-"))
    workers = 2
    created: list[str] = []
    try:
        created += [store_copy(store["lenet5"], DIGITS) for _ in range(3)]
        created += [store_copy(store["vgg_fc7"], VGG) for _ in range(0 if args.stress_only else 2)]
        versions = dict(zip("ABC", (t.split(":")[1] for t in created[:3]), strict=True))
        vgg = [t.split(":")[1] for t in created[3:]]
        models = {SERVED: {"tag": DIGITS, "version_policy": {"specific": {"versions": [versions["A"], versions["B"]]}}}}
        if text_model:
            models[text_model] = {"tag": store[text_model]}
        (work / "models.json").write_text(json.dumps({"models": models}))
        token = secrets.token_urlsafe(32)
        (work / "token").write_text(token)
        (work / "token").chmod(0o600)
        state_dir = work / "state"
        env = {"NNSERVE_WORKERS": str(workers), "NNSERVE_MODELS_CONFIG": str(work / "models.json"),
               "NNSERVE_STATE_DIR": str(state_dir), "NNSERVE_MANAGEMENT_TOKEN_FILE": str(work / "token")}
        png = png_bytes(held_out_digits()[0][0])
        (work / "digit.png").write_bytes(png)
        say(f"versions {versions}, {VGG} {vgg}; server log {work / 'server.log'}; load average {load_start}")
        parts: dict = {}
        with running_server(work / "server.log", env) as server:
            url = server.http_url
            if not args.stress_only:
                timing = {"lenet5": time_to_serve(url, token, SERVED, versions["C"], args.timing_reps)}
                first = manage(url, token, f"load {VGG} V1", f"{VGG}/load", {"parameters": {"version": vgg[0]}})
                say(f"first load of {VGG} (V1): {first.call_s:.2f} s, status {first.status}")
                timing["vgg_fc7"] = time_to_serve(url, token, VGG, vgg[1], args.timing_reps)
                manage(url, token, f"unload {VGG}", f"{VGG}/unload", {})
                parts["load"] = load_part(server, token, png, work / "digit.png", versions, text_model, args)
                parts["memory"] = memory_part(server, token, state_dir, args.memory_cycles, workers)
                parts["timing"] = timing
            parts["stress"] = stress_part(server, token, png, work / "digit.png", versions, state_dir, text_model,
                                          workers, args)
            served = ", ".join(f"{n} = {m.get('store_tag')}" for n, m in
                               ((m["name"], m) for m in requests.get(f"{url}/models", timeout=30).json()["models"]))
        info: dict[str, Any]  # machine()'s strings and this run's numbers
        info = machine() | {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": load_start,
                            "load_end": load_average(), "seconds": time.monotonic() - started, "served": served,
                            "command": "python -m loadtest.lifecycle " + shlex.join(argv or sys.argv[1:])}
        info["command"] = info["command"].strip()
        result = {"info": info, **parts, "log": log_evidence(work / "server.log"), "versions": versions,
                  "vgg_versions": vgg}
        result["judged"] = judge(result)
    finally:
        for tag in created:
            try:
                bentoml.models.delete(tag)
            except Exception as e:  # noqa: BLE001 (report and go on: the others must go too)
                say(f"could not delete {tag} from the store: {e}")
    name = "lifecycle-stress.json" if args.stress_only else "lifecycle.json"  # a smoke run keeps the full record
    write_atomic(args.out / name, json.dumps(result, indent=1, default=str).encode())
    if not args.no_doc:
        plot_latency(result["load"], args.doc.parent / "img" / "lifecycle-latency.png")
        plot_rss(result["memory"], args.doc.parent / "img" / "lifecycle-rss.png")
        args.doc.write_text(update_doc(args.doc.read_text(), render(result)))
    for row in result["judged"]:
        say(f"{row['id']:>2} {row['what']}: {row['measured']} -> "
            f"{ {True: 'met', False: 'MISSED', None: 'reported'}[row['met']]}")
    say(f"server log kept in {work / 'server.log'}")
    return 0 if all(r["met"] is not False for r in result["judged"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
