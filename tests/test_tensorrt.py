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

from export.tensorrt import MAX_SEQ, capability, profile, relocatable, tensorrt_stage
from models.kinds import get_kind
from service import runtime
from service.runtime import TRT, ModelRuntime, verified_engine_problem
from service.settings import Settings

PROVIDERS = [TRT, "CPUExecutionProvider"]
QUIET = Settings(intra_op_threads=1)


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


# ---- service ---------------------------------------------------------------------------------------------

def test_model_without_verified_engine_serves_on_cpu_and_says_why(tmp_path, caplog):
    onnx_path, metadata = tiny_model(tmp_path)
    with caplog.at_level(logging.INFO, logger="nnserve.runtime"):
        served = ModelRuntime("tiny", "1", str(onnx_path), metadata, providers=PROVIDERS, settings=QUIET)
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
        served = ModelRuntime("tiny", "2", str(onnx_path), metadata, providers=PROVIDERS, settings=QUIET)
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
    assert "profile stops at 16" in verified_engine_problem(small, tmp_path, QUIET, True)  # 32 served by default


def test_serve_time_engine_settings_are_reported_as_ignored(tmp_path, caplog):
    onnx_path, metadata = tiny_model(tmp_path)
    runtime._reported_skips.discard("NNSERVE_TRT_FP16")
    with caplog.at_level(logging.WARNING, logger="nnserve.runtime"):
        ModelRuntime("tiny", "3", str(onnx_path), metadata, providers=PROVIDERS,
                     settings=Settings(intra_op_threads=1, trt_fp16=True))
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
                          providers=[TRT, "CUDAExecutionProvider", "CPUExecutionProvider"],
                          settings=Settings(max_batch_size=8, generation_batch_size=8))
    assert served.provider == TRT and served.engine["served"] == "tensorrt", served.engine
    assert served.engine["file"] == "tensorrt/model_ctx.onnx"
    served.warmup((1, 2, 4, 8))
    with pytest.raises((EPFail, Fail, InvalidArgument, RuntimeException)):  # outside the profile: no new engine
        served.run({"input": np.ones((9, 4), np.float32)})
    after = {p.name: runtime.file_sha256(p) for p in (out / "tensorrt").iterdir()}
    assert after == before, "serving wrote to the verified engine directory"
