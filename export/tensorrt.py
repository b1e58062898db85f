"""TensorRT for GPU hosts: build once at export, verify, and ship exactly that engine to the service.

Design: ONNX Runtime's TensorRT execution provider builds the engine from the plain (not ORT-optimized)
graph and dumps an *EP-context model* (``tensorrt/model_ctx.onnx``): an ONNX graph whose ``EPContext``
nodes point at the serialized engine files beside it (embed mode 0). The service loads that file, so
it runs the very engines checked here. Why an EP-context model rather than a plain engine cache:

- a cache is only a hint: the TRT EP rebuilds an engine whenever its cache key (model hash, GPU, TRT
  version, profile) misses, or an input falls outside the cached profile, and nothing tells the caller.
  An ``EPContext`` node carries no graph to rebuild from: the engine deserializes or session creation
  fails, and a shape outside the profile fails the call (ORT PR #18217). No unverified engine can appear.
- the service needs no second ONNX graph: weights live in the engines, so the store keeps ``model.onnx``
  (CPU/CUDA) plus ``tensorrt/`` and nothing else.
- it replaces the hand-rolled TensorRT-Python-API build/run code of the first version, whose ``.plan``
  the service never read; the service reuses one provider set-up (``models.runtime``) for both.

Verification goes through ``models.runtime.ModelRuntime`` itself (what the service serves with), loaded
from a relocated copy of the files (the store lives elsewhere than the build directory), against ONNX
Runtime CPU on the source graph.
fp32 engines are built with TF32 off (``NVIDIA_TF32_OVERRIDE=0``: the TRT EP has no TF32 option) so the
tolerance can be 1e-3 relative; fp16 engines get 1e-2. Elsewhere the stage is skipped with its reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models import runtime
from models.kinds import get_kind
from models.kinds.base import cpu_session, errors

log = logging.getLogger("nnserve.export")

MAX_SEQ = 2048  # token inputs: covers service.generation's MAX_PROMPT_CHARS (2000), prefilled in one call
PARITY_SEQ = 16  # token length of the batch-7 check (the others use T=1, the decode step)


def capability() -> tuple[bool, str]:
    """(True, "what builds it") when this host can build and run TRT EP engines, else (False, why not)."""
    available = ort.get_available_providers()
    if runtime.TRT not in available:
        return False, f"TensorRT EP not in this onnxruntime build (available: {available})"
    # Asked of the driver (nvidia-smi), not torch: the project's torch is the CPU wheel, which sees no GPU
    # on a host that has one, and the service compares engines by this very name.
    name = runtime.cuda_device_name()
    if name is None:
        smi = "nvidia-smi not found" if shutil.which("nvidia-smi") is None else "nvidia-smi lists no GPU"
        return False, f"no CUDA device visible ({smi})"
    return True, f"onnxruntime {ort.__version__} TensorRT EP, TensorRT {runtime.tensorrt_version()} on {name}"


def gpu_name() -> str:
    """The GPU's name as the service compares it (nvidia-smi's); capability() has checked there is one."""
    name = runtime.cuda_device_name()
    if name is None:
        raise RuntimeError("no CUDA device visible (nvidia-smi)")
    return name


def profile(metadata: dict, max_batch: int, batch_axis: Callable[[str], int]) -> dict[str, dict[str, list[int]]]:
    """min / opt / max shape of every input: batch 1 .. max_batch on ``batch_axis(name)``, other dynamic
    axes (the token sequence) 1 .. MAX_SEQ. opt is the serving hot path: half the max batch, T=1."""
    shapes: dict[str, dict[str, list[int]]] = {"min": {}, "opt": {}, "max": {}}
    for spec in metadata["inputs"]:
        axis = batch_axis(spec["name"])
        for level, batch, seq in (("min", 1, 1), ("opt", max(1, max_batch // 2), 1), ("max", max_batch, MAX_SEQ)):
            shapes[level][spec["name"]] = [batch if i == axis else seq if d == -1 else d
                                           for i, d in enumerate(spec["shape"])]
    return shapes


def random_feeds(metadata: dict, batch: int, seq: int, batch_axis: Callable[[str], int],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in metadata["inputs"]:
        axis = batch_axis(spec["name"])
        shape = [batch if i == axis else seq if d == -1 else d for i, d in enumerate(spec["shape"])]
        if spec["dtype"].startswith("int"):  # token ids
            feeds[spec["name"]] = rng.integers(0, len(metadata.get("vocab", [])) or 2, shape).astype(spec["dtype"])
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return feeds


def build(onnx_path: Path, trt_dir: Path, shapes: dict, fp16: bool) -> None:
    """Let the TRT EP build the engines (explicit profiles: at session creation) and dump the EP-context
    model into ``trt_dir``, engines and timing cache beside it."""
    ctx = trt_dir / runtime.TRT_CTX_FILE
    options = ort.SessionOptions()
    # The same three settings as the provider options below; ORT maps them 1:1 (PR #19154) and newer
    # releases write the context model from the session-level ones (several EPContext nodes, PR #23294).
    options.add_session_config_entry("ep.context_enable", "1")
    options.add_session_config_entry("ep.context_file_path", str(ctx))
    options.add_session_config_entry("ep.context_embed_mode", "0")
    trt_options = {
        "trt_fp16_enable": fp16, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_dir),
        "trt_engine_cache_prefix": "nnserve", "trt_timing_cache_enable": True, "trt_timing_cache_path": str(trt_dir),
        "trt_dump_ep_context_model": True, "trt_ep_context_file_path": str(ctx), "trt_ep_context_embed_mode": 0,
        **{f"trt_profile_{level}_shapes": runtime.profile_option(shapes[level]) for level in ("min", "opt", "max")},
    }
    tf32 = os.environ.get("NVIDIA_TF32_OVERRIDE")
    if not fp16:
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # read by TensorRT when it builds: fp32 kernels stay fp32
    try:
        providers = [(runtime.TRT, trt_options), "CUDAExecutionProvider", "CPUExecutionProvider"]
        ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as e:  # ORT's own exception types: one type for the pipeline to catch
        raise RuntimeError(f"the TensorRT EP could not build {onnx_path.name}: {type(e).__name__}: {e}") from e
    finally:
        if tf32 is None:
            os.environ.pop("NVIDIA_TF32_OVERRIDE", None)
        else:
            os.environ["NVIDIA_TF32_OVERRIDE"] = tf32
    if not ctx.is_file():
        raise RuntimeError(f"the TensorRT EP wrote no EP-context model ({runtime.TRT_CTX_FILE}) into {trt_dir}")


def relocatable(trt_dir: Path) -> tuple[list[str], list[str]]:
    """Make each EPContext node name its engine relative to the context model (the store moves the files),
    and return (engine files, op types TensorRT did not take). Raises if an engine lies outside ``trt_dir``."""
    ctx = trt_dir / runtime.TRT_CTX_FILE
    model = onnx.load(str(ctx))
    engines, others, changed = [], set(), False
    for node in model.graph.node:
        if node.op_type != "EPContext":
            others.add(node.op_type)
            continue
        attrs = {a.name: a for a in node.attribute}
        if "embed_mode" not in attrs or attrs["embed_mode"].i != 0:  # the op's default, 1, embeds the engine
            raise RuntimeError("EPContext node embeds its engine; expected embed mode 0")
        path = Path(attrs["ep_cache_context"].s.decode())
        if path.is_absolute() or not (trt_dir / path).is_file():  # absolute, or relative to the working dir
            if not path.resolve().is_relative_to(trt_dir.resolve()):
                raise RuntimeError(f"EPContext node {node.name} names {path}, outside {trt_dir}")
            path = path.resolve().relative_to(trt_dir.resolve())
            attrs["ep_cache_context"].s = path.as_posix().encode()
            changed = True
        if not (trt_dir / path).is_file():
            raise RuntimeError(f"EPContext node {node.name} names {path}, which is not in {trt_dir}")
        engines.append(str(path))
    if not engines:
        raise RuntimeError(f"{runtime.TRT_CTX_FILE} has no EPContext node: TensorRT took none of the graph")
    if changed:
        onnx.save(model, str(ctx))
    return engines, sorted(others)


def check_parity(served: runtime.ModelRuntime, onnx_path: Path, metadata: dict, batches: list[tuple[int, int]],
                 batch_axis: Callable[[str], int], tolerance: float) -> dict:
    """The served runtime vs ORT CPU on the source graph, on random inputs at each (batch, seq)."""
    reference, names = cpu_session(onnx_path), [t["name"] for t in metadata["outputs"]]
    rng, checks = np.random.default_rng(0), list[dict]()
    for batch, seq in batches:
        feeds = random_feeds(metadata, batch, seq, batch_axis, rng)
        got = served.run(feeds)
        checks.append({"batch": batch, "seq": seq,
                       "errors": errors(reference.run(names, feeds), [got[n] for n in names], names)})
    max_rel = max(c["errors"][n]["max_rel"] for c in checks for n in names)
    return {"reference": "onnxruntime CPU, source graph", "max_rel": max_rel, "tolerance_max_rel": tolerance,
            "passed": max_rel <= tolerance, "checks": checks}


def tensorrt_stage(onnx_path: Path, out_dir: Path, metadata: dict, opts,
                   batch_axis: Callable[[str], int] | None = None) -> tuple[dict, dict]:
    """Build, verify and keep the TensorRT engine for ``onnx_path`` (the plain exported graph) in
    ``out_dir / "tensorrt"``. Returns (report, metadata_extra): extra is ``{"tensorrt": {...}}`` only when
    parity passed, else empty. ``opts`` needs ``fp16`` and ``max_batch``; ``batch_axis(input_name)``
    defaults to the kind's (models/kinds) for ``metadata["kind"]``. Raises RuntimeError when the build fails."""
    ok, reason = capability()
    if not ok:
        log.info("%s: TensorRT skipped: %s", metadata["name"], reason)
        return {"skipped": reason}, {}
    batch_axis = batch_axis or (lambda name: get_kind(metadata["kind"]).batch_axis(metadata, name))
    shapes = profile(metadata, opts.max_batch, batch_axis)
    trt_dir = out_dir / runtime.TRT_CACHE_DIR
    shutil.rmtree(trt_dir, ignore_errors=True)  # ORT will not overwrite an existing context model
    trt_dir.mkdir(parents=True)
    log.info("%s: building TensorRT engine (%s, fp16=%s, batch 1..%d)", metadata["name"], reason, opts.fp16,
             opts.max_batch)
    build(onnx_path, trt_dir, shapes, opts.fp16)
    entry = engine_entry(trt_dir, onnx_path, shapes, opts, gpu_name(), runtime.tensorrt_version())
    # Verify what the service will run: its own runtime, from a copy in another directory.
    with tempfile.TemporaryDirectory(prefix="nnserve-trt-verify-") as tmp:
        shutil.copytree(trt_dir, Path(tmp) / runtime.TRT_CACHE_DIR)
        options = runtime.RuntimeOptions(providers=(runtime.TRT, "CUDAExecutionProvider", runtime.CPU),
                                         max_batch=opts.max_batch, generation_batch=min(32, opts.max_batch))
        served = runtime.ModelRuntime(metadata["name"], "export-check", str(onnx_path),
                                      {**metadata, "tensorrt": entry}, options, model_dir=tmp)
        if served.engine["served"] != "tensorrt":
            raise RuntimeError(f"the service would not serve the engine just built: {served.engine['reason']}")
        parity = verify(served, onnx_path, metadata, opts, batch_axis)
    return keep_if_verified(trt_dir, entry, parity, metadata["name"])


