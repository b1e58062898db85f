"""One artifact -> verified ONNX graphs -> BentoML model store entries (see docs/export.md).

Everything is built and checked in a temporary directory first; the store is touched only at the very
end, one ``bentoml.models.create`` per variant, so a failure anywhere leaves the store as it was.
"""

from __future__ import annotations

import json
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
from export.fold import prepare_for_export
from export.graph import EXPORTER, OPSET, assert_no_bn_dropout, export_onnx, io_specs, op_counts, wrap
from export.samples import image_samples, text_samples
from export.store import FORMAT, find_export, register
from models.artifact import CARD, WEIGHTS, load_artifact, read_card, sha256_file

log = logging.getLogger("nnserve.export")

ONNX_FILE = "model.onnx"
PORTABLE_FILE = "model.portable.onnx"  # shipped beside an ORT-optimized model.onnx, for GPU providers
REPORT_FILE = "export_report.json"


@dataclass
class Options:
    int8: bool = False
    tensorrt: bool = False
    fp16: bool = False
    if_missing: bool = False
    max_abs_error: float = parity.MAX_ABS_ERROR
    int8_max_drop: float = 1.0  # CNN top-1 points
    int8_max_bpc_increase: float = 0.05  # char LMs, held-out bits/char
    bench_runs: int = 100
    max_batch: int = 64
    report_dir: Path | None = Path("exported")
    register: bool = True


@dataclass
class Result:
    name: str
    tags: dict[str, str] = field(default_factory=dict)  # variant -> "name:version"
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why
    report: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # requested steps that did not pass their gate


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
             "onnxruntime": ort.__version__, "bentoml": bentoml.__version__, "numpy": np.__version__}
    return {k: str(v) for k, v in found.items()}  # torch's is a str subclass that YAML cannot represent


def store_metadata(card: dict, variant: str, graph: onnx.ModelProto, parity_summary: dict, metrics: dict,
                   source: dict, extra: dict | None = None) -> dict:
    """The model-store contract of docs/architecture.md: everything the service needs to serve it."""
    inputs, outputs = io_specs(graph)
    meta = {"nnserve_format": FORMAT, "name": card["name"], "kind": card["kind"], "arch": card["config"]["arch"],
            "variant": variant, "onnx_file": ONNX_FILE, "inputs": inputs, "outputs": outputs}
    if card["kind"] == "char_lm":
        config = card["config"]
        meta["vocab"] = card["vocab"]
        meta["rnn"] = {"cell": config["arch"].removeprefix("char_"), "num_layers": config["num_layers"],
                       "hidden_size": config["hidden_size"]}
    else:
        meta["preprocessing"] = card["preprocessing"]
        meta["labels"] = card["labels"]
    meta.update(parity=parity_summary, metrics=metrics, **source, opset=OPSET, exporter=EXPORTER,
                versions=versions(), **(extra or {}))
    return meta


def without_checks(certificate: dict) -> dict:
    """The certificate's summary for the store metadata; the per-check numbers go to the report."""
    return {k: v for k, v in certificate.items() if k != "checks"}


