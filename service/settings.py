"""Every ``NNSERVE_*`` setting in one typed, validated object (the table in docs/service.md lists them).

Read once per server process (``Settings.from_env()``), validated at start (a bad value stops the
server with a message naming the variable), logged at start, and passed to whatever needs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

DEFAULT_MODELS = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class SettingsError(ValueError):
    """A ``NNSERVE_*`` variable has a value the server cannot use."""


@dataclass(frozen=True)
class Settings:
    # Processes and threads
    workers: int = 2  # BentoML workers, each with every model (measured: docs/bench.md)
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 = cores // workers (never oversubscribe)
    ort_spinning: bool = False  # ORT intra-op spin-waiting: steals CPU from other sessions on few cores
    providers: tuple[str, ...] = DEFAULT_PROVIDERS  # preferred order; unavailable ones are skipped (logged)
    # Dynamic batching of whole requests (Triton's dynamic_batching semantics)
    max_batch_size: int = 32  # items per ONNX Runtime call; larger requests are split into chunks
    max_queue_delay_ms: float = 0.0  # fixed wait for more requests before running a batch (0 = none)
    preferred_batch_sizes: tuple[int, ...] = ()  # run at once when one of these sizes can be formed
    max_queue_size: int = 128  # requests waiting per model and worker; past it: 503 + Retry-After
    queue_timeout_ms: float = 1000.0  # a request waiting longer is answered 503 + Retry-After (0 = never)
    max_concurrent_requests: int = 64  # inference requests in progress per worker; past it: 503 + Retry-After
    # Generation (continuous batching of decode steps)
    generation_batch_size: int = 32  # concurrent generations per decode step; more wait for a slot
    stream_flush_ms: float = 10.0  # a stream sends what was sampled at most this often (first chars at once)
    # Request limits
    max_upload_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096
    kserve_max_request_bytes: int = 64 << 20
    max_request_items: int = 16384  # KServe v2: batch-axis items per request, every model (service/kserve.py)
    max_request_tokens: int = 16384  # KServe v2, text models: items x sequence length per request
    # Network and logs
    grpc_port: int = 8001
    grpc_host: str = ""  # "" = the address the HTTP server listens on (bentoml serve --host)
    # Shutdown: on SIGTERM open requests and streams get this long to finish, then are cut (service/drain.py)
    drain_timeout_s: float = 60.0  # the longest stream (2000 characters) on a busy CPU; k8s grace period 90 s
    access_log: bool = False  # BentoML's per-request access log line (off: it costs ~20% throughput)
    log_level: str = "INFO"
    # TensorRT execution provider
    trt_cache_dir: str = "~/.cache/nnserve/tensorrt"
    trt_fp16: bool = False
    # Store tag served under each model name (NNSERVE_<NAME>_TAG), e.g. lenet5-int8:latest
    model_tags: Mapping[str, str] = field(default_factory=lambda: {n: f"{n}:latest" for n in DEFAULT_MODELS})
    # Per-model max_queue_delay_ms (NNSERVE_<NAME>_MAX_QUEUE_DELAY_MS), as Triton configures it per model;
    # models not named use NNSERVE_MAX_QUEUE_DELAY_MS.
    model_queue_delays_ms: Mapping[str, float] = field(default_factory=dict)

    PER_MODEL = ("model_tags", "model_queue_delays_ms")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``NNSERVE_<FIELD>`` variables (defaults above for the rest); SettingsError names
        the first variable with an unusable value."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            if f.name in cls.PER_MODEL:
                continue
            key = f"NNSERVE_{f.name.upper()}"
            if key in env:
                values[f.name] = _parse(key, env[key], type(getattr(cls(), f.name)))
        values["model_tags"] = {n: env.get(f"NNSERVE_{n.upper()}_TAG", f"{n}:latest") for n in DEFAULT_MODELS}
        values["model_queue_delays_ms"] = {n: _parse(key, env[key], float) for n in DEFAULT_MODELS
                                           if (key := f"NNSERVE_{n.upper()}_MAX_QUEUE_DELAY_MS") in env}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = ("workers", "max_batch_size", "max_queue_size", "generation_batch_size", "max_upload_bytes",
                    "max_concurrent_requests", "max_image_pixels", "kserve_max_request_bytes", "max_request_items",
                    "max_request_tokens", "drain_timeout_s")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"NNSERVE_{name.upper()} must be >= 1, got {getattr(self, name)}")
        for name in ("intra_op_threads", "max_queue_delay_ms", "queue_timeout_ms", "stream_flush_ms"):
            if getattr(self, name) < 0:
                raise SettingsError(f"NNSERVE_{name.upper()} must be >= 0, got {getattr(self, name)}")
        for model, delay in self.model_queue_delays_ms.items():
            if delay < 0:
                raise SettingsError(f"NNSERVE_{model.upper()}_MAX_QUEUE_DELAY_MS must be >= 0, got {delay}")
        if any(not 1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes):
            raise SettingsError(f"NNSERVE_PREFERRED_BATCH_SIZES must be in [1, NNSERVE_MAX_BATCH_SIZE="
                                f"{self.max_batch_size}], got {list(self.preferred_batch_sizes)}")
        delays = {"NNSERVE_MAX_QUEUE_DELAY_MS": self.max_queue_delay_ms} | {
            f"NNSERVE_{model.upper()}_MAX_QUEUE_DELAY_MS": delay for model, delay in self.model_queue_delays_ms.items()}
        for key, delay in delays.items():
            if 0 < self.queue_timeout_ms <= delay:
                raise SettingsError(f"NNSERVE_QUEUE_TIMEOUT_MS ({self.queue_timeout_ms}) must be larger than "
                                    f"{key} ({delay}) or 0: a lone request would always time out waiting for company")
        if not 1 <= self.grpc_port <= 65535:
            raise SettingsError(f"NNSERVE_GRPC_PORT must be a TCP port, got {self.grpc_port}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"NNSERVE_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                                f"got {self.log_level!r}")

    def queue_delay_ms(self, model: str) -> float:
        return self.model_queue_delays_ms.get(model, self.max_queue_delay_ms)

    def threads_per_session(self) -> int:
        """ONNX Runtime intra-op threads: as configured, else the cores shared among the workers."""
        return self.intra_op_threads or max(1, (os.cpu_count() or 1) // self.workers)

    def describe(self) -> str:
        """One line per setting, for the start-up log."""
        return "\n".join(f"  NNSERVE_{f.name.upper()} = {getattr(self, f.name)!r}" for f in fields(self)
                         if f.name not in self.PER_MODEL) + "".join(
            f"\n  NNSERVE_{name.upper()}_TAG = {tag!r}" for name, tag in self.model_tags.items()) + "".join(
            f"\n  NNSERVE_{name.upper()}_MAX_QUEUE_DELAY_MS = {delay!r}"
            for name, delay in self.model_queue_delays_ms.items())


def _parse(key: str, raw: str, kind: type):
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected 0/1, true/false, yes/no or on/off")
            return text.lower() in ("1", "true", "yes", "on")
        if kind is tuple:  # comma-separated; numbers stay numbers
            items = [item.strip() for item in text.split(",") if item.strip()]
            return tuple(int(i) if i.isdigit() else i for i in items)
        return kind(text)
    except ValueError as e:
        raise SettingsError(f"{key}={raw!r} is not a valid {kind.__name__}: {e}") from e
