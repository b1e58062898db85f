"""Side-by-side benchmarks -> docs/bench.md and docs/img/bench-*.png (``make bench``).

    python -m loadtest.bench          # the record (make bench)
    python -m loadtest.bench --duration 4 --users 1,8 --streams 4 --runs 30 --max-seconds 0.5 --out /tmp/b  # smoke

Four parts, all against the models of the current BentoML store (BENTOML_HOME, ``make export``):

1. In process, CPU: lenet5 and vgg_fc7 at batch 1 and 32, PyTorch eager (the training artifact the store
   entry was exported from) vs ONNX Runtime: the exported fp32 graph with ORT's default (online)
   optimizations, the same with graph optimizations off, the offline ORT-optimized graph, and
   ``<name>-int8`` if registered; one intra-op thread, plus PyTorch and ORT fp32 on every core. Real
   held-out digits; warm-up first, then the median of many timed runs.
2. ``/classify`` on a live ``bentoml serve`` (own free ports, stopped at the end, whatever happens) under
   locust at several concurrency levels: throughput, latency percentiles, and the adaptive batcher's
   batch sizes (``nnserve_batch_size`` histogram on /metrics, before/after difference).
3. Streamed ``/generate``: one stream at a time vs several concurrent ones (continuous batching of decode
   steps): characters/s, first-character and full latency, decode batch sizes.
4. The load test with budgets (every endpoint at once, ``--budget-duration``) and its verdict, and the
   server processes' resident memory once ready and after all the load.

Locust runs as a subprocess (it monkey-patches the process with gevent). Every phase is bounded:
``--runs`` / ``--max-seconds`` per in-process case (28 cases at most), locust ``-t --duration`` per level
(6 levels) and ``--budget-duration`` once, plus start-ups; with the defaults that adds up to about
5 minutes on 2 cores (measured: 4 min for parts 1-3 on 2026-11-23).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
BUDGETS = Path(__file__).with_name("budgets.json")  # the locustfile's default table
IMAGE_MODELS = ("lenet5", "vgg_fc7")
BATCHES = (1, 32)
CLASSIFY = "/classify"
FIRST_CHAR, COMPLETE = "/generate [stream] first char", "/generate [stream] complete"
# The locustfile's user classes, one per endpoint (the locustfile itself cannot be imported: gevent).
USER_CLASSES = ("ClassifyUser", "FeaturesUser", "GenerateUser", "GenerateStreamUser", "KServeUser")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- 1. in process: PyTorch eager vs ONNX Runtime variants -------------------------------------------


@dataclass
class Case:
    model: str
    variant: str
    batch: int
    times_ms: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.times_ms, 90))


def time_calls(run, runs: int, max_seconds: float, warmup: int = 10) -> list[float]:
    """Milliseconds per call: ``warmup`` untimed calls, then up to ``runs`` timed ones within ``max_seconds``
    (always at least 5, so a slow case still gets a median)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < runs and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return times


def image_batches(preprocessing: dict) -> dict[int, np.ndarray]:
    """Held-out digits through the service's own decode + preprocessing path, per benchmarked batch size."""
    from PIL import Image

    from loadtest.data import held_out_digits
    from models.preprocess import image_to_uint8, preprocess_uint8

    digits, _ = held_out_digits()
    uint8 = np.stack([image_to_uint8(Image.fromarray(d), preprocessing) for d in digits[:max(BATCHES)]])
    x = preprocess_uint8(uint8, preprocessing)
    return {b: np.ascontiguousarray(x[:b]) for b in BATCHES}


