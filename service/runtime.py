"""One ONNX Runtime abstraction for every model: load from the BentoML model store, pick providers, warm up.

The three model kinds differ only in pre/post-processing, which the service reads from the store
metadata (see docs/architecture.md). This module never imports torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import numpy as np
import onnxruntime as ort

log = logging.getLogger("nnserve.runtime")

# Preferred order; only the providers this onnxruntime build actually offers are kept.
DEFAULT_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
DEFAULT_MODELS = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")
IMAGE_KINDS = ("image_classifier", "image_feature_extractor")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class ClientError(ValueError):
    """A problem with the caller's input: becomes a 4xx with a JSON body naming the problem."""

    status = 400


class NotFound(ClientError):
    status = 404


class PayloadTooLarge(ClientError):
    status = 413


class Unavailable(ClientError):
    """Not the caller's mistake, but the same shape (status + message naming it): the model is still
    loading, or its batcher is shedding load. Retry later (503)."""

    status = 503


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


def provider_options(provider: str) -> dict:
    """Per-provider options. TensorRT builds an engine per input shape, which takes minutes: cache them on
    disk (``NNSERVE_TRT_CACHE_DIR``) so a restart reuses them; FP16 only when asked (``NNSERVE_TRT_FP16=1``)."""
    if provider != "TensorrtExecutionProvider":
        return {}
    cache = Path(os.environ.get("NNSERVE_TRT_CACHE_DIR", Path.home() / ".cache" / "nnserve" / "tensorrt"))
    cache.mkdir(parents=True, exist_ok=True)
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_fp16_enable": os.environ.get("NNSERVE_TRT_FP16", "0") == "1"}


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


class ModelSpec:
    """What a served model is, from its store metadata: name, version, kind, tensor specs, and the facts
    pre/post-processing needs (``preprocessing`` and ``labels`` for images, ``vocab`` for text)."""

    session: object  # ort.InferenceSession, or GraphSignature for a model another process runs
    provider: str  # execution provider that runs the model (first of ``providers``)
    providers: list[str]
    store_tag: str | None = None  # the store entry (e.g. lenet5-int8:abc) when loaded from the store

    def __init__(self, name: str, version: str, metadata: dict) -> None:
        self.name, self.version, self.metadata = name, version, metadata
        self.kind: str = metadata["kind"]
        self.inputs = [TensorSpec(**t) for t in metadata["inputs"]]
        self.outputs = [TensorSpec(**t) for t in metadata["outputs"]]

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def is_image(self) -> bool:
        return self.kind in IMAGE_KINDS

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Input names, dtypes, ranks and fixed dims against the metadata (ClientError naming the problem).

        The last guard before a tensor is merged into an adaptive batch: one malformed request must
        never fail the batch it shares with others."""
        expected = {spec.name: spec for spec in self.inputs}
        if set(feeds) != set(expected):
            raise ClientError(f"model {self.name!r} takes inputs {sorted(expected)}, got {sorted(feeds)}")
        for name, array in feeds.items():
            spec = expected[name]
            if not isinstance(array, np.ndarray) or array.dtype != np.dtype(spec.dtype):
                got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise ClientError(f"input {name!r} of model {self.name!r} must be {spec.dtype}, got {got}")
            if array.ndim != len(spec.shape) or any(d < 1 or (e >= 0 and d != e)
                                                     for d, e in zip(array.shape, spec.shape, strict=True)):
                raise ClientError(f"input {name!r} of model {self.name!r} has shape {list(array.shape)}, "
                                  f"expected {spec.shape} (-1 = any size >= 1)")
        if self.kind == "char_lm":
            self._check_text_feeds(feeds)

    def _check_text_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Token ids inside the vocabulary (ONNX Gather would wrap negative ids silently) and one batch
        size for tokens [B, T] and every state [layers, B, hidden]."""
        tokens, vocab_size = feeds["tokens"], len(self.metadata["vocab"])
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ClientError(f"token ids of model {self.name!r} must be in [0, {vocab_size}), "
                              f"got values from {tokens.min()} to {tokens.max()}")
        for name, state in feeds.items():
            if name != "tokens" and state.shape[1] != tokens.shape[0]:
                raise ClientError(f"input {name!r} of model {self.name!r} has batch {state.shape[1]} (dim 1) "
                                  f"but tokens has batch {tokens.shape[0]}")

    def describe(self) -> dict:
        """JSON-able summary for ``GET /models`` and logs: identity, provider, tensors, kind-specific facts."""
        info = {"name": self.name, "version": self.version, "store_tag": self.store_tag, "kind": self.kind,
                "variant": self.metadata.get("variant"), "provider": self.provider, "providers": self.providers,
                "inputs": [vars(t) for t in self.inputs], "outputs": [vars(t) for t in self.outputs]}
        if self.is_image:
            info.update(labels=self.metadata["labels"], preprocessing=self.metadata["preprocessing"])
        else:
            info.update(vocab_size=len(self.metadata["vocab"]), rnn=self.metadata.get("rnn"))
        return info


