"""One ONNX Runtime session per served model, loaded from the BentoML model store by tag.

What differs between model kinds (tensor roles, batch axes, example inputs, warm-up shapes, what
``GET /models`` shows) lives in the kind's module (models/kinds); this module never imports torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.kinds import Kind, get_kind
from service.settings import Settings

log = logging.getLogger("nnserve.runtime")

_reported_skips: set[str] = set()
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def choose_providers(requested: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Keep the requested providers that this onnxruntime build offers, in order (each skipped one is logged
    with the reason); CPU is always the last resort. Default order: ``NNSERVE_PROVIDERS``'s."""
    if requested is None:
        requested = Settings.from_env().providers
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


def provider_options(provider: str, settings: Settings) -> dict:
    """TensorRT builds an engine per input shape, which takes minutes: cache them on disk so a restart
    reuses them; FP16 only when asked."""
    if provider != "TensorrtExecutionProvider":
        return {}
    cache = Path(settings.trt_cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_fp16_enable": settings.trt_fp16}


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
                 providers: list[str] | None = None, settings: Settings | None = None) -> None:
        settings = settings or Settings.from_env()
        self.name, self.version, self.metadata = name, version, metadata
        self.kind: str = metadata["kind"]
        self.kind_module: Kind = get_kind(self.kind)
        if metadata.get("nnserve_format") != 2 or "roles" not in metadata:
            raise RuntimeError(f"{name}: store entry made by an older nnserve (format {metadata.get('nnserve_format')}"
                               f"); re-export it: python -m export artifacts/{name}")
        self.roles: dict = metadata["roles"]
        self.inputs = [TensorSpec(**t) for t in metadata["inputs"]]
        self.outputs = [TensorSpec(**t) for t in metadata["outputs"]]
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.threads_per_session()
        options.inter_op_num_threads = 1
        # ORT's intra-op threads spin-wait for work by default. Here several sessions (and the HTTP event
        # loop) share few cores, and spinning threads steal CPU from those with work: measured under mixed
        # load on 2 cores, spinning off tripled image-endpoint throughput (docs/service.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_spinning else "0")
        chosen = choose_providers(providers or list(settings.providers))
        self.session = ort.InferenceSession(onnx_path, options, providers=chosen,
                                            provider_options=[provider_options(p, settings) for p in chosen])
        # What the session really uses: a provider that fails to initialise is dropped by ORT.
        self.providers: list[str] = self.session.get_providers()
        self.provider = self.providers[0]
        log.info("loaded %s (%s) on %s (providers %s, %d intra-op threads)", self.tag, self.kind, self.provider,
                 self.providers, options.intra_op_num_threads)

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
                "inputs": [vars(t) for t in self.inputs], "outputs": [vars(t) for t in self.outputs],
                "parity": self.metadata.get("parity"), "roles": self.roles,
                **self.kind_module.describe(self.metadata)}


def store_model(tag: str):
    """The BentoML store entry for ``tag``, or a RuntimeError saying how to create it."""
    import bentoml

    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as e:
        name = tag.split(":")[0]
        raise RuntimeError(f"model {tag!r} is not in the BentoML model store "
                           f"({os.environ.get('BENTOML_HOME', '~/bentoml')}); run `make export` "
                           f"(or python -m export artifacts/{name})") from e


def load_runtime(name: str, tag: str | None = None, providers: list[str] | None = None,
                 settings: Settings | None = None) -> ModelRuntime:
    """Load the store model ``tag`` (default: ``NNSERVE_<NAME>_TAG`` or ``name:latest``) to serve as ``name``."""
    settings = settings or Settings.from_env()
    model = store_model(tag or settings.model_tags.get(name, f"{name}:latest"))
    metadata = dict(model.info.metadata)
    runtime = ModelRuntime(name, model.tag.version, model.path_of(metadata["onnx_file"]), metadata, providers,
                           settings)
    runtime.store_tag = str(model.tag)
    return runtime
