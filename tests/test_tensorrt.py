"""TensorRT: export builds and verifies an EP-context engine; the service serves that engine or none.

On a CPU host the export stage must skip with its reason, and the runtime must serve ``model.onnx`` on
CPU saying why. The ``gpu`` test builds a real engine and is skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail, InvalidArgument, RuntimeException

from export.tensorrt import (
    MAX_SEQ,
    capability,
    check_parity,
    engine_entry,
    keep_if_verified,
    profile,
    relocatable,
    tensorrt_stage,
    verify,
)
from models import runtime
from models.kinds import get_kind
from models.runtime import TRT, ModelRuntime, RuntimeOptions, verified_engine_problem
from service.runtime import runtime_options
from service.settings import Settings

QUIET = RuntimeOptions(providers=(TRT, "CPUExecutionProvider"), intra_op_threads=1)
CPU_ONLY = RuntimeOptions(intra_op_threads=1)


def tiny_model(folder: Path) -> tuple[Path, dict]:
    """logits = input @ W + b, batch dynamic: (model.onnx path, the store metadata the runtime needs)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    metadata = {"nnserve_format": 2, "name": "tiny", "kind": "image_classifier", "onnx_file": "model.onnx",
                "roles": {"image": "input", "scores": "logits"},
                "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 4]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 3]}],
                "labels": ["a", "b", "c"], "preprocessing": {}}
    return path, metadata


def fake_entry(files: dict[str, str], max_batch: int = 64) -> dict:
    """A metadata ``tensorrt`` entry as export writes it (contents beside the point on a CPU host)."""
    return {"onnx_file": "tensorrt/model_ctx.onnx", "cache_dir": "tensorrt", "files": files,
            "engines": ["nnserve_0.engine"], "non_tensorrt_ops": [], "gpu": "NVIDIA H200", "fp16": False,
            "tensorrt_version": "10.0.0", "profile": {"max_batch": max_batch, "max_seq": MAX_SEQ}}


def no_tensorrt_here() -> None:
    if TRT in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the TensorRT EP; the CPU-host behaviour is not observable")


# ---- export ----------------------------------------------------------------------------------------------

def test_stage_is_skipped_with_its_reason_without_tensorrt(tmp_path):
    ok, reason = capability()
    if ok:
        pytest.skip(f"TensorRT can run here ({reason}); test_engine_export_verifies_what_the_service_runs covers it")
    onnx_path, metadata = tiny_model(tmp_path / "src")
    report, extra = tensorrt_stage(onnx_path, tmp_path / "out", metadata, SimpleNamespace(fp16=False, max_batch=8))
    assert report == {"skipped": reason} and extra == {}
    assert reason.startswith(("TensorRT EP not in this onnxruntime build (available: [", "no CUDA device"))
    assert not (tmp_path / "out").exists(), "a skipped stage writes nothing"


def test_profile_takes_batch_axes_from_the_kind():
    metadata = {"kind": "sequence_lm", "inputs": [{"name": "tokens", "dtype": "int64", "shape": [-1, -1]},
                                                  {"name": "h", "dtype": "float32", "shape": [2, -1, 32]}],
                "roles": {"tokens": "tokens", "scores": "logits", "state": [["h", "h_out"]]}}
    shapes = profile(metadata, 64, lambda name: get_kind("sequence_lm").batch_axis(metadata, name))
    assert shapes["min"] == {"tokens": [1, 1], "h": [2, 1, 32]}
    assert shapes["opt"] == {"tokens": [32, 1], "h": [2, 32, 32]}
    assert shapes["max"] == {"tokens": [64, MAX_SEQ], "h": [2, 64, 32]}
    assert runtime.profile_option(shapes["max"]) == f"tokens:64x{MAX_SEQ},h:2x64x32"


def test_context_model_is_made_relocatable(tmp_path):
    """An EPContext node naming its engine by absolute path would break once the store copies the files."""
    trt_dir = tmp_path / "tensorrt"
    trt_dir.mkdir()
    (trt_dir / "nnserve_0.engine").write_bytes(b"engine")
    node = helper.make_node("EPContext", ["input"], ["logits"], domain="com.microsoft", embed_mode=0,
                            ep_cache_context=str(trt_dir / "nnserve_0.engine"))
    graph = helper.make_graph([node, helper.make_node("Identity", ["logits"], ["out"])], "ctx",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph), str(trt_dir / "model_ctx.onnx"))
    assert relocatable(trt_dir) == (["nnserve_0.engine"], ["Identity"])
    saved = onnx.load(str(trt_dir / "model_ctx.onnx")).graph.node[0]
    assert {a.name: a for a in saved.attribute}["ep_cache_context"].s == b"nnserve_0.engine"


