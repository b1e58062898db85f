"""The served models' ONNX Runtime sessions, loaded from the BentoML model store by tag.

The session itself (providers, the verified TensorRT engine, warm-up, what ``GET /models`` shows) is
``models.runtime.ModelRuntime``, which export uses too; this module adds what only the service knows: its
settings (``NNSERVE_PROVIDERS``, threads, batch sizes) and the model store.
"""

from __future__ import annotations

import logging
import os

from models.runtime import ModelRuntime, RuntimeOptions
from service.settings import ModelConfig, Settings

log = logging.getLogger("nnserve.runtime")

_warned: set[str] = set()


def runtime_options(settings: Settings, model: ModelConfig | None = None) -> RuntimeOptions:
    """The session options of ``model`` (its threads and batch size; without one: the server's defaults)."""
    _warn_ignored_settings(settings)
    threads = settings.threads_for(model) if model is not None else settings.threads_per_session()
    return RuntimeOptions(providers=tuple(settings.providers), intra_op_threads=threads,
                          inter_op_threads=model.inter_op_threads if model is not None else 1,
                          spinning=settings.ort_spinning,
                          max_batch=model.max_batch_size if model is not None else settings.max_batch_size,
                          generation_batch=settings.generation_batch_size)


def int8_gate_problem(metadata: dict) -> str | None:
    """Why a store entry is not an INT8 variant that passed export's accuracy gate, or None. Export registers
    <name>-int8 only when it passed; a store entry made otherwise is not served as the INT8 variant."""
    if metadata.get("variant") != "int8":
        return f"it is not an INT8 entry (variant {metadata.get('variant')!r})"
    parity = metadata.get("parity") or {}
    if parity.get("passed") is not True:
        return f"its INT8 accuracy gate did not pass ({ {k: v for k, v in parity.items() if k != 'checks'} })"
    return None


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


def load_runtime(name: str, tag: str | None = None, settings: Settings | None = None,
                 config: ModelConfig | None = None) -> ModelRuntime:
    """Load the store model ``tag`` (default: ``NNSERVE_<NAME>_TAG`` or ``name:latest``) to serve as ``name``,
    with ``config``'s execution settings (default: the served model ``name``'s, else the server's)."""
    settings = settings or Settings.from_env()
    if config is None:
        config = next((m for m in settings.models if m.name == name), None)
    model = store_model(tag or settings.model_tags.get(name, f"{name}:latest"))
    metadata = dict(model.info.metadata)
    if config is not None and config.variant == "int8" and (why := int8_gate_problem(metadata)) is not None:
        raise RuntimeError(f"{model.tag} is not served as the INT8 variant of {name!r}: {why}")
    runtime = ModelRuntime(name, model.tag.version, model.path_of(metadata["onnx_file"]), metadata,
                           runtime_options(settings, config))
    runtime.store_tag = str(model.tag)
    return runtime