def engine_entry(trt_dir: Path, onnx_path: Path, shapes: dict, opts, gpu: str, tensorrt_version: str | None) -> dict:
    """The store metadata's ``tensorrt`` entry for the engines ORT dumped into ``trt_dir``: EPContext nodes
    made relative (the store moves the files), every file's sha256, the profile and the build facts."""
    engines, other_ops = relocatable(trt_dir)
    files = sorted(p for p in trt_dir.rglob("*") if p.is_file())
    return {"onnx_file": f"{runtime.TRT_CACHE_DIR}/{runtime.TRT_CTX_FILE}", "cache_dir": runtime.TRT_CACHE_DIR,
            "files": {p.relative_to(trt_dir).as_posix(): runtime.file_sha256(p) for p in files},
            "engines": engines, "non_tensorrt_ops": other_ops, "source_onnx_sha256": runtime.file_sha256(onnx_path),
            "profile": {**shapes, "max_batch": opts.max_batch, "max_seq": MAX_SEQ}, "fp16": bool(opts.fp16),
            "tf32": False, "gpu": gpu, "tensorrt_version": tensorrt_version, "onnxruntime_version": ort.__version__}


def verify(served: runtime.ModelRuntime, onnx_path: Path, metadata: dict, opts,
           batch_axis: Callable[[str], int]) -> dict:
    """``check_parity`` at batch 1, 7 (a token sequence) and the profile's max; tolerance 1e-3 relative for
    fp32 engines, 1e-2 for fp16. An engine that cannot run its own profile is a failed build."""
    tolerance = 1e-2 if opts.fp16 else 1e-3
    batches = [(1, 1), (min(7, opts.max_batch), PARITY_SEQ), (opts.max_batch, 1)]  # (batch, seq)
    try:
        return check_parity(served, onnx_path, metadata, batches, batch_axis, tolerance)
    except Exception as e:  # ORT's own exception types: one type for the pipeline to catch
        raise RuntimeError(f"the verified-engine runtime failed: {type(e).__name__}: {e}") from e


def keep_if_verified(trt_dir: Path, entry: dict, parity: dict, name: str) -> tuple[dict, dict]:
    """(report, metadata extra): the engine directory stays, and the entry goes into the store metadata, only
    when parity passed; otherwise the directory is removed, so no unverified engine reaches the store."""
    log.info("%s: TensorRT parity vs ORT CPU: max rel error %.3g (tolerance %g) -> %s", name, parity["max_rel"],
             parity["tolerance_max_rel"], "engine kept" if parity["passed"] else "engine NOT kept")
    report = {**entry, "parity": parity}
    if not parity["passed"]:
        shutil.rmtree(trt_dir)
        return report, {}
    return report, {"tensorrt": {**entry, "parity": {k: v for k, v in parity.items() if k != "checks"}}}
