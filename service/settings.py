"""Every ``NNSERVE_*`` setting and the models config file (``models.yaml``) in one typed, validated object
(docs/service.md lists them).

Read once per server process (``Settings.from_env()``), validated at start (a bad value stops the
server with a message naming the variable, or the file and key), logged at start, and passed to whatever
needs it.

Which models a server serves, and each one's batching, come from the models config file, in the names of
Triton's model configuration (config.pbtxt) so Triton users recognise them. Per model, most specific wins:
``NNSERVE_<NAME>_TAG`` / ``NNSERVE_<NAME>_MAX_QUEUE_DELAY_MS`` > the file's entry > the global
``NNSERVE_MAX_BATCH_SIZE``, ... > built-in defaults.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NoReturn

import yaml

from models.kinds import FRONT_END_SUFFIXES, split_front_end

log = logging.getLogger("nnserve.settings")

DEFAULT_MODELS = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")  # served when the default models.yaml is missing
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEFAULT_MODELS_CONFIG = "models.yaml"
# BentoML's rule for a tag's name and version (bentoml._internal.tag): served names follow it too, so any
# store name can be served under its own name.
NAME_RE = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")
NAME_MAX_LENGTH = 63
# Batching fields of ModelConfig whose global default is the Settings field (NNSERVE_<FIELD>) of the same name.
BATCHING_FIELDS = ("max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "max_queue_size",
                   "queue_timeout_ms")
# Upper bounds of every model's batching, however it is set (models.yaml, NNSERVE_*, a management API config
# override), in the field's unit (docs/service.md): a worker warms up every power of two up to max_batch_size
# when it loads a model, so one call must not make every worker build a batch of a million.
BATCHING_LIMITS = {"max_batch_size": 1024, "max_queue_delay_ms": 10_000.0, "max_queue_size": 65_536,
                   "queue_timeout_ms": 600_000.0}
MAX_PREFERRED_BATCH_SIZES = 32
# Upper bounds of every model's execution settings (models.yaml, a management API config override): each
# instance is one more ONNX Runtime session (the model's memory again) in every worker.
EXECUTION_LIMITS = {"instances": 16, "intra_op_threads": 256, "inter_op_threads": 64, "lone_request_threads": 256}
VARIANTS = ("fp32", "int8")  # int8: export's INT8 entry of the same model, <name>-int8, served only if its gate passed


class SettingsError(ValueError):
    """A ``NNSERVE_*`` variable or the models config file has a value the server cannot use."""


@dataclass(frozen=True)
class ModelConfig:
    """One served model: the store tag served under ``name``, its dynamic batching (Triton's
    ``max_batch_size``, ``dynamic_batching`` and ``default_queue_policy``) and its execution (Triton's
    ``instance_group`` count, the ONNX Runtime backend's thread ``parameters``, the variant), effective
    values in the units of the NNSERVE_* settings (ms)."""

    name: str
    tag: str
    max_batch_size: int = 32  # items per ONNX Runtime call; larger requests are split into chunks
    max_queue_delay_ms: float = 0.0  # fixed wait for more requests before running a batch (0 = none)
    preferred_batch_sizes: tuple[int, ...] = ()  # run at once when one of these sizes can be formed
    max_queue_size: int = 128  # requests waiting per worker; past it: 503 + Retry-After
    queue_timeout_ms: float = 1000.0  # a request waiting longer is answered 503 + Retry-After (0 = never)
    # Versions (Triton's version_policy): ("latest", n) | ("all",) | ("specific", (v, ...)); () = the tag's own:
    # a version in the tag serves exactly it, else the latest one of the tag's store name.
    version_policy: tuple = ()
    # The concrete store versions the policy chose, written into the live state (service/lifecycle.py) so that
    # every worker serves the same ones whatever the store gains meanwhile; () = not resolved yet.
    versions: tuple[str, ...] = ()
    # Traffic split of requests that name no version (ours): ((version, percent), ...) summing to 100;
    # () = every such request goes to the newest served version, as in Triton.
    traffic: tuple[tuple[str, float], ...] = ()
    sticky_header: str = ""  # a request header whose value keeps a client on one version of the split
    # Execution, per worker: sessions of this model, each running whole batches off the one queue (Triton's
    # instance_group count); ONNX Runtime threads per session (0 = the cores shared among every session of
    # the server's workers, Settings.threads_for); inter-op > 1 runs independent graph branches in parallel.
    instances: int = 1
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    variant: str = "fp32"  # "int8": the tag's <name>-int8 store entry (export --int8, served if its gate passed)
    # Adaptive (ours, 0 = off): one more session with this many threads runs a batch when it is the only work
    # in the worker (all cores for a lone request); under load the instances' own sessions run (one per session).
    lone_request_threads: int = 0

    @property
    def store_name(self) -> str:
        """The name in the BentoML store whose versions this model serves (the variant's entry)."""
        name = self.tag.split(":")[0]
        return f"{name}-int8" if self.variant == "int8" else name

    @property
    def policy(self) -> tuple:
        """The effective version policy (the tag's own when none is set)."""
        if self.version_policy:
            return self.version_policy
        version = self.tag.partition(":")[2]
        return ("specific", (version,)) if version and version != "latest" else ("latest", 1)

    def to_entry(self) -> dict:
        """This config as a models config entry (Triton's names), every key explicit: what the live state holds."""
        kind, *args = self.policy
        policies: dict[str, Callable[..., dict]] = {
            "latest": lambda n: {"latest": {"num_versions": n}}, "all": lambda: {"all": {}},
            "specific": lambda versions: {"specific": {"versions": list(versions)}}}
        policy = policies[kind](*args)
        entry = {"tag": self.tag.split(":")[0], "max_batch_size": self.max_batch_size,
                 "dynamic_batching": {"max_queue_delay_microseconds": round(self.max_queue_delay_ms * 1e3),
                                      "preferred_batch_size": list(self.preferred_batch_sizes),
                                      "default_queue_policy": {
                                          "max_queue_size": self.max_queue_size,
                                          "default_timeout_microseconds": round(self.queue_timeout_ms * 1e3)}},
                 "version_policy": policy}
        if self.traffic or self.sticky_header:
            entry["traffic"] = {"weights": dict(self.traffic), **({"sticky_header": self.sticky_header}
                                                                  if self.sticky_header else {})}
        entry |= {"instance_group": [{"count": self.instances}],
                  "parameters": {"intra_op_thread_count": {"string_value": str(self.intra_op_threads)},
                                 "inter_op_thread_count": {"string_value": str(self.inter_op_threads)},
                                 "lone_request_thread_count": {"string_value": str(self.lone_request_threads)}},
                  "variant": self.variant}
        if self.versions:
            entry["versions"] = list(self.versions)
        return entry

    @property
    def env_prefix(self) -> str:
        """``NNSERVE_<NAME>_`` of the per-model variables: ``-`` and ``.`` (not allowed in names of
        environment variables) become ``_``."""
        return f"NNSERVE_{re.sub(r'[-.]', '_', self.name).upper()}_"

    def describe(self) -> str:
        return (f"{self.name}: tag={self.tag!r} max_batch_size={self.max_batch_size} "
                f"max_queue_delay_ms={self.max_queue_delay_ms} "
                f"preferred_batch_sizes={list(self.preferred_batch_sizes)} max_queue_size={self.max_queue_size} "
                f"queue_timeout_ms={self.queue_timeout_ms} version_policy={self.policy}"
                + (f" traffic={dict(self.traffic)}" if self.traffic else "")
                + (f" sticky_header={self.sticky_header!r}" if self.sticky_header else "")
                + f" instances={self.instances} intra_op_threads={self.intra_op_threads or 'auto'}"
                  f" inter_op_threads={self.inter_op_threads} variant={self.variant}"
                + (f" lone_request_threads={self.lone_request_threads}" if self.lone_request_threads else ""))


@dataclass(frozen=True)
class Settings:
    # Models: which are served, and each one's batching (the file: module doc, docs/service.md)
    models_config: str = DEFAULT_MODELS_CONFIG  # YAML or JSON; a missing default file serves DEFAULT_MODELS
    # Processes and threads
    workers: int = 2  # BentoML workers, each with every model (measured: docs/service.md, workers and delay)
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 = cpus // workers (never oversubscribe)
    # Cores the server may use; 0 = os.cpu_count(). A container sees the node's cores, not its CPU limit:
    # Kubernetes passes the limit here (downward API), so 2 workers on a 2-CPU pod get 1 thread per session.
    cpus: int = 0
    ort_spinning: bool = False  # ORT intra-op spin-waiting: steals CPU from other sessions on few cores
    providers: tuple[str, ...] = DEFAULT_PROVIDERS  # preferred order; unavailable ones are skipped (logged)
    # Dynamic batching of whole requests (Triton's dynamic_batching semantics): the defaults of every model
    # whose entry in the models config leaves them unset (ModelConfig says what each one is)
    max_batch_size: int = ModelConfig.max_batch_size
    max_queue_delay_ms: float = ModelConfig.max_queue_delay_ms
    preferred_batch_sizes: tuple[int, ...] = ModelConfig.preferred_batch_sizes
    max_queue_size: int = ModelConfig.max_queue_size
    queue_timeout_ms: float = ModelConfig.queue_timeout_ms
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
    # Live changes (service/lifecycle.py): where the live state is kept ("" = per server, in the system's temporary
    # directory, so a restarted server starts from its models config), and how long a change waits for every worker
    state_dir: str = ""
    change_timeout_s: float = 120.0
    # Shutdown: on SIGTERM open requests and streams get this long to finish, then are cut (service/drain.py)
    drain_timeout_s: float = 60.0  # the longest stream (2000 characters) on a busy CPU; k8s grace period 90 s
    # A connection whose request line and headers are not complete this long after it opened (or after the
    # first byte of its next request) is answered 408 and closed (service/drain.py); nginx's default
    header_timeout_s: float = 60.0
    # Access (service/auth.py): bearer token files, generated (owner-only) when missing
    management_token_file: str = ""  # the management API (/v2/repository/...) needs its token; "" = API off
    inference_token_file: str = ""  # when set, inference and metadata need its (or the management) token
    access_log: bool = False  # BentoML's per-request access log line (off: it costs ~20% throughput)
    playground: bool = True  # the page at /playground (service/playground.py): static files + the public API
    log_level: str = "INFO"
    # TensorRT execution provider
    trt_cache_dir: str = "~/.cache/nnserve/tensorrt"
    trt_fp16: bool = False
    # The served models in config order, effective values (the file, NNSERVE_<NAME>_* and the globals above
    # merged by from_env)
    models: tuple[ModelConfig, ...] = field(
        default_factory=lambda: tuple(ModelConfig(n, f"{n}:latest") for n in DEFAULT_MODELS))

    PER_MODEL = ("models",)  # not a NNSERVE_<FIELD> variable

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``NNSERVE_<FIELD>`` variables (defaults above for the rest) and the models config
        file; SettingsError names the first variable (or file and key) with an unusable value."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            if f.name in cls.PER_MODEL:
                continue
            key = f"NNSERVE_{f.name.upper()}"
            if key in env:
                values[f.name] = _parse(key, env[key], type(getattr(cls(), f.name)))
        globals_only = cls(**values)
        globals_only.validate()  # the globals first: they are the models' defaults
        settings = cls(**values, models=_resolve_models(globals_only, env))
        settings.validate()
        for model in settings.models:
            if (why := settings.oversubscription(model)) is not None:
                log.warning(why)
        return settings

    def validate(self) -> None:
        positive = ("workers", "max_batch_size", "max_queue_size", "generation_batch_size", "max_upload_bytes",
                    "max_concurrent_requests", "max_image_pixels", "kserve_max_request_bytes", "max_request_items",
                    "max_request_tokens", "drain_timeout_s", "change_timeout_s")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"NNSERVE_{name.upper()} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.header_timeout_s < math.inf:  # 0 would cut every client before its first byte
            raise SettingsError(f"NNSERVE_HEADER_TIMEOUT_S must be a number of seconds > 0, "
                                f"got {self.header_timeout_s}")
        for name in ("intra_op_threads", "cpus", "max_queue_delay_ms", "queue_timeout_ms", "stream_flush_ms"):
            if getattr(self, name) < 0:
                raise SettingsError(f"NNSERVE_{name.upper()} must be >= 0, got {getattr(self, name)}")
        for name, limit in BATCHING_LIMITS.items():
            if getattr(self, name) > limit:
                raise SettingsError(f"NNSERVE_{name.upper()} must be <= {limit:g}, got {getattr(self, name)}")
        if len(self.preferred_batch_sizes) > MAX_PREFERRED_BATCH_SIZES:
            raise SettingsError(f"NNSERVE_PREFERRED_BATCH_SIZES lists at most {MAX_PREFERRED_BATCH_SIZES} sizes, "
                                f"got {len(self.preferred_batch_sizes)}")
        if any(not 1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes):
            raise SettingsError(f"NNSERVE_PREFERRED_BATCH_SIZES must be in [1, NNSERVE_MAX_BATCH_SIZE="
                                f"{self.max_batch_size}], got {list(self.preferred_batch_sizes)}")
        if 0 < self.queue_timeout_ms <= self.max_queue_delay_ms:
            raise SettingsError(f"NNSERVE_QUEUE_TIMEOUT_MS ({self.queue_timeout_ms}) must be larger than "
                                f"NNSERVE_MAX_QUEUE_DELAY_MS ({self.max_queue_delay_ms}) or 0: a lone request "
                                "would always time out waiting for company")
        if not self.models:
            raise SettingsError("no model to serve")
        if not 1 <= self.grpc_port <= 65535:
            raise SettingsError(f"NNSERVE_GRPC_PORT must be a TCP port, got {self.grpc_port}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"NNSERVE_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                                f"got {self.log_level!r}")

    def model(self, name: str) -> ModelConfig:
        """The served model ``name``'s config (KeyError if it is not served)."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    @property
    def model_tags(self) -> dict[str, str]:
        """Store tag served under each model name, in config order."""
        return {m.name: m.tag for m in self.models}

    def queue_delay_ms(self, model: str) -> float:
        return self.model(model).max_queue_delay_ms

    def threads_per_session(self) -> int:
        """ONNX Runtime intra-op threads: as configured, else the cores (``cpus``) shared among the workers."""
        return self.intra_op_threads or max(1, self.cores() // self.workers)

    def cores(self) -> int:
        return self.cpus or os.cpu_count() or 1

    def threads_for(self, model: ModelConfig) -> int:
        """``model``'s intra-op threads per session: its own setting, else the cores shared among every
        session of it in the server (workers x instances): a default never oversubscribes."""
        return model.intra_op_threads or max(1, self.cores() // (self.workers * model.instances))

    def oversubscription(self, model: ModelConfig) -> str | None:
        """Why ``model``'s execution settings ask for more threads than the cores, or None: each worker runs
        ``instances`` sessions at once, each with its intra-op threads (and inter-op ones beside them)."""
        threads = self.threads_for(model) * max(1, model.inter_op_threads)
        total = self.workers * model.instances * threads
        if model.lone_request_threads > self.cores():
            return (f"model {model.name!r}: oversubscription: parameters.lone_request_thread_count "
                    f"{model.lone_request_threads} is more than the {self.cores()} cores")
        if total <= self.cores():
            return None
        return (f"model {model.name!r}: oversubscription: {self.workers} worker(s) x {model.instances} instance(s) x "
                f"{threads} thread(s) (intra-op {self.threads_for(model)}, inter-op {model.inter_op_threads}) = "
                f"{total} threads on {self.cores()} cores; threads that wait for a core add latency (lower "
                "parameters.intra_op_thread_count or instance_group count, or set NNSERVE_CPUS)")

    def describe(self) -> str:
        """One line per setting, then one per served model with its effective config, for the start-up log."""
        found = "" if Path(self.models_config).is_file() else " (not found: the default models)"
        return "\n".join(f"  NNSERVE_{f.name.upper()} = {getattr(self, f.name)!r}" for f in fields(self)
                         if f.name not in self.PER_MODEL) + f"\n  models ({self.models_config}{found}):" + "".join(
            f"\n    {m.describe()}" for m in self.models)


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


# -- the models config file ---------------------------------------------------------------------------------

Fail = Callable[[str, str], NoReturn]  # raises SettingsError naming the file, the key path and the problem

def _version_list(value: object, key_path: str, fail: Fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(valid_name(str(v)) for v in value):
        fail(key_path, f"must be a non-empty list of store versions, got {_show(value)}")
    versions = tuple(str(v) for v in value)  # YAML reads a version such as 2 as a number
    if len(set(versions)) != len(versions):
        fail(key_path, f"lists a version twice: {list(versions)}")
    return versions


def _read_version_policy(value: object, key_path: str, fail: Fail) -> dict:
    """Triton's version_policy: exactly one of latest {num_versions}, all {}, specific {versions}."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("latest", "all", "specific"):
        fail(key_path, "must be one of {latest: {num_versions: N}}, {all: {}}, {specific: {versions: [...]}}, "
                       f"got {_show(value)}")
    kind, body = next(iter(value.items()))
    body = {} if body is None else body
    expected = {"latest": {"num_versions"}, "all": set(), "specific": {"versions"}}[kind]
    if not isinstance(body, dict) or set(body) != expected:
        fail(f"{key_path}.{kind}", f"must be a mapping with the keys {sorted(expected) or 'none'}, got {_show(body)}")
    if kind == "latest":
        n = body["num_versions"]
        if not _is_int(n) or n < 1:
            fail(f"{key_path}.latest.num_versions", f"must be an integer >= 1, got {_show(n)}")
        return {"version_policy": (("latest", n), key_path)}
    if kind == "all":
        return {"version_policy": (("all",), key_path)}
    return {"version_policy": (("specific", _version_list(body["versions"], f"{key_path}.specific.versions", fail)),
                               key_path)}


def read_traffic(value: object, key_path: str, fail: Fail) -> dict:
    """``traffic: {weights: {version: percent, ...}, sticky_header: name}`` (ours): the percentages add up to 100."""
    if not isinstance(value, dict) or not set(value) <= {"weights", "sticky_header"}:
        fail(key_path, f"must be a mapping with 'weights' and optionally 'sticky_header', got {_show(value)}")
    weights = value.get("weights")
    if not isinstance(weights, dict) or not weights:
        fail(f"{key_path}.weights", f"must be a mapping of version to percent, got {_show(weights)}")
    for version, weight in weights.items():
        if not valid_name(str(version)):
            fail(f"{key_path}.weights", f"{_show(version)} is not a store version")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 100:
            fail(f"{key_path}.weights.{version}", f"must be a percentage in [0, 100], got {_show(weight)}")
    if abs(sum(weights.values()) - 100) > 1e-6:
        fail(f"{key_path}.weights", f"must add up to 100, got {sum(weights.values())} ({_show(weights)})")
    header = value.get("sticky_header", "")
    if not isinstance(header, str) or (header and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header)):
        fail(f"{key_path}.sticky_header", f"must be an HTTP header name, got {_show(header)}")
    return {"traffic": (tuple((str(v), float(w)) for v, w in weights.items()), key_path),
            "sticky_header": (header.lower(), f"{key_path}.sticky_header")}


def _count(value: object, key_path: str, field_name: str, minimum: int, fail: Fail) -> int:
    """An integer in [minimum, EXECUTION_LIMITS[field_name]]; Triton's parameters are strings, so "2" too."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not _is_int(value):
        fail(key_path, f"must be an integer, got {_show(value)}")
    limit = EXECUTION_LIMITS[field_name]
    if not minimum <= value <= limit:  # type: ignore[operator]
        fail(key_path, f"must be in [{minimum}, {limit}], got {value}")
    return value  # type: ignore[return-value]


def read_instance_group(value: object, key_path: str, fail: Fail) -> dict:
    """Triton's ``instance_group: [{count: N}]``: N sessions of the model per worker. One group: the device
    follows NNSERVE_PROVIDERS, so ``kind`` may only be KIND_AUTO."""
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        fail(key_path, f"must be a list of one group, e.g. [{{count: 2}}], got {_show(value)}")
    group = value[0]
    unknown = sorted(set(group) - {"count", "kind", "name"})
    if unknown:
        fail(f"{key_path}[0].{unknown[0]}", "unknown key; expected count (and kind: KIND_AUTO, name)")
    if group.get("kind", "KIND_AUTO") != "KIND_AUTO":
        fail(f"{key_path}[0].kind", f"must be KIND_AUTO: the device follows NNSERVE_PROVIDERS, got "
                                    f"{_show(group['kind'])}")
    if "count" not in group:
        fail(f"{key_path}[0]", "needs a count")
    return {"instances": (_count(group["count"], f"{key_path}[0].count", "instances", 1, fail),
                          f"{key_path}[0].count")}


# The ONNX Runtime backend's ``parameters`` nnserve takes (Triton's names): key -> ModelConfig field, minimum.
ORT_PARAMETERS = {"intra_op_thread_count": ("intra_op_threads", 0), "inter_op_thread_count": ("inter_op_threads", 1),
                  "lone_request_thread_count": ("lone_request_threads", 0)}  # the last one is ours


def read_parameters(value: object, key_path: str, fail: Fail) -> dict:
    """``parameters: {intra_op_thread_count: {string_value: "2"}, ...}`` as in Triton (a bare number works too);
    intra 0 = the cores shared among the model's sessions."""
    if not isinstance(value, dict):
        fail(key_path, f"must be a mapping of parameter name to {{string_value: ...}}, got {_show(value)}")
    values = {}
    for key, raw in value.items():
        where = f"{key_path}.{key}"
        if key not in ORT_PARAMETERS:
            fail(where, f"unknown parameter; expected one of {', '.join(ORT_PARAMETERS)}")
        if isinstance(raw, dict):
            if set(raw) != {"string_value"}:
                fail(where, f"must be {{string_value: \"N\"}} or a number, got {_show(raw)}")
            raw = raw["string_value"]
        target, minimum = ORT_PARAMETERS[key]
        values[target] = (_count(raw, where, target, minimum, fail), where)
    return values


def read_variant(value: object, key_path: str, fail: Fail) -> dict:
    if value not in VARIANTS:
        fail(key_path, f"must be one of {', '.join(VARIANTS)} (int8: the tag's <name>-int8 store entry, made by "
                       f"export --int8 where its accuracy gate passed), got {_show(value)}")
    return {"variant": (value, key_path)}


# What a model's entry may set: Triton's config.pbtxt names, nested as there. Leaf -> (ModelConfig field,
# minimum, scale to the field's unit). Anything else is refused: a misspelt key must not be ignored.
MODEL_KEYS = {
    "tag": ("tag", None, None),
    "max_batch_size": ("max_batch_size", 1, 1),
    "dynamic_batching": {
        "max_queue_delay_microseconds": ("max_queue_delay_ms", 0, 1e-3),
        "preferred_batch_size": ("preferred_batch_sizes", 1, 1),
        "default_queue_policy": {
            "max_queue_size": ("max_queue_size", 1, 1),  # Triton's 0 (unbounded) is not offered: 503s need a bound
            "default_timeout_microseconds": ("queue_timeout_ms", 0, 1e-3),  # 0 = no timeout, as in Triton
        },
    },
    "version_policy": _read_version_policy,
    "traffic": read_traffic,
    "instance_group": read_instance_group,
    "parameters": read_parameters,
    "variant": read_variant,  # ours: Triton has no variants of one model
}
# The live state (service/lifecycle.py) also holds the versions the policy resolved to.
LIVE_KEYS = MODEL_KEYS | {"versions": lambda value, key_path, fail: {
    "versions": (_version_list(value, key_path, fail), key_path)}}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently: a model listed twice must be an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_models_file(path: str, live: bool = False) -> dict[str, dict[str, tuple[object, str]]]:
    """The models the file at ``path`` names, in file order: ``{name: {ModelConfig field: (value, key path)}}``
    for the keys each entry sets. SettingsError (``<path>: <key path>: <problem>``) for anything unusable.
    ``live``: the live state nnserve writes (service/lifecycle.py), which may be empty and holds resolved
    ``versions``."""
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.load(f, Loader=_UniqueKeyLoader)  # YAML; JSON is YAML too
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the models config: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML or JSON: {e}") from e
    return read_models_document(document, path, live)


def read_models_document(document: object, source: str, live: bool = False) -> dict[str, dict[str, tuple[object, str]]]:
    """read_models_file for a parsed document; ``source`` names it in errors."""
    def fail(key_path: str, problem: str) -> NoReturn:
        raise SettingsError(f"{source}: {key_path}: {problem}")

    top = {"models", "generation"} if live else {"models"}
    if not isinstance(document, dict) or "models" not in document or set(document) - top:
        fail("(top level)", f"must be a mapping with the one key 'models', got {_show(document)}")
    entries = document["models"]
    if not isinstance(entries, dict) or not (entries or live):
        fail("models", f"must be a non-empty mapping of model name to its config, got {_show(entries)}")
    models: dict[str, dict[str, tuple[object, str]]] = {}
    env_names: dict[str, str] = {}
    for name, entry in entries.items():
        where = f"models.{name}"
        if not valid_name(name):
            fail(where, f"a model name has at most {NAME_MAX_LENGTH} characters: lowercase letters, digits, "
                        "'-', '_', '.', starting and ending with a letter or digit (BentoML's tag rule)")
        if split_front_end(name)[1]:
            fail(where, f"names ending in {', '.join(repr('.' + s) for s in sorted(FRONT_END_SUFFIXES))} are "
                        "KServe v2's names of the models' front ends (docs/kserve.md, model names): rename it")
        prefix = ModelConfig(name, "").env_prefix
        if prefix in env_names:
            fail(where, f"its variables ({prefix}TAG, ...) would be those of model {env_names[prefix]!r}: rename one")
        env_names[prefix] = name
        models[name] = _read_entry(entry, LIVE_KEYS if live else MODEL_KEYS, where, fail)
    return models


def valid_name(name: object) -> bool:
    """BentoML's rule for a tag's name or version, which served names and versions follow too."""
    return isinstance(name, str) and len(name) <= NAME_MAX_LENGTH and bool(NAME_RE.match(name))


def _read_entry(entry: object, schema: dict, where: str, fail: Fail) -> dict[str, tuple[object, str]]:
    if entry is None:  # "vgg_fc7:" with nothing after it: all defaults
        return {}
    if not isinstance(entry, dict):
        fail(where, f"must be a mapping, got {_show(entry)}")
    unknown = [str(key) for key in entry if key not in schema]
    if unknown:
        fail(f"{where}.{unknown[0]}", f"unknown key; expected one of {', '.join(schema)}")
    values: dict[str, tuple[object, str]] = {}
    for key, value in entry.items():
        key_path = f"{where}.{key}"
        if isinstance(schema[key], dict):
            values |= _read_entry(value, schema[key], key_path, fail)
            continue
        if callable(schema[key]):  # a key with its own shape (version_policy, traffic, versions)
            values |= schema[key](value, key_path, fail)
            continue
        target, minimum, scale = schema[key]
        if target == "tag":
            parts = value.split(":") if isinstance(value, str) else []
            if not 1 <= len(parts) <= 2 or not all(NAME_RE.match(p) and len(p) <= NAME_MAX_LENGTH for p in parts):
                fail(key_path, f"must be a BentoML store tag, name or name:version, got {_show(value)}")
            values[target] = (value, key_path)
        elif target == "preferred_batch_sizes":
            if not isinstance(value, list) or not all(_is_int(size) and size >= minimum for size in value):
                fail(key_path, f"must be a list of integers >= {minimum}, got {_show(value)}")
            if len(value) > MAX_PREFERRED_BATCH_SIZES:
                fail(key_path, f"lists at most {MAX_PREFERRED_BATCH_SIZES} sizes, got {len(value)}")
            values[target] = (tuple(value), key_path)
        else:
            if not _is_int(value):
                fail(key_path, f"must be an integer, got {_show(value)}")
            if value < minimum:
                fail(key_path, f"must be >= {minimum}, got {value}")
            limit = round(BATCHING_LIMITS[target] / scale)  # in the key's own unit (microseconds for delays)
            if value > limit:
                fail(key_path, f"must be <= {limit}, got {value}")
            values[target] = (value * scale if scale != 1 else value, key_path)
    return values


def _resolve_models(globals_: Settings, env: Mapping[str, str]) -> tuple[ModelConfig, ...]:
    """Each served model's effective config: NNSERVE_<NAME>_* > the file's entry > the global NNSERVE_*
    (``globals_``, validated) > built-in defaults (already in ``globals_``)."""
    path = globals_.models_config
    if "NNSERVE_MODELS_CONFIG" not in env and not Path(path).is_file():
        log.warning("no models config %s in %s: serving the default models %s", path, os.getcwd(),
                    ", ".join(DEFAULT_MODELS))
        entries: dict[str, dict[str, tuple[object, str]]] = {name: {} for name in DEFAULT_MODELS}
        path = ""
    else:
        entries = read_models_file(path)
    models = resolve_entries(globals_, entries, path, env)
    # A variable for a model that is not served does nothing: say so (a typo, or a model left out of the file).
    prefixes = {m.env_prefix for m in models}
    for key in env:
        match = re.fullmatch(r"(NNSERVE_.+_)(TAG|MAX_QUEUE_DELAY_MS)", key)
        if match and match[1] not in prefixes:
            log.warning("%s is ignored: no served model has it (served: %s)", key, ", ".join(m.name for m in models))
    return models


def resolve_entries(globals_: Settings, entries: dict[str, dict[str, tuple[object, str]]], source: str,
                    env: Mapping[str, str] | None = None) -> tuple[ModelConfig, ...]:
    """ModelConfigs from entries read by read_models_file (from ``source``): the globals fill what an entry
    leaves unset; ``env``'s NNSERVE_<NAME>_* (none for the live state, which is already resolved) win."""
    models = []
    for name, entry in entries.items():
        # Where each value comes from (a variable or a key path), for the checks that combine two of them.
        values = {f: (getattr(globals_, f), f"NNSERVE_{f.upper()}") for f in BATCHING_FIELDS}
        values["tag"] = (f"{name}:latest", "the default tag")
        values["intra_op_threads"] = (globals_.intra_op_threads, "NNSERVE_INTRA_OP_THREADS")
        values |= entry
        prefix = ModelConfig(name, "").env_prefix
        if env is not None and (key := prefix + "TAG") in env:
            values["tag"] = (env[key].strip(), key)
        if env is not None and (key := prefix + "MAX_QUEUE_DELAY_MS") in env:
            delay = _parse(key, env[key], float)
            if delay < 0:
                raise SettingsError(f"{key} must be >= 0, got {delay}")
            if delay > BATCHING_LIMITS["max_queue_delay_ms"]:
                raise SettingsError(f"{key} must be <= {BATCHING_LIMITS['max_queue_delay_ms']:g}, got {delay}")
            values["max_queue_delay_ms"] = (delay, key)
        model = ModelConfig(name, **{f: value for f, (value, _) in values.items()})
        _check_combined(model, {f: source for f, (_, source) in values.items()},
                        f"{source}: models.{name}" if source else f"model {name}")
        models.append(model)
    return tuple(models)


def _check_combined(model: ModelConfig, source: dict[str, str], where: str) -> None:
    """The checks that involve two values, each of which may come from the file or a variable: both named."""
    if any(not 1 <= size <= model.max_batch_size for size in model.preferred_batch_sizes):
        raise SettingsError(f"{where}: preferred batch sizes {list(model.preferred_batch_sizes)} "
                            f"({source['preferred_batch_sizes']}) must be in [1, max_batch_size] = "
                            f"[1, {model.max_batch_size}] ({source['max_batch_size']})")
    tag_version = model.tag.partition(":")[2]
    if model.version_policy and tag_version and tag_version != "latest":
        raise SettingsError(f"{where}: the tag {model.tag!r} ({source['tag']}) names a version and a version_policy "
                            f"is set ({source['version_policy']}): give the store name alone in the tag")
    if model.variant != "fp32" and tag_version and tag_version != "latest":
        raise SettingsError(f"{where}: the tag {model.tag!r} ({source['tag']}) names a version of the fp32 entry and "
                            f"variant {model.variant!r} is set ({source['variant']}): give the store name alone in "
                            "the tag (a version_policy picks the variant's versions)")
    if 0 < model.queue_timeout_ms <= model.max_queue_delay_ms:
        raise SettingsError(f"{where}: the queue timeout, {model.queue_timeout_ms} ms ({source['queue_timeout_ms']}), "
                            f"must be larger than the max queue delay, {model.max_queue_delay_ms} ms "
                            f"({source['max_queue_delay_ms']}), or 0: a lone request would always time out "
                            "waiting for company")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