def ort_session(path: Path, threads: int, optimize: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_module(metadata: dict):
    """The eval-mode PyTorch module the store entry was exported from, or a reason why not."""
    from export.graph import wrap
    from models.artifact import WEIGHTS, load_artifact, sha256_file

    artifact = Path(metadata.get("source_artifact", ""))
    if not (artifact / WEIGHTS).is_file():
        return None, f"source artifact {artifact} not found"
    if sha256_file(artifact / WEIGHTS) != metadata.get("source_sha256"):
        return None, f"{artifact} was retrained after this export (weights sha256 differs)"
    model, card = load_artifact(artifact)
    return wrap(model, card), ""


@dataclass
class Variant:
    label: str
    threads: int
    run: Callable[[np.ndarray], object]
    note: str = ""
    torch: bool = False  # torch's thread count is process-wide: set before timing


def model_variants(name: str, workdir: Path, all_threads: int) -> tuple[list[Variant], object, list[str]]:
    """The variants of one image model, its store entry, and notes on variants left out.

    Single-threaded rows compare per-core cost and hold up on a shared box; the ``all_threads`` rows show
    what intra-op threading adds (the server runs ORT with every core)."""
    import bentoml
    import torch

    from export.optimize import optimize_graph
    from service.runtime import model_tag, store_model

    entry = store_model(model_tag(name))  # a RuntimeError saying "run make export" if it is missing
    meta = entry.info.metadata
    served = Path(entry.path_of(meta["onnx_file"]))
    # export keeps the plain graph next to an optimized model.onnx; otherwise model.onnx is the plain one.
    if meta.get("portable_onnx_file"):
        plain, optimized, optimized_note = Path(entry.path_of(meta["portable_onnx_file"])), served, "served graph"
    else:
        plain = served
        optimized = optimize_graph(plain, workdir / f"{name}-optimized.onnx")
        optimized_note = "optimized here: export serves the plain graph (optimized was not faster there)"
    input_name = meta["inputs"][0]["name"]

    def ort_run(path: Path, threads: int, optimize: bool = True):
        session = ort_session(path, threads, optimize)
        return lambda x: session.run(None, {input_name: x})

    thread_counts = [1] + ([all_threads] if all_threads > 1 else [])
    variants, skipped = [], []
    module, why = torch_module(meta)
    if module is not None:
        def eager(x: np.ndarray) -> None:
            with torch.inference_mode():
                module(torch.from_numpy(x))
        for t in thread_counts:
            variants.append(Variant(f"PyTorch eager, {t} thread{'s' * (t > 1)}", t, eager, torch=True))
    else:
        skipped.append(f"{name} PyTorch eager: {why}")
    for t in thread_counts:
        variants.append(Variant(f"ORT fp32, {t} thread{'s' * (t > 1)}", t, ort_run(plain, t)))
    variants.append(Variant("ORT fp32, graph opt. off", 1, ort_run(plain, 1, optimize=False)))
    variants.append(Variant("ORT fp32 offline-optimized", 1, ort_run(optimized, 1), optimized_note))
    try:
        int8 = bentoml.models.get(f"{name}-int8:latest")
        variants.append(Variant("ORT INT8", 1, ort_run(Path(int8.path_of(int8.info.metadata["onnx_file"])), 1),
                                str(int8.tag)))
    except bentoml.exceptions.NotFound:
        skipped.append(f"{name} INT8: no {name}-int8 in the store (`python -m export --int8` registers it when "
                       "it passes the accuracy gate)")
    return variants, entry, skipped


BASELINE = "ORT fp32, 1 thread"


def bench_in_process(args: argparse.Namespace, workdir: Path) -> tuple[list[Case], list[str]]:
    import torch

    cases, notes = [], []
    for name in IMAGE_MODELS:
        variants, entry, skipped = model_variants(name, workdir, args.threads)
        notes += [f"{name}: {entry.tag}"] + [f"not measured: {s}" for s in skipped]
        batches = image_batches(entry.info.metadata["preprocessing"])
        for variant in variants:
            if variant.torch:
                torch.set_num_threads(variant.threads)
            for batch in BATCHES:
                x = batches[batch]
                # No progress bar inside the timed loop (its update would be timed too): one line per case.
                case = Case(name, variant.label, batch, note=variant.note)
                case.times_ms = time_calls(lambda run=variant.run, x=x: run(x), args.runs, args.max_seconds)
                log(f"{name:8s} {variant.label:28s} batch {batch:2d}: median {case.median_ms:9.3f} ms "
                    f"(p90 {case.p90_ms:.3f}, {len(case.times_ms)} runs)")
                cases.append(case)
    return cases, notes


# -- 2./3. the live server under locust --------------------------------------------------------------


@dataclass
class Histogram:
    """A Prometheus histogram's cumulative bucket counts (upper bound -> count), sum and count."""

    buckets: dict[float, float]
    total: float
    count: float

    def minus(self, before: Histogram) -> Histogram:
        return Histogram({le: c - before.buckets.get(le, 0.0) for le, c in self.buckets.items()},
                         self.total - before.total, self.count - before.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def describe(self) -> str:
        """Non-cumulative counts per bucket as "1:120 2:40 3-4:7" (the buckets are 1, 2, 4, 8, ...)."""
        parts, below, lower = [], 0.0, 0
        for le in sorted(self.buckets):
            n = self.buckets[le] - below
            below = self.buckets[le]
            if n > 0 and le != float("inf"):
                span = f"{int(le)}" if lower + 1 >= le else f"{lower + 1}-{int(le)}"
                parts.append(f"{span}:{int(n)}")
            elif n > 0:
                parts.append(f">{lower}:{int(n)}")
            lower = int(le) if le != float("inf") else lower
        return " ".join(parts) or "-"


def scrape(url: str) -> dict:
    """/metrics -> {("nnserve_batch_size", model, batcher): Histogram}, summed over model versions."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name == "nnserve_batch_size":
            for s in family.samples:
                key = ("nnserve_batch_size", s.labels["model"], s.labels["batcher"])
                hist = found.setdefault(key, Histogram({}, 0.0, 0.0))
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    hist.buckets[le] = hist.buckets.get(le, 0.0) + s.value  # summed over versions
                elif s.name.endswith("_sum"):
                    hist.total += s.value
                elif s.name.endswith("_count"):
                    hist.count += s.value
    return found


def batch_histogram(before: dict, after: dict, model: str, batcher: str) -> Histogram:
    key = ("nnserve_batch_size", model, batcher)
    empty = Histogram({}, 0.0, 0.0)
    return after.get(key, empty).minus(before.get(key, empty))


def run_locust(url: str, user_classes: list[str], users: int, duration: int, args: argparse.Namespace,
               workdir: Path, budgets: str = "none") -> tuple[dict[str, dict], str]:
    """One headless locust run of ``user_classes``; returns its stats rows (CSV) by endpoint name, and its log."""
    prefix = workdir / f"locust-{user_classes[0] if len(user_classes) == 1 else 'all'}-{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "-u", str(users), "-r", str(users), "-t", f"{duration}s", "--stop-timeout", "5",
           "--host", url, "--csv", str(prefix), "--budgets", budgets,
           "--generate-chars", str(args.generate_chars), *user_classes]
    with open(f"{prefix}.log", "wb") as out:
        # rc 1 = some requests failed or a budget was missed: both are in the output; anything else is a crash.
        rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                            timeout=duration + 180).returncode
    stats_csv = Path(f"{prefix}_stats.csv")
    log_text = Path(f"{prefix}.log").read_text(errors="replace")
    if rc not in (0, 1) or not stats_csv.exists():
        raise RuntimeError(f"locust exited with {rc}: {shlex.join(cmd)}\n{log_text[-3000:]}")
    with open(stats_csv) as f:
        return {row["Name"]: row for row in csv.DictReader(f)}, log_text


def number(row: dict | None, column: str) -> float:
    try:
        return float(row[column]) if row else float("nan")
    except (KeyError, ValueError):  # "N/A" when nothing was recorded
        return float("nan")


def bench_classify(url: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    results = []
    for users in args.users:
        log(f"/classify with {users} concurrent user(s) for {args.duration} s")
        before = scrape(url)
        rows, _ = run_locust(url, ["ClassifyUser"], users, args.duration, args, workdir)
        hist = batch_histogram(before, scrape(url), "lenet5", "adaptive")
        row = rows.get(CLASSIFY)
        result = {"users": users, "requests": number(row, "Request Count"), "failures": number(row, "Failure Count"),
                  "rps": number(row, "Requests/s"), "p50": number(row, "50%"), "p95": number(row, "95%"),
                  "p99": number(row, "99%"), "mean_batch": hist.mean, "batches": hist.describe()}
        log(f"  {result['rps']:.1f} req/s, p50 {result['p50']:.0f} ms, p95 {result['p95']:.0f} ms, "
            f"{result['failures']:.0f} failures, mean batch {result['mean_batch']:.2f} ({result['batches']})")
        results.append(result)
    return results


def bench_generate(url: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    results = []
    for streams in (1, args.streams):
        log(f"streamed /generate ({args.generate_chars} chars each), {streams} concurrent stream(s), "
            f"{args.duration} s")
        before = scrape(url)
        rows, _ = run_locust(url, ["GenerateStreamUser"], streams, args.duration, args, workdir)
        hist = batch_histogram(before, scrape(url), "char_lstm", "continuous")
        first, complete = rows.get(FIRST_CHAR), rows.get(COMPLETE)
        result = {"streams": streams, "completed": number(complete, "Request Count"),
                  "failures": number(first, "Failure Count") + number(complete, "Failure Count"),
                  "chars_per_s": number(complete, "Requests/s") * args.generate_chars,
                  "first_p50": number(first, "50%"), "first_p95": number(first, "95%"),
                  "full_p50": number(complete, "50%"), "full_p95": number(complete, "95%"),
                  "mean_batch": hist.mean, "batches": hist.describe()}
        log(f"  {result['chars_per_s']:.0f} chars/s, first char p50 {result['first_p50']:.0f} ms, full p50 "
            f"{result['full_p50']:.0f} ms, mean decode batch {result['mean_batch']:.2f}")
        results.append(result)
    return results


def bench_budgets(url: str, args: argparse.Namespace, workdir: Path) -> dict:
    """The load test with budgets, as docs/bench.md documents it: one user per endpoint, all at once;
    the verdict is the locustfile's own (its ``BUDGET EXCEEDED`` lines), not recomputed here."""
    users = len(USER_CLASSES)
    log(f"load test with budgets: {users} users (one per endpoint) for {args.budget_duration} s")
    rows, log_text = run_locust(url, list(USER_CLASSES), users, args.budget_duration, args, workdir,
                                budgets=str(BUDGETS))
    violations = [line.split("BUDGET EXCEEDED ", 1)[1] for line in log_text.splitlines() if "BUDGET EXCEEDED" in line]
    endpoints = [{"endpoint": name, "requests": number(row, "Request Count"), "failures": number(row, "Failure Count"),
                  "p50": number(row, "50%"), "p95": number(row, "95%"), "p99": number(row, "99%")}
                 for name, row in rows.items() if name != "Aggregated"]
    log(f"  budgets {'met' if not violations else 'EXCEEDED: ' + '; '.join(violations)}")
    return {"users": users, "endpoints": endpoints, "violations": violations}


def server_memory(server) -> list[tuple[str, float]]:
    """Resident memory (MiB) of each process of the running server: the arbiter and one per service worker."""
    import psutil

    found = []
    root = psutil.Process(server.process.pid)
    for proc in [root, *root.children(recursive=True)]:
        cmdline = proc.cmdline()
        role = (cmdline[cmdline.index("--service-name") + 1] if "--service-name" in cmdline
                else "arbiter (bentoml serve)")
        found.append((role, proc.memory_info().rss / 2**20))
    return found


def served_models(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/models", timeout=30) as response:
        models = json.load(response)["models"]
    return [f"{m['name']} = {m.get('store_tag')} ({m.get('provider')})" for m in models]


# -- report ------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import bentoml
    import locust
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": f"{cpu}, {os.cpu_count()} logical cores", "os": platform.platform(),
            "versions": f"python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, torch "
                        f"{torch.__version__}, bentoml {bentoml.__version__}, locust {locust.__version__}"}


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN: nothing measured


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def plot(cases: list[Case], classify: list[dict], generate: list[dict], img_dir: Path) -> list[str]:
    """Write the PNGs (only for the parts that ran); returns their file names."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> str:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        write_atomic(img_dir / name, buffer.getvalue())
        return name

    written = []
    if cases:
        fig, axes = plt.subplots(1, len(IMAGE_MODELS), figsize=(11, 4))
        for ax, name in zip(np.atleast_1d(axes), IMAGE_MODELS, strict=True):
            variants = list(dict.fromkeys(c.variant for c in cases if c.model == name))
            for i, batch in enumerate(BATCHES):
                medians = [next(c.median_ms for c in cases if (c.model, c.variant, c.batch) == (name, v, batch))
                           for v in variants]
                ax.bar(np.arange(len(variants)) + 0.4 * i - 0.2, medians, 0.4, label=f"batch {batch}")
            ax.set_xticks(np.arange(len(variants)), variants, rotation=25, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("median latency per call (ms, log)")
            ax.set_title(f"{name}, CPU, in process")
            ax.legend()
        written.append(save(fig, "bench-ort.png"))
    if classify:
        users = [r["users"] for r in classify]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        series = [("requests/s", [("requests/s", [r["rps"] for r in classify])]),
                  ("latency (ms)", [(k, [r[k] for r in classify]) for k in ("p50", "p95", "p99")]),
                  ("mean adaptive batch size", [("mean batch", [r["mean_batch"] for r in classify])])]
        for ax, (ylabel, lines_) in zip(axes, series, strict=True):
            for label, values in lines_:
                ax.plot(users, values, "o-", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(users, [str(u) for u in users])
            ax.set_xlabel("concurrent users")
            ax.set_ylabel(ylabel)
            ax.legend()
        axes[0].set_title("/classify throughput")
        axes[1].set_title("/classify latency")
        axes[2].set_title("batch size (from /metrics)")
        written.append(save(fig, "bench-classify.png"))
    if generate:
        labels = [f"{r['streams']} stream{'s' if r['streams'] > 1 else ''}" for r in generate]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.bar(labels, [r["chars_per_s"] for r in generate])
        left.set_ylabel("characters/s (all streams)")
        left.set_title("/generate throughput")
        x = np.arange(len(generate))
        right.bar(x - 0.2, [r["first_p50"] for r in generate], 0.4, label="first char p50")
        right.bar(x + 0.2, [r["full_p50"] for r in generate], 0.4, label="full stream p50")
        right.set_xticks(x, labels)
        right.set_ylabel("ms")
        right.set_title("/generate latency per stream")
        right.legend()
        written.append(save(fig, "bench-generate.png"))
    return written


def report(args: argparse.Namespace, info: dict, cases: list[Case], notes: list[str], classify: list[dict],
           generate: list[dict], budgets: dict, memory: dict[str, list[tuple[str, float]]], models: list[str],
           images: list[str]) -> str:
    lines = ["# Benchmarks", "",
             f"Written by `{info['command']}` (`make bench`); rerun it rather than editing this file. "
             "Every number below was measured by that run.", "",
             f"- date: {info['date']} (took {info['seconds']:.0f} s)",
             f"- machine: {info['cpu']}; {info['os']}",
             f"- load average (1/5/15 min) at start {info['load_start']}, at end {info['load_end']}: the machine may "
             "be shared, so compare rows of one run, not runs of different days",
             f"- {info['versions']}",
             f"- BentoML store: {os.environ.get('BENTOML_HOME', '~/bentoml')}"]
    if cases:
        lines += ["", "## PyTorch eager vs ONNX Runtime (CPU, in process)", "",
                  "Held-out MNIST digits preprocessed as the service does; 10 warm-up calls, then up to "
                  f"{args.runs} timed calls (at most {args.max_seconds:g} s) per row; one intra-op thread unless "
                  "the variant says more (the server gives ORT every core).", "",
                  "| model | variant | batch | median ms | p90 ms | runs | µs / image | speed vs ORT fp32 | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for c in cases:
            base = next(b.median_ms for b in cases if (b.model, b.variant, b.batch) == (c.model, BASELINE, c.batch))
            lines.append(f"| {c.model} | {c.variant} | {c.batch} | {c.median_ms:.3f} | {c.p90_ms:.3f} | "
                         f"{len(c.times_ms)} | {1000 * c.median_ms / c.batch:.1f} | {base / c.median_ms:.2f}x | "
                         f"{c.note} |")
        lines += ["", f"Speed relative to `{BASELINE}`, the exported graph with ORT's default (online) "
                  "optimizations (2.00x = twice as fast). Models:", ""]
        lines += [f"- {note}" for note in notes]
        if "bench-ort.png" in images:
            lines += ["", "![ORT variants](img/bench-ort.png)"]
    if classify or generate:
        lines += ["", "## Live server under locust", "",
                  f"`bentoml serve service.service:NNServe` on 127.0.0.1 with the service's default settings, "
                  f"driven by `locust -f loadtest/locustfile.py --headless -u N -r N -t {args.duration}s` "
                  "(closed loop: N requests in flight). Locust runs on the same machine and takes CPU from the "
                  "server. Served models:", ""]
        lines += [f"- {m}" for m in models]
    if classify:
        lines += ["", "### /classify (lenet5, PNG upload): adaptive batching", "",
                  "Batch sizes: the `nnserve_batch_size{batcher=\"adaptive\"}` histogram on /metrics, difference "
                  "over the level (bucket upper bounds 1, 2, 4, 8, ...: `3-4:7` = 7 batches of 3 or 4).", "",
                  "| users | requests | failures | req/s | p50 ms | p95 ms | p99 ms | mean batch | batches |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in classify:
            lines.append(f"| {r['users']} | {fmt(r['requests'], 0)} | {fmt(r['failures'], 0)} | {fmt(r['rps'])} | "
                         f"{fmt(r['p50'], 0)} | {fmt(r['p95'], 0)} | {fmt(r['p99'], 0)} | {fmt(r['mean_batch'], 2)} | "
                         f"{r['batches']} |")
        if "bench-classify.png" in images:
            lines += ["", "![/classify](img/bench-classify.png)"]
    if generate:
        lines += ["", "### /generate (char_lstm, streamed): continuous batching", "",
                  f"Each request asks for {args.generate_chars} characters. One stream at a time vs "
                  f"{args.streams} concurrent streams; decode batch sizes from "
                  "`nnserve_batch_size{batcher=\"continuous\"}`.", "",
                  "| streams | completed | failures | chars/s | first char p50 / p95 ms | full stream p50 / p95 ms "
                  "| mean decode batch | batches |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in generate:
            lines.append(f"| {r['streams']} | {fmt(r['completed'], 0)} | {fmt(r['failures'], 0)} | "
                         f"{fmt(r['chars_per_s'], 0)} | {fmt(r['first_p50'], 0)} / {fmt(r['first_p95'], 0)} | "
                         f"{fmt(r['full_p50'], 0)} / {fmt(r['full_p95'], 0)} | {fmt(r['mean_batch'], 2)} | "
                         f"{r['batches']} |")
        if "bench-generate.png" in images:
            lines += ["", "![/generate](img/bench-generate.png)"]
    budget_table = json.loads(BUDGETS.read_text())
    lines += ["", "## Load test with budgets (pass/fail)", "",
              f"`locust -f loadtest/locustfile.py --headless -u 5 -r 5 -t {args.budget_duration}s --host URL` "
              "(one user per endpoint, all at once) exits 1 and logs `BUDGET EXCEEDED <endpoint>: ...` for each "
              "endpoint over its budget in `loadtest/budgets.json` (`--budgets FILE` for another table, "
              "`--budgets none` to skip)."]
    if budgets:
        verdict = "all budgets met" if not budgets["violations"] else "budgets EXCEEDED: " + "; ".join(
            budgets["violations"])
        lines += ["", f"This run ({budgets['users']} users, {args.budget_duration} s, on the server above): "
                  f"**{verdict}**.",
                  "Measured, with the budget in parentheses:", "",
                  "| endpoint | requests | failures | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
        for r in budgets["endpoints"]:
            b = budget_table.get(r["endpoint"], {})
            cells = [f"{fmt(r[k], 0)} ({b.get(f'{k}_ms', '-')})" for k in ("p50", "p95", "p99")]
            lines.append(f"| `{r['endpoint']}` | {fmt(r['requests'], 0)} | {fmt(r['failures'], 0)} "
                         f"(max {b.get('max_error_rate', 0):.0%}) | {' | '.join(cells)} |")
    else:
        lines += ["", "| endpoint | p50 ms | p95 ms | p99 ms | max error rate |", "|---|---:|---:|---:|---:|"]
        for endpoint, budget in budget_table.items():
            lines.append(f"| `{endpoint}` | {budget.get('p50_ms', '-')} | {budget.get('p95_ms', '-')} | "
                         f"{budget.get('p99_ms', '-')} | {budget.get('max_error_rate', 0):.0%} |")
    if memory:
        moments = list(memory)
        lines += ["", "## Server memory", "",
                  "Resident set size (RSS, MiB; shared pages count in each process) of the server's processes, "
                  f"{' and '.join(moments)}.", "",
                  f"| process | {' | '.join(moments)} |", f"|---|{'---:|' * len(moments)}"]
        roles = [role for role, _ in memory[moments[0]]]
        for i, role in enumerate(roles):
            values = [f"{memory[m][i][1]:.0f}" if i < len(memory[m]) else "-" for m in moments]
            lines.append(f"| {role} | {' | '.join(values)} |")
        lines.append(f"| total | {' | '.join(f'{sum(v for _, v in memory[m]):.0f}' for m in moments)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs", help="bench.md goes here, plots in OUT/img")
    p.add_argument("--runs", type=int, default=300, help="timed calls per in-process case (median reported)")
    p.add_argument("--max-seconds", type=float, default=4.0, help="time limit per in-process case")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads of the multi-threaded rows (default: all cores)")
    p.add_argument("--duration", type=int, default=20, help="seconds of locust load per level")
    p.add_argument("--users", type=lambda s: [int(u) for u in s.split(",")], default=[1, 4, 16, 32],
                   help="/classify concurrency levels, comma-separated")
    p.add_argument("--streams", type=int, default=8, help="concurrent /generate streams (compared with 1)")
    p.add_argument("--generate-chars", type=int, default=200, help="characters per /generate request")
    p.add_argument("--budget-duration", type=int, default=60, help="seconds of the load test with budgets")
    p.add_argument("--skip", choices=["in-process", "server"], action="append", default=[],
                   help="leave a part out (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from loadtest.server import running_server

    args = parse_args(argv)
    command = shlex.join(["python", "-m", "loadtest.bench", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    info = {"command": command, "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_start": load_average(), **machine()}
    log(f"{command}: load average {info['load_start']}; output to {args.out}")
    cases, notes, classify, generate, models, budgets, memory = [], [], [], [], [], {}, {}
    with tempfile.TemporaryDirectory(prefix="nnserve-bench-") as tmp:
        workdir = Path(tmp)
        if "in-process" not in args.skip:
            log("part 1: PyTorch eager vs ONNX Runtime, in process")
            cases, notes = bench_in_process(args, workdir)
        if "server" not in args.skip:
            log("parts 2-4: starting bentoml serve (loads and warms up every model)")
            # Own session + stop in finally (loadtest.server): the server goes away even on Ctrl-C or an error.
            with running_server(workdir / "server.log") as server:
                log(f"server ready at {server.http_url}")
                models = served_models(server.http_url)
                memory["ready"] = server_memory(server)
                classify = bench_classify(server.http_url, args, workdir)
                generate = bench_generate(server.http_url, args, workdir)
                budgets = bench_budgets(server.http_url, args, workdir)
                memory["after load"] = server_memory(server)
            log("server stopped")
    info.update(load_end=load_average(), seconds=time.perf_counter() - started)
    images = plot(cases, classify, generate, args.out / "img")
    write_atomic(args.out / "bench.md", report(args, info, cases, notes, classify, generate, budgets, memory,
                                               models, images).encode())
    log(f"wrote {args.out / 'bench.md'} and {', '.join(images)} in {info['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:  # store entry missing, server or locust failed: the message says which
        log(f"FAILED, nothing written: {e}")
        sys.exit(1)