def ep_context_dir(folder: Path) -> Path:
    """What the TRT EP dumps: ``model_ctx.onnx`` whose EPContext node names an engine file beside it (the bytes
    stand in for an engine; nothing here deserializes them)."""
    trt_dir = folder / "tensorrt"
    trt_dir.mkdir(parents=True)
    (trt_dir / "nnserve_0.engine").write_bytes(b"engine")
    (trt_dir / "timing.cache").write_bytes(b"cache")
    node = helper.make_node("EPContext", ["input"], ["logits"], domain="com.microsoft", embed_mode=0,
                            ep_cache_context=str(trt_dir / "nnserve_0.engine"))
    graph = helper.make_graph([node], "ctx", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph), str(trt_dir / "model_ctx.onnx"))
    return trt_dir


def test_engine_entry_lists_every_file_with_its_hash_and_the_build_facts(tmp_path):
    onnx_path, metadata = tiny_model(tmp_path / "src")
    trt_dir = ep_context_dir(tmp_path / "out")
    shapes = profile(metadata, 8, lambda name: 0)
    entry = engine_entry(trt_dir, onnx_path, shapes, SimpleNamespace(fp16=True, max_batch=8), "NVIDIA H100", "10.1")
    assert entry["onnx_file"] == "tensorrt/model_ctx.onnx" and entry["cache_dir"] == "tensorrt"
    assert set(entry["files"]) == {"model_ctx.onnx", "nnserve_0.engine", "timing.cache"}
    assert entry["files"]["nnserve_0.engine"] == runtime.file_sha256(trt_dir / "nnserve_0.engine")
    assert entry["engines"] == ["nnserve_0.engine"] and entry["non_tensorrt_ops"] == []
    assert entry["source_onnx_sha256"] == runtime.file_sha256(onnx_path)
    assert entry["profile"]["max"] == {"input": [8, 4]} and entry["profile"]["max_batch"] == 8
    assert (entry["fp16"], entry["tf32"], entry["gpu"]) == (True, False, "NVIDIA H100")
    # What the service checks before serving it: the entry describes the files exactly as they are.
    problem = verified_engine_problem({**entry, "tensorrt_version": None}, tmp_path / "out",
                                      RuntimeOptions(max_batch=8, generation_batch=8), False)
    gpu = runtime.cuda_device_name()
    assert problem == (None if gpu in (None, "NVIDIA H100") else f"engine built and verified on NVIDIA H100, "
                                                                  f"this host has {gpu}")


def test_parity_check_passes_for_the_same_graph_on_the_cpu_provider(tmp_path):
    onnx_path, metadata = tiny_model(tmp_path)
    served = ModelRuntime("tiny", "cpu", str(onnx_path), metadata, CPU_ONLY)
    parity = verify(served, onnx_path, metadata, SimpleNamespace(fp16=False, max_batch=8), lambda name: 0)
    assert parity["passed"] and parity["max_rel"] <= 1e-6 and parity["tolerance_max_rel"] == 1e-3
    assert [(c["batch"], c["seq"]) for c in parity["checks"]] == [(1, 1), (7, 16), (8, 1)]
    assert parity["reference"] == "onnxruntime CPU, source graph"


def test_parity_check_fails_for_a_runtime_that_computes_something_else(tmp_path):
    onnx_path, metadata = tiny_model(tmp_path / "source")
    other_path, _ = tiny_model(tmp_path / "other")
    model = onnx.load(str(other_path))
    weights = numpy_helper.to_array(model.graph.initializer[1])
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(weights + 0.1, "b"))  # a bias off by 0.1
    onnx.save(model, str(other_path))
    served = ModelRuntime("tiny", "off", str(other_path), metadata, CPU_ONLY)
    parity = check_parity(served, onnx_path, metadata, [(2, 1)], lambda name: 0, tolerance=1e-2)
    assert not parity["passed"] and parity["max_rel"] > 1e-2
    assert parity["checks"][0]["errors"]["logits"]["max_abs"] == pytest.approx(0.1, rel=1e-3)


def test_engine_is_kept_only_when_parity_passed(tmp_path):
    onnx_path, metadata = tiny_model(tmp_path / "src")
    opts = SimpleNamespace(fp16=False, max_batch=8)
    passed = {"passed": True, "max_rel": 1e-5, "tolerance_max_rel": 1e-3, "checks": [{"batch": 1}]}
    kept_dir = ep_context_dir(tmp_path / "kept")
    entry = engine_entry(kept_dir, onnx_path, profile(metadata, 8, lambda name: 0), opts, "gpu", None)
    report, extra = keep_if_verified(kept_dir, entry, passed, "tiny")
    assert kept_dir.is_dir() and report["parity"] == passed
    assert extra["tensorrt"]["parity"] == {k: v for k, v in passed.items() if k != "checks"}  # the summary only
    assert extra["tensorrt"]["files"] == entry["files"]

    failed = {**passed, "passed": False, "max_rel": 0.5}
    dropped_dir = ep_context_dir(tmp_path / "dropped")
    report, extra = keep_if_verified(dropped_dir, entry, failed, "tiny")
    assert extra == {} and not dropped_dir.exists(), "an unverified engine must not reach the store"
    assert report["parity"]["passed"] is False