def export_artifact(artifact_dir: str | Path, opts: Options) -> Result:
    """Export, verify, optimize (and quantize / build TensorRT if asked), then register. Raises on failure."""
    artifact_dir = Path(artifact_dir)
    card = read_card(artifact_dir)
    name = card["name"]
    source = {"source_sha256": sha256_file(artifact_dir / WEIGHTS) if (artifact_dir / WEIGHTS).is_file() else "",
              "source_card_sha256": sha256_file(artifact_dir / CARD), "source_artifact": str(artifact_dir.resolve())}
    result = Result(name)
    wanted = {"fp32": name, **({"int8": f"{name}-int8"} if opts.int8 else {})}
    existing: dict[str, str] = {}
    if opts.if_missing:
        for variant, store_name in wanted.items():
            tag = find_export(store_name, source["source_sha256"], source["source_card_sha256"])
            if tag:
                existing[variant] = tag
                result.skipped[variant] = f"{tag} already exported from this artifact"
                log.info("%s: %s already in the store (same source sha256), skipped", store_name, tag)
        if len(result.skipped) == len(wanted):
            return result

    started = time.perf_counter()
    model, card = load_artifact(artifact_dir)
    log.info("%s: loaded %s (%s), %d parameters", name, artifact_dir, card["kind"],
             sum(p.numel() for p in model.parameters()))
    reference = wrap(model, card)  # the original eval module: parity is measured against it
    folded, fold_info = prepare_for_export(model)
    wrapper = wrap(folded, card)
    samples = text_samples(card) if card["kind"] == "char_lm" else image_samples(card)

    with tempfile.TemporaryDirectory(prefix=f"nnserve-export-{name}-") as tmp:
        work = Path(tmp)
        fp32_dir, int8_dir = work / "fp32", work / "int8"
        fp32_dir.mkdir()
        before = export_onnx(reference, card, work / "unfolded.onnx", check=False, exporter_folds_bn=False)
        log.info("%s: exporting ONNX (opset %d)", name, OPSET)
        graph = export_onnx(wrapper, card, work / "exported.onnx")
        assert_no_bn_dropout(graph)
        log.info("%s: graph ops %s", name, op_counts(graph))
        log.info("%s: parity certificate (ORT CPU vs PyTorch)", name)
        certificate = parity.certify(reference, work / "exported.onnx", card, samples, opts.max_abs_error)

        probe_meta = store_metadata(card, "fp32", graph, {}, {}, source)  # I/O specs for benchmark inputs
        optimize.optimize_graph(work / "exported.onnx", work / "optimized.onnx")
        candidates = {"fp32": work / "exported.onnx", "optimized": work / "optimized.onnx"}
        int8_report = None
        if opts.int8:
            from export.quantize import quantize

            int8_dir.mkdir()
            int8_report = quantize(work / "exported.onnx", int8_dir / ONNX_FILE, card, samples, probe_meta, opts)
            candidates["int8"] = int8_dir / ONNX_FILE
            if not int8_report["passed"]:
                result.problems.append(f"{name}-int8 not registered: {int8_report['verdict']}")

        log.info("%s: CPU latency of %s (%d runs per batch size)", name, list(candidates), opts.bench_runs)
        latency = optimize.compare_latency(candidates, probe_meta, opts.bench_runs)
        # Offline ORT optimization: kept only if measured faster.
        use_optimized, why = optimize.choose_optimized(latency["fp32"], latency["optimized"])
        log.info("%s: %s -> serving the %s graph", name, why, "optimized" if use_optimized else "plain")
        certificate_optimized = None
        shutil.copy2(work / "exported.onnx", fp32_dir / (PORTABLE_FILE if use_optimized else ONNX_FILE))
        if use_optimized:
            certificate_optimized = parity.certify(reference, work / "optimized.onnx", card, samples,
                                                   opts.max_abs_error)
            shutil.copy2(work / "optimized.onnx", fp32_dir / ONNX_FILE)

        report = {
            "name": name, "kind": card["kind"], **source, "opset": OPSET, "exporter": EXPORTER,
            "versions": versions(), "folding": fold_info,
            "nodes": {"before_folding": sum(op_counts(before).values()), "after_folding": len(graph.graph.node),
                      "ops_before_folding": op_counts(before), "ops_after_folding": op_counts(graph)},
            "parity": certificate, "parity_optimized": certificate_optimized,
            "optimization": {"level": "extended", "served": "optimized" if use_optimized else "plain",
                             "decision": why},
            "latency_cpu": latency,
            "file_bytes": {"fp32": (work / "exported.onnx").stat().st_size,
                           "optimized": (work / "optimized.onnx").stat().st_size},
            "test_metrics": card.get("metrics", {}),
        }
        if int8_report is not None:
            int8_report["latency_change"] = {  # int8 / fp32 median latency
                f"batch_{b}": round(latency["int8"][f"batch_{b}"]["median_ms"] /
                                    latency["fp32"][f"batch_{b}"]["median_ms"], 3) for b in optimize.LATENCY_BATCHES}
            report["int8"] = int8_report
        metrics = dict(card.get("metrics", {}))
        if "onnx_accuracy" in certificate:
            metrics["onnx_test_accuracy"] = certificate["onnx_accuracy"]
        extra = {"portable_onnx_file": PORTABLE_FILE} if use_optimized else {}

        if opts.tensorrt:
            from export.tensorrt import tensorrt_report

            try:
                report["tensorrt"] = tensorrt_report(work / "exported.onnx", fp32_dir, probe_meta, opts)
            except RuntimeError as e:  # parse/build failures: fp32 is still fine to register
                report["tensorrt"] = {"failed": str(e)}
            trt = report["tensorrt"]
            if trt.get("engine_file"):
                extra["tensorrt"] = {k: v for k, v in trt.items() if k != "checks"}
            elif "skipped" not in trt:
                result.problems.append(f"{name}: TensorRT engine not saved: {trt.get('failed') or trt['parity']}")
        else:
            report["tensorrt"] = {"skipped": "not requested (--tensorrt)"}
        report["export_seconds"] = round(time.perf_counter() - started, 1)

        fp32_meta = store_metadata(card, "fp32", graph, without_checks(certificate), metrics, source, extra)
        write_json(fp32_dir / REPORT_FILE, report)
        fp32_tag = existing.get("fp32")
        if opts.register and "fp32" not in result.skipped:
            fp32_tag = result.tags["fp32"] = register(name, fp32_dir, fp32_meta)
        if opts.register and opts.int8 and "int8" not in result.skipped and report["int8"]["passed"]:
            int8_graph = onnx.load(str(int8_dir / ONNX_FILE))
            int8_metrics = {**metrics, **report["int8"]["metrics"]}
            int8_meta = store_metadata(card, "int8", int8_graph, report["int8"]["parity"], int8_metrics, source,
                                       {"quantization": report["int8"]["method"], "fp32_tag": fp32_tag})
            write_json(int8_dir / REPORT_FILE, report)
            result.tags["int8"] = register(f"{name}-int8", int8_dir, int8_meta)
    report["registered"] = result.tags
    if opts.report_dir is not None:
        write_json(Path(opts.report_dir) / f"{name}.json", report)
    result.report = report
    log.info("%s: done in %.1f s: %s", name, time.perf_counter() - started, result.tags)
    return result


def write_json(path: Path, data: dict) -> None:
    """Write via a temp file and rename, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
