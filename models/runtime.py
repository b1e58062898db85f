"""One ONNX Runtime session per served model: the runtime both export and the service use.

Export verifies a TensorRT engine through this very class (export/tensorrt.py), and the service serves
its models with it (service/runtime.py loads them from the BentoML store), so the engine checked at export
is the one served. Torch-free and service-free: ``RuntimeOptions`` carries what it needs of the service's
settings.

With ``providers`` putting TensorRT first, a model whose store entry has a verified TensorRT engine
(metadata ``tensorrt``) is served on exactly that engine; every other model runs its ``model.onnx`` on the
remaining providers (CUDA / CPU), with the reason logged once and shown by ``describe()`` (``engine``).

What differs between model kinds (tensor roles, batch axes, example inputs, warm-up shapes, what
``GET /models`` shows) lives in the kind's module (models/kinds).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata as dist_metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.kinds import Kind, get_kind

log = logging.getLogger("nnserve.runtime")

CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeOptions:
    """How a session runs: the service builds it from its settings (service/runtime.py), export directly."""

    providers: tuple[str, ...] = (CPU,)  # preferred order; unavailable ones are skipped (logged once)
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    inter_op_threads: int = 1  # > 1: independent branches of the graph run in parallel (ORT_PARALLEL)
    spinning: bool = False  # ORT intra-op spin-waiting: steals CPU from other sessions on few cores
    max_batch: int = 64  # the largest batch the caller runs (a TensorRT engine's profile must cover it)
    generation_batch: int = 32  # the largest decode-step batch of a generating model

_reported_skips: set[str] = set()
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def choose_providers(requested: list[str] | tuple[str, ...]) -> list[str]:
    """Keep the requested providers that this onnxruntime build offers, in order (each skipped one is logged
    with the reason); CPU is always the last resort."""
    available = set(ort.get_available_providers())
    chosen = []
    for provider in requested:
        if provider in available:
            chosen.append(provider)
        elif provider not in _reported_skips:  # once per process, not once per model
            _reported_skips.add(provider)
            log.info("execution provider %s skipped: not available in this onnxruntime build "
                     "(available: %s)", provider, sorted(available))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


# TensorRT: only the engine that export verified is served (export/tensorrt.py, docs/export.md step 7). The
# store entry holds it as an ONNX Runtime EP-context model, ``tensorrt/model_ctx.onnx``, whose EPContext
# nodes name the serialized engines beside it. Such a node carries no graph, so ORT cannot rebuild an engine
# from it: the engine deserializes (or session creation fails) and an input outside its profile fails the
# call. Models without a verified engine never get the TensorRT EP, which would build its own, unchecked.
TRT = "TensorrtExecutionProvider"
TRT_CACHE_DIR = "tensorrt"
TRT_CTX_FILE = "model_ctx.onnx"
_reported_engines: set[tuple[str, str]] = set()


def profile_option(shapes: dict[str, list[int]]) -> str:
    """The TRT EP's ``trt_profile_*_shapes`` format: ``name:1x3x32x32,other:2x1x64``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def cuda_device_name(index: int = 0) -> str | None:
    """GPU ``index``'s name from nvidia-smi (no torch in the service), or None where it cannot be asked."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def tensorrt_version() -> str | None:
    """The installed TensorRT (the libraries the TRT EP loads), from package metadata, or None if unknown."""
    for dist in ("tensorrt-cu12-libs", "tensorrt-cu13-libs", "tensorrt-cu12", "tensorrt-cu13", "tensorrt"):
        try:
            return dist_metadata.version(dist)
        except dist_metadata.PackageNotFoundError:
            continue
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_engine_problem(entry: dict, model_dir: Path, options: RuntimeOptions, generates: bool) -> str | None:
    """Why the verified engine of store entry ``model_dir`` cannot be served on this host, or None.
    Mismatches ORT would only notice late (or not at all) are checked here: a different GPU model may still
    deserialize an engine tuned for another one."""
    for name, digest in entry["files"].items():  # the exact bytes export verified (~0.3 s per 100 MB)
        path = model_dir / entry["cache_dir"] / name
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != digest:
            return f"{path} differs from the file export verified (sha256)"
    gpu, trt = cuda_device_name(), tensorrt_version()
    if gpu is not None and gpu != entry["gpu"]:
        return f"engine built and verified on {entry['gpu']}, this host has {gpu}"
    if trt is not None and entry.get("tensorrt_version") and trt != entry["tensorrt_version"]:
        return f"engine built with TensorRT {entry['tensorrt_version']}, this host has {trt}"
    biggest = max(options.max_batch, options.generation_batch) if generates else options.max_batch
    if biggest > entry["profile"]["max_batch"]:
        return (f"batches of up to {biggest} are served (NNSERVE_MAX_BATCH_SIZE / NNSERVE_GENERATION_BATCH_SIZE) "
                f"but the engine's profile stops at {entry['profile']['max_batch']} (export --max-batch)")
    return None


def tensorrt_provider_options(entry: dict) -> dict:
    """For an EP-context model: write nothing, build nothing. Op types TensorRT did not take at export stay
    excluded, so the TRT EP cannot claim (and build an engine for) the nodes left to CUDA/CPU."""
    options: dict = {"trt_engine_cache_enable": False, "trt_dump_ep_context_model": False}
    if entry.get("non_tensorrt_ops"):
        options["trt_op_types_to_exclude"] = ",".join(entry["non_tensorrt_ops"])
    return options


def _report_engine(model: str, reason: str, warn: bool = False) -> None:
    """Once per process and model: why it is (not) served on its TensorRT engine."""
    if (model, reason) not in _reported_engines:
        _reported_engines.add((model, reason))
        log.log(logging.WARNING if warn else logging.INFO, "%s: %s", model, reason)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: list[int]  # -1 = dynamic

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]


class ModelRuntime:
    """An ONNX Runtime session plus the store metadata that describes it (name, version, kind, tensors,
    and the facts pre/post-processing needs: ``preprocessing`` and ``labels`` for images, ``vocab`` for text).

    ``session.run`` is thread-safe: the model's batcher thread and its generation thread share it."""

    store_tag: str | None = None  # the store entry (e.g. lenet5-int8:abc) when loaded from the store

    def __init__(self, name: str, version: str, onnx_path: str, metadata: dict,
                 options: RuntimeOptions | None = None, model_dir: str | Path | None = None) -> None:
        options = options or RuntimeOptions()
        self.name, self.version, self.metadata = name, version, metadata
        self.kind: str = metadata["kind"]
        self.kind_module: Kind = get_kind(self.kind)
        if metadata.get("nnserve_format") != 2 or "roles" not in metadata:
            raise RuntimeError(f"{name}: store entry made by an older nnserve (format {metadata.get('nnserve_format')}"
                               f"); re-export it: python -m export artifacts/{name}")
        self.roles: dict = metadata["roles"]
        self.inputs = [TensorSpec(**t) for t in metadata["inputs"]]
        self.outputs = [TensorSpec(**t) for t in metadata["outputs"]]
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        if options.inter_op_threads > 1:  # inter-op threads only ever run in ORT's parallel execution mode
            session_options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        # ORT's intra-op threads spin-wait for work by default. Here several sessions (and the HTTP event
        # loop) share few cores, and spinning threads steal CPU from those with work: measured under mixed
        # load on 2 cores, spinning off tripled image-endpoint throughput (docs/service.md).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
        requested = list(options.providers)
        chosen = choose_providers(requested)
        model_dir = Path(model_dir) if model_dir is not None else Path(onnx_path).parent
        self.session, self.engine = self._session(onnx_path, model_dir, session_options, requested, chosen, options)
        # What the session really uses: a provider that fails to initialise is dropped by ORT.
        self.providers: list[str] = self.session.get_providers()
        self.provider = self.providers[0]
        log.info("loaded %s (%s) on %s (providers %s, %d intra-op threads, %s)", self.tag, self.kind, self.provider,
                 self.providers, session_options.intra_op_num_threads, self.engine["file"])

    def _session(self, onnx_path: str, model_dir: Path, options: ort.SessionOptions, requested: list[str],
                 chosen: list[str], runtime_options: RuntimeOptions) -> tuple[ort.InferenceSession, dict]:
        """The verified TensorRT engine when the providers put TensorRT first and this host can run it;
        otherwise ``onnx_path`` on the other providers. Returns (session, what ``describe()`` says of it)."""
        entry = self.metadata.get("tensorrt")
        why: str | None
        if TRT not in requested:
            why = "TensorRT not requested (NNSERVE_PROVIDERS)"
        elif not entry:
            why = "no verified TensorRT engine in this store entry (export --tensorrt on a GPU host makes one)"
        elif TRT not in chosen:
            why = f"TensorRT EP not in this onnxruntime build (available: {ort.get_available_providers()})"
        elif chosen[0] != TRT:
            why = f"TensorRT is not first in NNSERVE_PROVIDERS ({requested})"
        else:
            why = verified_engine_problem(entry, model_dir, runtime_options, self.kind_module.generates)
            if why is None:
                ctx = model_dir / entry["onnx_file"]
                try:
                    session = ort.InferenceSession(str(ctx), options, providers=chosen, provider_options=[
                        tensorrt_provider_options(entry) if p == TRT else {} for p in chosen])
                except Exception as e:  # e.g. TensorRT refuses an engine from another version: no rebuild
                    why = f"the verified engine failed to load ({type(e).__name__}: {e})"
                else:
                    if session.get_providers()[0] == TRT:
                        _report_engine(self.tag, f"serving the TensorRT engine verified at export ({ctx})")
                        keys = ("gpu", "tensorrt_version", "fp16", "profile", "parity")
                        return session, {"served": "tensorrt", "file": entry["onnx_file"], "reason": None,
                                         **{k: entry.get(k) for k in keys}}
                    why = f"onnxruntime did not initialise the TensorRT EP (providers {session.get_providers()})"
        if entry:
            why = f"verified TensorRT engine not served: {why}"
        rest = [p for p in chosen if p != TRT]  # never the TRT EP on a graph: it would build an unverified engine
        _report_engine(self.tag, f"serving {Path(onnx_path).name} on {rest[0]}: {why}", warn=bool(entry))
        session = ort.InferenceSession(onnx_path, options, providers=rest)
        return session, {"served": "onnx", "file": Path(onnx_path).name, "reason": why}

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def batch_axis(self, tensor: str) -> int:
        return self.kind_module.batch_axis(self.metadata, tensor)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or [t.name for t in self.outputs]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def example_feeds(self, batch: int, seq_len: int = 1) -> dict[str, np.ndarray]:
        """Zero inputs of the right dtypes for ``batch`` items (text models: ``seq_len`` tokens each)."""
        return self.kind_module.example_feeds(self.metadata, self.inputs, batch, seq_len)

    def warmup(self, batch_sizes: tuple[int, ...]) -> float:
        """Run each served batch shape once: ORT's first call per new shape is slow (and TensorRT builds an
        engine for it)."""
        start = time.perf_counter()
        for feeds in self.kind_module.warmup_feeds(self.metadata, self.inputs, batch_sizes):
            self.run(feeds)
        seconds = time.perf_counter() - start
        log.info("warmed up %s on batch sizes %s in %.2f s", self.tag, list(batch_sizes), seconds)
        return seconds

    def describe(self) -> dict:
        """JSON-able summary for ``GET /models``: identity, provider, tensors, parity certificate, and
        the kind's own facts (labels / vocabulary size)."""
        return {"name": self.name, "version": self.version, "store_tag": self.store_tag, "kind": self.kind,
                "variant": self.metadata.get("variant"), "provider": self.provider, "providers": self.providers,
                "engine": self.engine,
                "inputs": [vars(t) for t in self.inputs], "outputs": [vars(t) for t in self.outputs],
                "parity": self.metadata.get("parity"), "roles": self.roles,
                **self.kind_module.describe(self.metadata)}