# ---- service ---------------------------------------------------------------------------------------------

def test_model_without_verified_engine_serves_on_cpu_and_says_why(tmp_path, caplog):
    onnx_path, metadata = tiny_model(tmp_path)
    with caplog.at_level(logging.INFO, logger="nnserve.runtime"):
        served = ModelRuntime("tiny", "1", str(onnx_path), metadata, QUIET)
    assert served.provider == "CPUExecutionProvider" and TRT not in served.providers
    assert served.engine["served"] == "onnx" and served.engine["file"] == "model.onnx"
    assert served.engine["reason"].startswith("no verified TensorRT engine in this store entry")
    assert served.describe()["engine"] == served.engine
    assert "tiny:1: serving model.onnx on CPUExecutionProvider: no verified TensorRT engine" in caplog.text
    assert served.run({"input": np.ones((2, 4), np.float32)})["logits"].shape == (2, 3)


def test_verified_engine_without_tensorrt_ep_serves_on_cpu_and_says_why(tmp_path, caplog):
    no_tensorrt_here()
    onnx_path, metadata = tiny_model(tmp_path)
    metadata["tensorrt"] = fake_entry({})
    with caplog.at_level(logging.WARNING, logger="nnserve.runtime"):
        served = ModelRuntime("tiny", "2", str(onnx_path), metadata, QUIET)
    assert served.provider == "CPUExecutionProvider"
    assert served.engine["served"] == "onnx"
    assert served.engine["reason"].startswith(
        "verified TensorRT engine not served: TensorRT EP not in this onnxruntime build (available: [")
    assert "tiny:2: serving model.onnx on CPUExecutionProvider: verified TensorRT engine not served" in caplog.text


def test_engine_files_must_be_the_verified_ones_and_cover_the_served_batches(tmp_path):
    (tmp_path / "tensorrt").mkdir()
    engine = tmp_path / "tensorrt" / "nnserve_0.engine"
    engine.write_bytes(b"verified bytes")
    good = {"nnserve_0.engine": runtime.file_sha256(engine)}
    assert "missing" in verified_engine_problem(fake_entry({**good, "gone.engine": "0"}), tmp_path, QUIET, True)
    engine.write_bytes(b"tampered bytes")
    assert "differs from the file export verified" in verified_engine_problem(fake_entry(good), tmp_path, QUIET, True)
    engine.write_bytes(b"verified bytes")
    if runtime.cuda_device_name() is None and runtime.tensorrt_version() is None:  # no GPU facts to compare here
        assert verified_engine_problem(fake_entry(good), tmp_path, QUIET, True) is None
    small = fake_entry(good, max_batch=16)
    assert "profile stops at 16" in verified_engine_problem(small, tmp_path, QUIET, True)  # 32 generated by default


def test_serve_time_engine_settings_are_reported_as_ignored(tmp_path, caplog):
    onnx_path, metadata = tiny_model(tmp_path)
    import service.runtime

    service.runtime._warned.discard("NNSERVE_TRT_FP16")
    with caplog.at_level(logging.WARNING, logger="nnserve.runtime"):
        runtime_options(Settings(intra_op_threads=1, trt_fp16=True))
    assert "NNSERVE_TRT_FP16=True is ignored" in caplog.text


# ---- GPU hosts only --------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_engine_export_verifies_what_the_service_runs(tmp_path):
    ok, reason = capability()
    if not ok:
        pytest.skip(reason)
    onnx_path, metadata = tiny_model(tmp_path / "src")
    out = tmp_path / "entry"  # stands for the store entry: model.onnx + tensorrt/
    out.mkdir()
    shutil.copy2(onnx_path, out / "model.onnx")
    report, extra = tensorrt_stage(onnx_path, out, metadata, SimpleNamespace(fp16=False, max_batch=8))
    assert report["parity"]["passed"], report["parity"]
    entry = extra["tensorrt"]
    assert entry["onnx_file"] == "tensorrt/model_ctx.onnx" and entry["cache_dir"] == "tensorrt"
    assert entry["engines"] and set(entry["engines"]) <= set(entry["files"])
    before = {p.name: runtime.file_sha256(p) for p in (out / "tensorrt").iterdir()}

    served = ModelRuntime("tiny", "gpu", str(out / "model.onnx"), {**metadata, **extra},
                          RuntimeOptions(providers=(TRT, "CUDAExecutionProvider", "CPUExecutionProvider"),
                                         max_batch=8, generation_batch=8))
    assert served.provider == TRT and served.engine["served"] == "tensorrt", served.engine
    assert served.engine["file"] == "tensorrt/model_ctx.onnx"
    served.warmup((1, 2, 4, 8))
    with pytest.raises((EPFail, Fail, InvalidArgument, RuntimeException)):  # outside the profile: no new engine
        served.run({"input": np.ones((9, 4), np.float32)})
    after = {p.name: runtime.file_sha256(p) for p in (out / "tensorrt").iterdir()}
    assert after == before, "serving wrote to the verified engine directory"
