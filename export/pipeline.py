"""One artifact -> verified ONNX graphs -> BentoML model store entries (see docs/export.md).

Named stages, run in order by ``export_artifact``:

1. ``read_source``   card validated (JSON Schema + the kind's checks), source hashes
2. ``torch_stage``   a PyTorch network: build + load weights, probe, fold BN / drop dropout, export, parity
   ``onnx_stage``    an ONNX file made elsewhere: checker, I/O, dynamic batch, reference parity
3. ``optimize_stage`` ORT offline optimization, kept only if measured faster
4. ``int8_stage``    optional INT8, gated on the kind's quality measure
5. ``tensorrt_stage`` optional TensorRT engine (GPU hosts; skipped with the reason elsewhere)
6. ``register_stage`` store entries, one ``bentoml.models.create`` per variant

Everything is built and checked in a temporary directory first; the store is touched only at the very end,
so a failure anywhere leaves the store as it was.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bentoml
import numpy as np
import onnx
import onnxruntime as ort
import torch

from export import optimize, parity
from export.fold import finish_onnx_folding, prepare_for_export
from export.graph import EXPORTER, OPSET, assert_no_bn_dropout, check_graph, export_onnx, io_specs, op_counts
from export.store import FORMAT, check_name_free, find_export, register
from models.artifact import CARD, WEIGHTS, load_artifact, read_card, sha256_file, write_json
from models.kinds import Kind, KindError, get_kind

log = logging.getLogger("nnserve.export")

ONNX_FILE = "model.onnx"
REPORT_FILE = "export_report.json"


@dataclass
class Options:
    """Every export option and its default, in one place (the CLI in export/__main__.py reads these)."""
    int8: bool = False
    tensorrt: bool = False
    fp16: bool = False
    if_missing: bool = False
    max_abs_error: float = parity.MAX_ABS_ERROR
    int8_max_drop: float = 1.0  # image models: top-1 points
    int8_max_bpc_increase: float = 0.05  # language models: held-out bits per token
    bench_runs: int = 100
    max_batch: int = 64
    report_dir: Path | None = Path("exported")
    register: bool = True
    eval_data: Path | None = None  # the user's evaluation images (folder per label, .npz) or text file
    strict_fold: bool = False  # a BatchNorm that cannot be folded is an error, not a scale-and-shift
    make_batch_dynamic: bool = False  # ONNX files made elsewhere: rewrite a fixed batch (verified)


@dataclass
class Result:
    name: str
    tags: dict[str, str] = field(default_factory=dict)  # variant -> "name:version"
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why
    report: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # requested steps that did not pass their gate


@dataclass
class Source:
    """The artifact as read: its validated card, kind and the hashes that identify it in the store."""
    directory: Path
    card: dict
    kind: Kind
    hashes: dict

    @property
    def name(self) -> str:
        return self.card["name"]


@dataclass
class Graph:
    """The verified fp32 graph and what export learned making it."""
    path: Path
    model: onnx.ModelProto
    roles: dict
    certificate: dict
    samples: object
    extra_metadata: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
             "onnxruntime": ort.__version__, "bentoml": bentoml.__version__, "numpy": np.__version__}
    return {k: str(v) for k, v in found.items()}  # torch's is a str subclass that YAML cannot represent


# ---- 1. the source ---------------------------------------------------------------------------------------

def read_source(artifact_dir: Path) -> Source:
    card = read_card(artifact_dir)
    kind = get_kind(card["kind"])
    kind.check_card(card)
    source_file = artifact_dir / (card["onnx"]["file"] if "onnx" in card else card.get("weights", WEIGHTS))
    hashes = {"source_sha256": sha256_file(source_file) if source_file.is_file() else "",
              "source_card_sha256": sha256_file(artifact_dir / CARD), "source_artifact": str(artifact_dir.resolve())}
    return Source(artifact_dir, card, kind, hashes)


def already_exported(source: Source, wanted: dict[str, str], result: Result) -> dict[str, str]:
    """Variants whose store already holds an export of this very artifact (``--if-missing``)."""
    existing = {}
    for variant, store_name in wanted.items():
        tag = find_export(store_name, source.hashes["source_sha256"], source.hashes["source_card_sha256"])
        if tag:
            existing[variant] = tag
            result.skipped[variant] = f"{tag} already exported from this artifact"
            log.info("%s: %s already in the store (same source sha256), skipped", store_name, tag)
    return existing


# ---- 2. the fp32 graph -------------------------------------------------------------------------------------

def torch_stage(source: Source, work: Path, opts: Options) -> Graph:
    """Build the network, check it against its card, fold, export, certify parity against the eager module."""
    model, card = load_artifact(source.directory)
    kind = source.kind
    log.info("%s: loaded %s (%s), %d parameters", source.name, source.directory, card["kind"],
             sum(p.numel() for p in model.parameters()))
    reference = kind.export_wrapper(model, card)  # the original eval module: parity is measured against it
    widths = kind.probe(reference, card)
    folded, fold_info = prepare_for_export(model, strict_fold=opts.strict_fold)
    wrapper = kind.export_wrapper(folded, card)
    samples = kind.load_samples(card, source.directory, opts.eval_data)

    before = export_onnx(reference, kind, card, work / "unfolded.onnx", check=False, exporter_folds_bn=False)
    log.info("%s: exporting ONNX (opset %d)", source.name, OPSET)
    path = work / "exported.onnx"
    export_onnx(wrapper, kind, card, path, check=False)
    fold_info = finish_onnx_folding(path, fold_info, opts.strict_fold)
    graph = check_graph(path)
    assert_no_bn_dropout(graph)
    log.info("%s: graph ops %s", source.name, op_counts(graph))
    log.info("%s: parity certificate (ORT CPU vs PyTorch, %s)", source.name, samples.source)
    certificate = parity.certify(kind, reference, path, source.name, samples, opts.max_abs_error)
    roles = kind.roles_for(wrapper.output_names, wrapper.input_names, card)
    _, outputs = io_specs(graph)
    return Graph(path, graph, roles, certificate, samples,
                 extra_metadata=kind.store_metadata(card, roles, outputs, model),
                 report={"folding": fold_info, "output_widths": widths,
                         "nodes": {"before_folding": sum(op_counts(before).values()),
                                   "after_folding": len(graph.graph.node), "ops_before_folding": op_counts(before),
                                   "ops_after_folding": op_counts(graph)}})


def onnx_stage(source: Source, work: Path, opts: Options) -> Graph:
    """An ONNX file made elsewhere: no eager reference, so the certificate lists what was checked."""
    from export.foreign import prepare_foreign

    card, kind = source.card, source.kind
    declared, roles = kind.foreign_io(card, source.directory / card["onnx"]["file"])
    samples = kind.load_samples(card, source.directory, opts.eval_data)
    path = work / "exported.onnx"
    reference = card["onnx"].get("reference")
    certificate = prepare_foreign(
        source.directory / card["onnx"]["file"], path, declared, lambda n: kind.foreign_feeds(card, declared, n),
        make_dynamic=opts.make_batch_dynamic or card["onnx"].get("make_batch_dynamic", False),
        reference_npz=source.directory / reference if reference else None, tolerance=opts.max_abs_error,
        strict_fold=opts.strict_fold)
    graph = onnx.load(str(path))
    certificate.update(kind.foreign_quality(path, roles, samples))
    _, outputs = io_specs(graph)
    before = op_counts(onnx.load(str(source.directory / card["onnx"]["file"]), load_external_data=False))
    return Graph(path, graph, roles, certificate, samples, extra_metadata=kind.store_metadata(card, roles, outputs),
                 report={"folding": certificate.pop("folding"),
                         "nodes": {"before_folding": sum(before.values()), "after_folding": len(graph.graph.node),
                                   "ops_before_folding": before, "ops_after_folding": op_counts(graph)}})


# ---- 3-5. optimized, INT8 and TensorRT variants ----------------------------------------------------------------

def optimize_stage(source: Source, fp32: Graph, work: Path, probe_meta: dict, opts: Options,
                   extra_candidates: dict[str, Path]) -> tuple[Path, dict]:
    """ORT's offline-optimized graph, kept only if measurably faster (and re-certified when it is)."""
    optimize.optimize_graph(fp32.path, work / "optimized.onnx")
    candidates = {"fp32": fp32.path, "optimized": work / "optimized.onnx", **extra_candidates}
    log.info("%s: CPU latency of %s (%d runs per batch size)", source.name, list(candidates), opts.bench_runs)
    latency = optimize.compare_latency(candidates, probe_meta, opts.bench_runs)
    use_optimized, why = optimize.choose_optimized(latency["fp32"], latency["optimized"])
    log.info("%s: %s -> serving the %s graph", source.name, why, "optimized" if use_optimized else "plain")
    report = {"optimization": {"level": "extended", "served": "optimized" if use_optimized else "plain",
                               "decision": why},
              "latency_cpu": latency, "file_bytes": {"fp32": fp32.path.stat().st_size,
                                                     "optimized": (work / "optimized.onnx").stat().st_size}}
    if use_optimized and "config" in source.card:
        model, card = load_artifact(source.directory)
        report["parity_optimized"] = parity.certify(source.kind, source.kind.export_wrapper(model, card),
                                                    work / "optimized.onnx", source.name, fp32.samples,
                                                    opts.max_abs_error)
    return (work / "optimized.onnx" if use_optimized else fp32.path), report


