"""One ONNX Runtime abstraction for every model: load from the BentoML model store, pick providers, warm up.

The three model kinds differ only in pre/post-processing, which the service reads from the store
metadata (see docs/architecture.md). This module never imports torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

log = logging.getLogger("nnserve.runtime")

# Preferred order; only the providers this onnxruntime build actually offers are kept.
DEFAULT_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
DEFAULT_MODELS = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class ClientError(ValueError):
    """A problem with the caller's input: becomes a 4xx with a JSON body naming the problem."""

    status = 400


class NotFound(ClientError):
    status = 404


def configured_providers() -> list[str]:
    """Provider order from ``NNSERVE_PROVIDERS`` (comma-separated) or the default order."""
    raw = os.environ.get("NNSERVE_PROVIDERS", "")
    return [p.strip() for p in raw.split(",") if p.strip()] or list(DEFAULT_PROVIDERS)


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """Keep the requested providers that are available, in order; CPU is always the last resort."""
    available = set(ort.get_available_providers())
    chosen = []
    for provider in requested or configured_providers():
        if provider in available:
            chosen.append(provider)
        else:
            log.info("execution provider %s skipped: not available in this onnxruntime build "
                     "(available: %s)", provider, sorted(available))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def model_tag(name: str) -> str:
    """Store tag served under ``name``: ``NNSERVE_<NAME>_TAG`` (e.g. ``lenet5-int8:latest``) or latest."""
    return os.environ.get(f"NNSERVE_{name.upper()}_TAG", f"{name}:latest")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: list[int]  # -1 = dynamic

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]


class ModelRuntime:
    """An ONNX Runtime session plus the store metadata that describes it."""

    def __init__(self, name: str, version: str, onnx_path: str, metadata: dict,
                 providers: list[str] | None = None) -> None:
        self.name, self.version, self.metadata = name, version, metadata
        self.kind: str = metadata["kind"]
        options = ort.SessionOptions()
        threads = int(os.environ.get("NNSERVE_INTRA_OP_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.providers = choose_providers(providers)
        self.session = ort.InferenceSession(onnx_path, options, providers=self.providers)
        self.provider = self.session.get_providers()[0]
        self.inputs = [TensorSpec(**t) for t in metadata["inputs"]]
        self.outputs = [TensorSpec(**t) for t in metadata["outputs"]]
        log.info("loaded %s:%s (%s) on %s", name, version, self.kind, self.provider)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or [t.name for t in self.outputs]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def example_feeds(self, batch: int, seq_len: int = 1) -> dict[str, np.ndarray]:
        """Zero inputs of the right dtype: dynamic dims become ``batch`` (first) or ``seq_len``."""
        feeds = {}
        for spec in self.inputs:
            shape = [d if d >= 0 else (batch if i == 0 else seq_len) for i, d in enumerate(spec.shape)]
            if self.kind == "char_lm" and spec.name != "tokens":  # state [layers, B, hidden]
                shape = [spec.shape[0], batch, spec.shape[2]]
            feeds[spec.name] = np.zeros(shape, dtype=spec.numpy_dtype)
        return feeds

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> float:
        """Run each served batch shape once: ORT's first call per new shape is slow."""
        start = time.perf_counter()
        for b in batch_sizes:
            self.run(self.example_feeds(b))
            if self.kind == "char_lm":
                self.run(self.example_feeds(b, seq_len=16))
        seconds = time.perf_counter() - start
        log.info("warmed up %s on batch sizes %s in %.2f s", self.tag, list(batch_sizes), seconds)
        return seconds


def load_runtime(name: str, tag: str | None = None, providers: list[str] | None = None) -> ModelRuntime:
    """Load the store model ``tag`` (default from :func:`model_tag`) to serve under ``name``."""
    import bentoml

    tag = tag or model_tag(name)
    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as e:
        raise RuntimeError(f"model {tag!r} is not in the BentoML model store; run `make export` "
                           f"(or python -m export artifacts/{name})") from e
    metadata = dict(model.info.metadata)
    return ModelRuntime(name, model.tag.version, model.path_of(metadata["onnx_file"]), metadata, providers)


class ModelRepository(Protocol):
    """What the protocol front-ends (REST, KServe v2 REST and gRPC) need from the service.

    Implemented by the service (service/service.py); ``infer`` records the inference metrics and may
    route a request through the adaptive-batching service, so every front-end gets both.
    """

    def names(self) -> list[str]: ...

    def get(self, name: str) -> ModelRuntime: ...  # raises NotFound naming the unknown model

    def is_ready(self, name: str) -> bool: ...

    async def infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
