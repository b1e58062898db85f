"""Part 1, in process, CPU: lenet5 and vgg_fc7 at batch 1 and 32, PyTorch eager (the training artifact the
store entry was exported from) vs ONNX Runtime: the exported fp32 graph with ORT's default (online)
optimizations, the same with graph optimizations off, the offline ORT-optimized graph, and ``<name>-int8``
if registered; one intra-op thread (what the server gives each session: cores / workers = 1 on 2 cores with
2 workers), plus PyTorch and ORT fp32 on every core for comparison. Real held-out digits; warm-up
first, then the median of many timed runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loadtest.bench.common import log

if TYPE_CHECKING:
    import bentoml

IMAGE_MODELS = ("lenet5", "vgg_fc7")
BATCHES = (1, 32)


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

    from harness.data import held_out_digits
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
    from models.artifact import WEIGHTS, load_artifact, sha256_file
    from models.kinds import get_kind

    artifact = Path(metadata.get("source_artifact", ""))
    if not (artifact / WEIGHTS).is_file():
        return None, f"source artifact {artifact} not found"
    if sha256_file(artifact / WEIGHTS) != metadata.get("source_sha256"):
        return None, f"{artifact} was retrained after this export (weights sha256 differs)"
    model, card = load_artifact(artifact)
    return get_kind(card["kind"]).export_wrapper(model, card), ""


@dataclass
class Variant:
    label: str
    threads: int
    run: Callable[[np.ndarray], object]
    note: str = ""
    torch: bool = False  # torch's thread count is process-wide: set before timing


def model_variants(name: str, workdir: Path, all_threads: int) -> tuple[list[Variant], bentoml.Model, list[str]]:
    """The variants of one image model, its store entry, and notes on variants left out.

    Single-threaded rows compare per-core cost and hold up on a shared box; the ``all_threads`` rows show
    what intra-op threading adds (the server runs each session with cores / workers threads)."""
    import bentoml
    import torch

    from export.optimize import optimize_graph
    from service.runtime import store_model
    from service.settings import Settings

    # A RuntimeError saying "run make export" if it is missing.
    entry = store_model(Settings.from_env().model_tags[name])
    meta: dict[str, Any] = entry.info.metadata
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
        int8_meta: dict[str, Any] = int8.info.metadata
        variants.append(Variant("ORT INT8", 1, ort_run(Path(int8.path_of(int8_meta["onnx_file"])), 1),
                                str(int8.tag)))
    except bentoml.exceptions.NotFound:
        skipped.append(f"{name} INT8: no {name}-int8 in the store (`python -m export --int8` registers it when "
                       "it passes the accuracy gate)")
    return variants, entry, skipped


REFERENCE = "ORT fp32, 1 thread"


def bench_in_process(args: argparse.Namespace, workdir: Path) -> tuple[list[Case], list[str]]:
    import torch

    cases, notes = [], []
    for name in IMAGE_MODELS:
        variants, entry, skipped = model_variants(name, workdir, args.threads)
        notes += [f"{name}: {entry.tag}"] + [f"not measured: {s}" for s in skipped]
        meta: dict[str, Any] = entry.info.metadata
        batches = image_batches(meta["preprocessing"])
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
