"""The served models' ONNX Runtime sessions, loaded from the BentoML model store by tag.

The session itself (providers, the verified TensorRT engine, warm-up, what ``GET /models`` shows) is
``models.runtime.ModelRuntime``, which export uses too; this module adds what only the service knows: its
settings (``NNSERVE_PROVIDERS``, threads, batch sizes) and the model store.
"""

from __future__ import annotations

import logging
import os

from models.runtime import ModelRuntime, RuntimeOptions
from service.settings import Settings

log = logging.getLogger("nnserve.runtime")

_warned: set[str] = set()


def runtime_options(settings: Settings) -> RuntimeOptions:
    """The session options the service's settings ask for (every served model alike)."""
    _warn_ignored_settings(settings)
    return RuntimeOptions(providers=tuple(settings.providers), intra_op_threads=settings.threads_per_session(),
                          spinning=settings.ort_spinning, max_batch=settings.max_batch_size,
                          generation_batch=settings.generation_batch_size)


def _warn_ignored_settings(settings: Settings) -> None:
    """NNSERVE_TRT_CACHE_DIR / NNSERVE_TRT_FP16 configured serve-time engine builds, which no longer happen:
    precision and cache come with the verified engine (export --fp16). Say so rather than ignore them."""
    defaults = Settings()
    for key, value, default in (("NNSERVE_TRT_CACHE_DIR", settings.trt_cache_dir, defaults.trt_cache_dir),
                                ("NNSERVE_TRT_FP16", settings.trt_fp16, defaults.trt_fp16)):
        if value != default and key not in _warned:
            _warned.add(key)
            log.warning("%s=%r is ignored: the service only serves TensorRT engines verified at export "
                        "(python -m export --tensorrt [--fp16])", key, value)


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


def load_runtime(name: str, tag: str | None = None, settings: Settings | None = None) -> ModelRuntime:
    """Load the store model ``tag`` (default: ``NNSERVE_<NAME>_TAG`` or ``name:latest``) to serve as ``name``."""
    settings = settings or Settings.from_env()
    model = store_model(tag or settings.model_tags.get(name, f"{name}:latest"))
    metadata = dict(model.info.metadata)
    runtime = ModelRuntime(name, model.tag.version, model.path_of(metadata["onnx_file"]), metadata,
                           runtime_options(settings))
    runtime.store_tag = str(model.tag)
    return runtime
