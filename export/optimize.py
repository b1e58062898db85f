"""ONNX Runtime offline graph optimization, kept only if measurably faster, and CPU latency benchmarks.

ORT already optimizes a graph every time a session loads it, so an offline-optimized file mainly
saves load time and may or may not run faster; hence the measurement. ``extended`` (not ``all``) is
the highest level whose saved graph is not tied to this machine's CPU (``all`` adds NCHWc layouts).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

log = logging.getLogger("nnserve.export")

LATENCY_BATCHES = (1, 32)
BLOCK = 5
MIN_SPEEDUP = 0.02  # below 2% we call it noise on a shared CPU and keep the plain, portable graph


def optimize_graph(src: Path, dst: Path) -> Path:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


def bench_feeds(metadata: dict, batch: int) -> dict[str, np.ndarray]:
    """Inputs at ``batch`` in the kind's shapes (a text model: one decode step, the serving hot path): floats
    random, integers (token ids) 0."""
    from models.kinds import get_kind
    from models.runtime import TensorSpec

    rng = np.random.default_rng(0)
    inputs = [TensorSpec(**t) for t in metadata["inputs"]]
    feeds = get_kind(metadata["kind"]).example_feeds(metadata, inputs, batch)
    return {n: rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in feeds.items()}


def compare_latency(paths: dict[str, Path], metadata: dict, runs: int) -> dict[str, dict]:
    """Median (and min, p90) latency in ms per batch size for each graph, plus session load time.

    The graphs take turns in blocks of BLOCK runs, so a busy shared CPU slows them all alike and the
    comparison stays fair even when the absolute numbers wobble. (Turns of single runs are unfair:
    ORT's idle worker threads spin for a while after a run and steal the next session's cores.)
    """
    sessions: dict[str, ort.InferenceSession] = {}
    result: dict[str, dict] = {}
    for label, path in paths.items():
        start = time.perf_counter()
        sessions[label] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        result[label] = {"load_ms": round(1000 * (time.perf_counter() - start), 1)}
    for batch in LATENCY_BATCHES:
        feeds = bench_feeds(metadata, batch)
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(max(3, runs // 10)):  # warm-up: the first runs per shape allocate
            for session in sessions.values():
                session.run(None, feeds)
        rounds = max(1, runs // BLOCK)
        for _ in tqdm(range(rounds), desc=f"latency batch {batch} ({', '.join(sessions)})", unit="round",
                      leave=False):
            for label, session in sessions.items():
                session.run(None, feeds)  # untimed: the previous session's threads may still be spinning
                for _ in range(BLOCK):
                    t0 = time.perf_counter()
                    session.run(None, feeds)
                    times[label].append(1000 * (time.perf_counter() - t0))
        for label, samples in times.items():
            result[label][f"batch_{batch}"] = {"median_ms": round(statistics.median(samples), 4),
                                               "min_ms": round(min(samples), 4),
                                               "p90_ms": round(float(np.percentile(samples, 90)), 4),
                                               "runs": len(samples)}
    for label, lat in result.items():
        log.info("latency %s: %s", label, ", ".join(
            f"batch {b} {lat[f'batch_{b}']['median_ms']:.3f} ms" for b in LATENCY_BATCHES))
    return result


def total_median(latency: dict) -> float:
    return sum(latency[f"batch_{b}"]["median_ms"] for b in LATENCY_BATCHES)


def choose_optimized(base: dict, optimized: dict) -> tuple[bool, str]:
    """Keep the optimized graph only if the summed medians are at least MIN_SPEEDUP lower."""
    b, o = total_median(base), total_median(optimized)
    speedup = (b - o) / b
    if speedup >= MIN_SPEEDUP:
        return True, f"optimized graph {100 * speedup:.1f}% faster (sum of median latencies)"
    return False, f"optimized graph not faster ({100 * speedup:+.1f}%, threshold {100 * MIN_SPEEDUP:.0f}%)"