def int8_stage(source: Source, fp32: Graph, out: Path, probe_meta: dict, opts: Options) -> dict:
    from export.quantize import quantize

    try:
        return quantize(source.kind, fp32.path, out, probe_meta, fp32.samples, opts)
    except KindError as e:  # e.g. no evaluation data to gate on: fp32 is still fine to register
        return {"passed": False, "verdict": str(e)}


def tensorrt_stage(fp32: Graph, out_dir: Path, metadata: dict, opts: Options) -> tuple[dict, dict]:
    """A TensorRT engine verified against ORT CPU, stored for the service to run as is (export/tensorrt.py)."""
    if not opts.tensorrt:
        return {"skipped": "not requested (--tensorrt)"}, {}
    from export.tensorrt import tensorrt_stage as build

    try:  # the plain graph: TensorRT does its own fusions
        return build(fp32.path, out_dir, metadata, opts)
    except RuntimeError as e:  # build/run failures: fp32 is still fine to register
        return {"failed": str(e)}, {}


# ---- 6. the store -------------------------------------------------------------------------------------------

def store_metadata(source: Source, fp32: Graph, variant: str, graph: onnx.ModelProto, parity_summary: dict,
                   metrics: dict, extra: dict | None = None) -> dict:
    """The model-store contract of docs/architecture.md: everything the service needs to serve it."""
    inputs, outputs = io_specs(graph)
    return {"nnserve_format": FORMAT, "name": source.name, "kind": source.card["kind"], "variant": variant,
            "onnx_file": ONNX_FILE, "inputs": inputs, "outputs": outputs, **fp32.extra_metadata,
            "parity": parity_summary, "metrics": metrics, **source.hashes, "opset": OPSET,
            "exporter": EXPORTER if "config" in source.card else "ONNX file made elsewhere",
            "versions": versions(), **(extra or {})}


