"""TensorRT engine for GPU hosts, behind a capability check (skipped with its reason elsewhere).

Engines are tied to the GPU model and TensorRT version that built them, so both are recorded. One
optimization profile covers batch 1..max (and sequence 1..MAX_SEQ for the char LMs). Device buffers
are torch CUDA tensors: torch is already an export dependency, so no pycuda / cuda-python is needed.
Parity is checked against ONNX Runtime CPU on random inputs at batch 1, 7 and max. TF32 is switched
off for fp32 engines so the tolerance can stay tight (1e-3 relative); FP16 engines get 1e-2.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.optimize import bench_feeds
from export.parity import cpu_session, errors

log = logging.getLogger("nnserve.export")

MAX_SEQ = 256
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def capability() -> tuple[bool, str]:
    """(True, "TensorRT x on GPU") when an engine can be built and run here, else (False, why not)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return False, f"tensorrt is not importable ({e}); install the .[gpu] extra on a CUDA host"
    import torch

    if not torch.cuda.is_available():
        smi = "nvidia-smi not found" if shutil.which("nvidia-smi") is None else "nvidia-smi present"
        return False, f"no CUDA device visible to torch ({smi}); TensorRT {trt.__version__} cannot run"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def ort_gpu_providers() -> list[str]:
    """The GPU execution providers this onnxruntime build offers the service (NNSERVE_PROVIDERS)."""
    return [p for p in ort.get_available_providers() if p in GPU_PROVIDERS]


def profile_shapes(spec: dict, kind: str, max_batch: int) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shapes: batch is axis 0, except the RNN state [layers, B, hidden]."""
    batch_axis = 1 if kind == "char_lm" and spec["name"] != "tokens" else 0
    shapes = []
    for batch, seq in ((1, 1), (max(1, max_batch // 2), 1), (max_batch, MAX_SEQ)):
        shape = list(spec["shape"])
        shape[batch_axis] = batch
        shapes.append(tuple(seq if d == -1 else d for d in shape))
    return shapes[0], shapes[1], shapes[2]


def build_engine(onnx_path: Path, metadata: dict, max_batch: int, fp16: bool) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {problems}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for spec in metadata["inputs"]:
        profile.set_shape(spec["name"], *profile_shapes(spec, metadata["kind"], max_batch))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
    return bytes(serialized)


def run_engine(engine_bytes: bytes, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    keep = {name: torch.from_numpy(np.ascontiguousarray(a)).cuda() for name, a in feeds.items()}
    for name, tensor in keep.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    for name in output_names:
        dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
        keep[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, keep[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return [keep[name].cpu().numpy() for name in output_names]


def tensorrt_report(onnx_path: Path, out_dir: Path, metadata: dict, opts) -> dict:
    """Build, check and save the engine into ``out_dir``; or say why it was skipped."""
    providers = ort_gpu_providers()
    ok, reason = capability()
    if not ok:
        log.info("TensorRT skipped: %s", reason)
        return {"skipped": reason, "ort_gpu_providers": providers}
    import tensorrt as trt
    import torch

    gpu = torch.cuda.get_device_name(0)
    log.info("%s: building TensorRT engine (%s, fp16=%s, batch 1..%d)", metadata["name"], reason, opts.fp16,
             opts.max_batch)
    engine = build_engine(onnx_path, metadata, opts.max_batch, opts.fp16)
    tolerance = 1e-2 if opts.fp16 else 1e-3
    names = [t["name"] for t in metadata["outputs"]]
    session, checks = cpu_session(onnx_path), []
    for batch in (1, 7, opts.max_batch):
        feeds = bench_feeds(metadata, batch)
        checks.append({"batch": batch, "errors": errors(session.run(None, feeds), run_engine(engine, feeds, names),
                                                        names)})
    max_rel = max(c["errors"][n]["max_rel"] for c in checks for n in names)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    engine_file = f"model.{slug}.trt{trt.__version__}.plan"
    passed = max_rel <= tolerance
    if passed:
        (out_dir / engine_file).write_bytes(engine)
    log.info("%s: TensorRT parity vs ORT CPU: max rel error %.3g (tolerance %g) -> %s", metadata["name"], max_rel,
             tolerance, "engine saved" if passed else "engine NOT saved")
    return {"engine_file": engine_file if passed else None, "gpu": gpu, "tensorrt_version": trt.__version__,
            "cuda": torch.version.cuda, "fp16": opts.fp16, "max_batch": opts.max_batch, "max_seq": MAX_SEQ,
            "engine_bytes": len(engine), "parity": {"reference": "onnxruntime CPU", "max_rel": max_rel,
                                                    "tolerance_max_rel": tolerance, "passed": passed},
            "checks": checks, "ort_gpu_providers": providers,
            "note": "engines only run on this GPU model with this TensorRT version"}
