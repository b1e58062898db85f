"""Every served model in this worker process: its ONNX Runtime session, its dynamic batcher and (text
models) its generation loop, plus its state: loading, ready, or failed with the reason.

Models load in a background thread when the service starts, so health endpoints answer at once; a
model that cannot load is marked failed (its reason shown by ``GET /models`` and the KServe
readiness routes) while the others serve. All front ends (REST, KServe v2 REST and gRPC) call
``infer`` or the batchers here; the repository knows nothing of them.
"""

from __future__ import annotations

import functools
import logging
import threading

import numpy as np

from models.kinds import kinds_for
from service import images, metrics
from service.batching import BatchingConfig, BatchStats, DynamicBatcher
from service.errors import ClientError, NotFound, Unavailable
from service.generation import ContinuousBatcher
from service.runtime import ModelRuntime, load_runtime, store_model
from service.settings import ModelConfig, Settings

log = logging.getLogger("nnserve.repository")


def batching_config(model: ModelConfig) -> BatchingConfig:
    """The batcher's own config (seconds) from a served model's effective config (ms)."""
    return BatchingConfig(max_batch_size=model.max_batch_size, max_queue_delay_s=model.max_queue_delay_ms / 1e3,
                          preferred_batch_sizes=model.preferred_batch_sizes, max_queue_size=model.max_queue_size,
                          queue_timeout_s=model.queue_timeout_ms / 1e3)


class Repository:
    """Serves exactly ``settings.models``, in their config order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.configs = {model.name: model for model in settings.models}
        self._names = tuple(self.configs)
        self.models: dict[str, ModelRuntime] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.generators: dict[str, ContinuousBatcher] = {}
        self.failures: dict[str, str] = {}  # name -> why it could not load
        self.kinds: dict[str, str | None] = {}  # name -> kind from the store metadata: known even if loading fails
        self.loaded = threading.Event()  # every model is ready or failed

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load_all, name="model-loader", daemon=True)
        thread.start()
        return thread

    def load_all(self) -> None:
        for name in self._names:
            metrics.set_model_ready(name, False)
        for name in self._names:
            try:
                self._load(name)
            except Exception as e:  # a broken model must not take the others down
                self.failures[name] = f"{type(e).__name__}: {e}"
                log.error("model %s failed to load and is not served: %s", name, self.failures[name])
            metrics.set_model_ready(name, name in self.models)
        self.loaded.set()

    def _load(self, name: str) -> None:
        config = self.configs[name]
        # The kind first: an endpoint's default model must not change because the model failed to load.
        self.kinds[name] = store_model(config.tag).info.metadata.get("kind")
        runtime = load_runtime(name, config.tag, settings=self.settings)  # the store tag, served as `name`
        generates = runtime.kind_module.generates
        runtime.warmup(warmup_sizes(self.settings.generation_batch_size if generates else config.max_batch_size))
        if "image" in runtime.roles:  # Pillow loads its decoders on first use: not on a client's request
            images.preprocess_upload(images.blank_png(), runtime.metadata["preprocessing"])
        self.batchers[name] = DynamicBatcher(name, runtime.run, runtime.batch_axis, batching_config(config),
                                             on_batch=functools.partial(metrics.observe_batch, runtime, "dynamic"))
        if generates:
            self.generators[name] = ContinuousBatcher(
                runtime, self.settings.generation_batch_size,
                on_step=functools.partial(metrics.observe_batch, runtime, "continuous"),
                on_occupancy=functools.partial(metrics.set_generation_slots, runtime))
        self.models[name] = runtime  # last: a model is ready once everything it needs exists

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    # -- what front ends ask ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._names)

    def is_ready(self, name: str) -> bool:
        return name in self.models

    def all_ready(self) -> bool:
        return all(name in self.models for name in self._names)

    def not_ready_reason(self) -> str | None:
        """None once every model is ready, else which are not and why (for /readyz)."""
        reasons = [f"{n} failed to load: {self.failures[n]}" if n in self.failures else f"{n} is loading"
                   for n in self._names if n not in self.models]
        return "; ".join(reasons) or None

    def state(self, name: str) -> str:
        return "ready" if name in self.models else "failed" if name in self.failures else "loading"

    def get(self, name: str) -> ModelRuntime:
        """The served model ``name``: NotFound if unknown, Unavailable while loading or if it failed."""
        if name in self.models:
            return self.models[name]
        if name in self.failures:
            raise Unavailable(f"model {name!r} failed to load: {self.failures[name]}")
        if name in self._names:
            raise Unavailable(f"model {name!r} is still loading", retry_after=1)
        raise NotFound(f"unknown model {str(name)[:100]!r}; served models: {', '.join(self._names)}")

    def model_for(self, name: str, endpoint: str) -> ModelRuntime:
        """The served model ``name`` if ``endpoint`` takes its kind (models/kinds: each kind lists its endpoints)."""
        model = self.get(name)
        if endpoint not in model.kind_module.endpoints:
            fitting = [m.name for m in self.models.values() if endpoint in m.kind_module.endpoints]
            raise ClientError(f"model {name!r} is a {model.kind} model; {endpoint} serves "
                              f"{', '.join(fitting) or 'no model of this server'}")
        return model

    def default_model(self, endpoint: str) -> str:
        """The model ``endpoint`` uses when a request names none: the first in config order of a kind it
        serves (if that one failed to load, requests get its reason from ``get``, not another model)."""
        kinds = kinds_for(endpoint)
        for name in self._names:
            if self.kinds.get(name) in kinds:
                return name
            if name not in self.kinds and name not in self.failures:  # its kind is not known yet
                raise Unavailable(f"{endpoint}: model {name!r} is still loading", retry_after=1)
        served = ", ".join(f"{n} ({self.kinds.get(n) or 'kind unknown'})" for n in self._names)
        wanted = " or ".join(kinds) or "(none serves it)"
        raise NotFound(f"{endpoint} needs a model of kind {wanted} and none is served; served models: {served}")

    def describe(self) -> list[dict]:
        return [self.models[n].describe() | {"state": "ready", "batching": self._batching_of(n)} if n in self.models
                else {"name": n, "state": self.state(n), "reason": self.failures.get(n)} for n in self._names]

    def _batching_of(self, name: str) -> dict:
        """The dynamic batcher's configuration, in the units of its settings (Triton shows its own per model)."""
        c = self.batchers[name].config
        return {"max_batch_size": c.max_batch_size, "max_queue_delay_ms": c.max_queue_delay_s * 1e3,
                "preferred_batch_sizes": list(c.preferred_batch_sizes), "max_queue_size": c.max_queue_size,
                "queue_timeout_ms": c.queue_timeout_s * 1e3}

    async def run(self, name: str, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], BatchStats]:
        """Checked inputs through the model's dynamic batcher."""
        return await self.batchers[name].infer(feeds)

    async def infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """KServe v2 (REST and gRPC): feeds already validated against the metadata; counted as endpoint v2."""
        request = metrics.RequestMetrics("v2")
        status = 500
        try:
            model = self.get(name)
            request.begin(model)
            outputs, stats = await self.run(name, feeds)
            request.observe("batch_wait", stats.queue_s)
            status = 200
            return outputs
        except ClientError as e:
            status = e.status
            raise
        finally:
            request.finish(status)


def warmup_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: the batch shapes served most."""
    return tuple(sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch} | {max_batch}))