def without_checks(certificate: dict) -> dict:
    """The certificate's summary for the store metadata; the per-check numbers go to the report."""
    return {k: v for k, v in certificate.items() if k not in ("checks", "torch_continuation", "onnx_continuation")}


def export_artifact(artifact_dir: str | Path, opts: Options) -> Result:
    """Export, verify, optimize (and quantize / build TensorRT if asked), then register. Raises on failure."""
    started = time.perf_counter()
    source = read_source(Path(artifact_dir))
    name, result = source.name, Result(source.name)
    wanted = {"fp32": name, **({"int8": f"{name}-int8"} if opts.int8 else {})}
    existing = already_exported(source, wanted, result) if opts.if_missing else {}
    if len(existing) == len(wanted):
        return result
    if opts.register:
        for store_name in wanted.values():
            check_name_free(store_name, source.card["kind"])

    with tempfile.TemporaryDirectory(prefix=f"nnserve-export-{name}-") as tmp:
        work = Path(tmp)
        fp32_dir, int8_dir = work / "fp32", work / "int8"
        fp32_dir.mkdir()
        fp32 = (onnx_stage if "onnx" in source.card else torch_stage)(source, work, opts)
        probe_meta = store_metadata(source, fp32, "fp32", fp32.model, {}, {})  # I/O specs for benchmark inputs
        report = {"name": name, "kind": source.card["kind"], **source.hashes, "opset": OPSET, "versions": versions(),
                  **fp32.report, "parity": fp32.certificate}
        int8_report = None
        if opts.int8:
            int8_dir.mkdir()
            int8_report = report["int8"] = int8_stage(source, fp32, int8_dir / ONNX_FILE, probe_meta, opts)
            if not int8_report["passed"]:
                result.problems.append(f"{name}-int8 not registered: {int8_report['verdict']}")
        served, optimize_report = optimize_stage(
            source, fp32, work, probe_meta, opts,
            {"int8": int8_dir / ONNX_FILE} if int8_report and (int8_dir / ONNX_FILE).is_file() else {})
        report.update(optimize_report)
        shutil.copy2(served, fp32_dir / ONNX_FILE)
        if int8_report and "ops" in int8_report:
            latency = report["latency_cpu"]
            int8_report["latency_change"] = {  # int8 / fp32 median latency
                f"batch_{b}": round(latency["int8"][f"batch_{b}"]["median_ms"] /
                                    latency["fp32"][f"batch_{b}"]["median_ms"], 3) for b in optimize.LATENCY_BATCHES}
        report["tensorrt"], extra = tensorrt_stage(fp32, fp32_dir, probe_meta, opts)
        if opts.tensorrt and not extra and "skipped" not in report["tensorrt"]:
            trt = report["tensorrt"]
            why = trt.get("failed") or {k: v for k, v in trt.get("parity", {}).items() if k != "checks"}
            result.problems.append(f"{name}: TensorRT engine not kept: {why}")
        report["export_seconds"] = round(time.perf_counter() - started, 1)

        metrics = dict(source.card.get("metrics", {}))
        if "onnx_accuracy" in fp32.certificate:
            metrics["onnx_test_accuracy"] = fp32.certificate["onnx_accuracy"]
        write_json(fp32_dir / REPORT_FILE, report)
        fp32_tag = existing.get("fp32")
        if opts.register and "fp32" not in existing:
            fp32_meta = store_metadata(source, fp32, "fp32", onnx.load(str(fp32_dir / ONNX_FILE)),
                                       without_checks(fp32.certificate), metrics, extra)
            fp32_tag = result.tags["fp32"] = register(name, fp32_dir, fp32_meta)
        if opts.register and int8_report and int8_report["passed"] and "int8" not in existing:
            int8_meta = store_metadata(source, fp32, "int8", onnx.load(str(int8_dir / ONNX_FILE)),
                                       int8_report["parity"], {**metrics, **int8_report["metrics"]},
                                       {"quantization": int8_report["method"], "fp32_tag": fp32_tag})
            write_json(int8_dir / REPORT_FILE, report)
            result.tags["int8"] = register(f"{name}-int8", int8_dir, int8_meta)
    report["registered"] = result.tags
    if opts.report_dir is not None:
        write_json(Path(opts.report_dir) / f"{name}.json", report)
    result.report = report
    log.info("%s: done in %.1f s: %s", name, time.perf_counter() - started, result.tags)
    return result