class ModelRuntime(ModelSpec):
    """An ONNX Runtime session plus the store metadata that describes it."""

    def __init__(self, name: str, version: str, onnx_path: str, metadata: dict,
                 providers: list[str] | None = None) -> None:
        super().__init__(name, version, metadata)
        options = ort.SessionOptions()
        threads = int(os.environ.get("NNSERVE_INTRA_OP_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        # ORT's intra-op threads spin-wait for work by default. Here four sessions in two processes (plus
        # the HTTP workers) share the cores, and spinning threads steal CPU from those with work: measured
        # under mixed load on 2 cores, spinning off tripled image-endpoint throughput (docs/service.md).
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         os.environ.get("NNSERVE_ORT_SPINNING", "0"))
        chosen = choose_providers(providers)
        self.session = ort.InferenceSession(onnx_path, options, providers=chosen,
                                            provider_options=[provider_options(p) for p in chosen])
        # What the session really uses: a provider that fails to initialise is dropped by ORT.
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        log.info("loaded %s (%s) on %s (providers %s)", self.tag, self.kind, self.provider, self.providers)

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

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), prefill_len: int = 16) -> float:
        """Run each served batch shape once: ORT's first call per new shape is slow (and TensorRT builds
        an engine for it). Text models also run one T>1 prefill shape."""
        start = time.perf_counter()
        for b in batch_sizes:
            self.run(self.example_feeds(b))
        if self.kind == "char_lm":
            self.run(self.example_feeds(1, seq_len=prefill_len))
        seconds = time.perf_counter() - start
        log.info("warmed up %s on batch sizes %s in %.2f s", self.tag, list(batch_sizes), seconds)
        return seconds

    def signature(self) -> dict:
        """What another process needs to describe this model exactly as it runs here (see RemoteModel)."""
        return {"store_tag": self.store_tag, "provider": self.provider, "providers": self.providers,
                "graph_inputs": [(i.name, i.shape, i.type) for i in self.session.get_inputs()],
                "graph_outputs": [(o.name, o.shape, o.type) for o in self.session.get_outputs()]}


class GraphSignature:
    """Stands in for the ORT session of a model that runs in another process: the graph's inputs and
    outputs (names, symbolic shapes, types) for callers that check requests against them; no ``run``."""

    def __init__(self, signature: dict) -> None:
        def node(entry: tuple) -> SimpleNamespace:
            name, shape, type_ = entry
            return SimpleNamespace(name=name, shape=list(shape), type=type_)

        self._inputs = [node(e) for e in signature["graph_inputs"]]
        self._outputs = [node(e) for e in signature["graph_outputs"]]
        self._providers = list(signature["providers"])

    def get_inputs(self) -> list[SimpleNamespace]:
        return self._inputs

    def get_outputs(self) -> list[SimpleNamespace]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return self._providers


class RemoteModel(ModelSpec):
    """A model served from another process (the entry service's view of the adaptive-batching image
    models): store metadata plus the provider and graph signature that process reported."""

    def __init__(self, name: str, version: str, metadata: dict, signature: dict) -> None:
        super().__init__(name, version, metadata)
        self.session = GraphSignature(signature)
        self.providers = list(signature["providers"])
        self.provider = signature["provider"]


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


def load_runtime(name: str, tag: str | None = None, providers: list[str] | None = None) -> ModelRuntime:
    """Load the store model ``tag`` (default from :func:`model_tag`) to serve under ``name``."""
    model = store_model(tag or model_tag(name))
    metadata = dict(model.info.metadata)
    runtime = ModelRuntime(name, model.tag.version, model.path_of(metadata["onnx_file"]), metadata, providers)
    runtime.store_tag = str(model.tag)
    return runtime


def load_remote(name: str, signature: dict) -> RemoteModel:
    """The model another process reported serving (``signature["store_tag"]`` pins the exact store entry)."""
    model = store_model(signature["store_tag"])
    remote = RemoteModel(name, model.tag.version, dict(model.info.metadata), signature)
    remote.store_tag = str(model.tag)
    return remote


class ModelRepository(Protocol):
    """What the protocol front-ends (REST, KServe v2 REST and gRPC) need from the service.

    Implemented by the service (service/service.py); ``infer`` records the inference metrics and may
    route a request through the adaptive-batching service, so every front-end gets both. ``get`` returns
    a ModelRuntime, or for models another process runs a RemoteModel: same attributes, and its
    ``session`` only describes the graph (``get_inputs``/``get_outputs``), it cannot run it.
    """

    def names(self) -> list[str]: ...

    def get(self, name: str) -> ModelSpec: ...  # raises NotFound naming the unknown model

    def is_ready(self, name: str) -> bool: ...

    async def infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
