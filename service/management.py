"""The management API's operations, shared by KServe v2 REST and gRPC: Triton's model-repository extension
(index, load, unload), our traffic split, and Triton's model configuration and statistics.

A change edits the live state (service/lifecycle.py) under its lock, then waits until every worker serves
it; if any worker cannot, the previous state is written back and the answer says which worker failed and
why. Models load from the BentoML model store by name and version only: a request never names a path,
a URL or files. The token check is the front door's (service/auth.py), not this module's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import replace

from models.kinds import KINDS, split_front_end
from service import kserve
from service.errors import ChangeTimeout, ClientError, NotFound
from service.lifecycle import LiveState, StateDir, alive, load_failures, store_index, with_versions
from service.repository import ModelState, Repository, VersionState
from service.settings import ModelConfig, SettingsError, read_models_document, read_traffic, resolve_entries, valid_name

log = logging.getLogger("nnserve.management")

ROLLBACK_WAIT_S = 10.0  # a timed-out change waits this long for its rollback, then answers who serves what
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
# Triton's label_filename names the file its classification extension reads labels from; nnserve's labels
# live in the store metadata (``labels``), so the config names that (and lists them in parameters.labels).
LABELS_SOURCE = "metadata:labels"


# -- index ----------------------------------------------------------------------------------------------------

def v2_names(model: ModelState) -> list[str]:
    """The KServe v2 names a served model answers to: its own, then its kind's front end's (docs/kserve.md)."""
    kind = KINDS.get(model.kind or "")
    front = kind.front_end if kind is not None else None
    return [model.name] + ([f"{model.name}.{front.suffix}"] if front is not None else [])


def index(repository: Repository, ready_only: bool = False) -> list[dict]:
    """Triton's repository index: every served model's versions with their state in this worker (each model,
    then its front end, which shares its versions), then every other store version (state "UNAVAILABLE",
    reason "not loaded" or why it failed to load)."""
    snapshot = repository.snapshot()
    entries = []
    for model in snapshot.models:
        for name in v2_names(model):
            for v in model.versions or (VersionState("", "LOADING" if model.state == "loading" else "UNAVAILABLE",
                                                     model.reason),):
                entries.append({"name": name, "version": v.version, "state": v.state, "reason": v.reason})
    listed = {(e["name"], e["version"]) for e in entries}
    for name, versions in store_index().items():
        entries += [{"name": name, "version": v, "state": "UNAVAILABLE",
                     "reason": snapshot.load_failures.get((name, v), "not loaded")}
                    for v in versions if (name, v) not in listed]
    return [e for e in entries if e["state"] == "READY"] if ready_only else entries


# -- changes --------------------------------------------------------------------------------------------------

def load(repository: Repository, name: str, parameters: dict) -> dict:
    """Load (or reload) ``name``: a served model re-applies its version policy (new store versions join), a
    store model not served starts being served under its own name. ``parameters``: ``config`` (a JSON
    string: a models config entry, Triton's names, merged over the current one) and ``version`` (ours: serve
    that store version too)."""
    check_name(name)
    unknown = sorted(set(parameters) - {"config", "version"})
    if any(k.startswith("file:") for k in unknown):
        raise ClientError("load parameters name files: nnserve loads models from its model store only (by name "
                          "and version); export the model into the store first (python -m export ...)")
    if unknown:
        raise ClientError(f"unknown load parameter(s) {unknown}; expected 'config' (JSON) and/or 'version'")

    edited: list[ModelConfig] = []

    def edit(state: LiveState) -> list[ModelConfig]:
        models = list(state.models)
        current = state.model(name)
        entry = current.to_entry() if current is not None else {}
        entry.pop("versions", None)  # resolved again below
        if "config" in parameters:
            entry = merge(entry, parse_config(parameters["config"]))
        config = entry_config(repository, name, entry)
        if "version" in parameters:
            version = parameters["version"]
            if not isinstance(version, str) or not valid_name(version):
                raise ClientError(f"parameter 'version' must be a store version, got {str(version)[:100]!r}")
            kept = current.versions if current is not None else ()
            config = replace(config, version_policy=("specific", (*kept, version) if version not in kept else kept))
        try:
            config = with_versions(config)
        except NotFound as e:
            raise NotFound(f"cannot load model {name!r}: {e}") from e
        if current is None:
            models.append(config)
        else:
            models[models.index(current)] = config
        edited[:] = models
        return models

    answer = change(repository, f"load {name}", edit, changed=name)
    # Served as asked, but say so when its threads outnumber the cores (the change is the user's to make).
    loaded = next(m for m in edited if m.name == name)
    if (why := repository.settings.oversubscription(loaded)) is not None:
        log.warning(why)
        answer["warnings"] = [why]
    return answer


def unload(repository: Repository, name: str, parameters: dict) -> dict:
    """Stop serving ``name`` (or only its ``version``): requests and streams already on it finish first."""
    check_name(name)
    unknown = sorted(set(parameters) - {"version", "unload_dependents"})
    if unknown:
        raise ClientError(f"unknown unload parameter(s) {unknown}; expected 'version' (and Triton's "
                          "'unload_dependents', which has no meaning here)")

    def edit(state: LiveState) -> list[ModelConfig]:
        current = served_config(state, name)
        version = parameters.get("version")
        if not version:
            return [m for m in state.models if m.name != name]
        if version not in current.versions:
            raise NotFound(f"model {name!r} does not serve version {str(version)[:100]!r}; it serves "
                           f"{', '.join(current.versions)}")
        if dict(current.traffic).get(version):
            raise ClientError(f"version {version!r} of model {name!r} gets {dict(current.traffic)[version]:g}% of its "
                              "traffic: move the traffic first (POST .../traffic)")
        kept = tuple(v for v in current.versions if v != version)
        if not kept:
            return [m for m in state.models if m.name != name]
        config = replace(current, version_policy=("specific", kept), versions=kept,
                         traffic=tuple((v, w) for v, w in current.traffic if v != version))
        return [config if m.name == name else m for m in state.models]

    return change(repository, f"unload {name}", edit, changed=name)


def set_traffic(repository: Repository, name: str, body: dict) -> dict:
    """Split ``name``'s requests that name no version: ``{"weights": {version: percent}, "sticky_header": h}``
    (percentages adding up to 100), or ``{"default_version": v}`` (all of them to ``v``)."""
    check_name(name)
    if not isinstance(body, dict) or not body or not (set(body) <= {"weights", "sticky_header"}
                                                      or set(body) == {"default_version"}):
        raise ClientError("the body must be {\"default_version\": V} or {\"weights\": {V: percent, ...}, "
                          "\"sticky_header\": name}")
    if "default_version" in body:
        body = {"weights": {str(body["default_version"]): 100}}

    def fail(key_path: str, problem: str):
        raise ClientError(f"{key_path}: {problem}")

    values = read_traffic(body, "traffic", fail)

    def edit(state: LiveState) -> list[ModelConfig]:
        current = served_config(state, name)
        traffic = values["traffic"][0]
        unknown = [v for v, _ in traffic if v not in current.versions]
        if unknown:
            raise NotFound(f"model {name!r} does not serve version {', '.join(map(repr, unknown))}; it serves "
                           f"{', '.join(current.versions)} (load a version first)")
        config = replace(current, traffic=traffic, sticky_header=values["sticky_header"][0])
        return [config if m.name == name else m for m in state.models]

    return change(repository, f"traffic {name}", edit, changed=name)


def change(repository: Repository, what: str, edit, changed: str) -> dict:
    """Apply ``edit`` (current LiveState -> its models) as the next generation and wait for every worker; roll
    back if any cannot serve the changed model, or if not every worker confirms within
    NNSERVE_CHANGE_TIMEOUT_S (then the answer, 504, says which worker serves what). The change lock is
    released before the answer, whatever it is. Blocking: call it from a thread."""
    state_dir = repository.state
    if state_dir is None:
        raise ClientError("this server has no live state: its models are fixed")
    timeout = repository.settings.change_timeout_s
    with state_dir.change_lock():
        current = state_dir.read()
        new = LiveState(current.generation + 1, tuple(edit(current)))
        start = time.monotonic()
        state_dir.write(new)
        try:
            reports = state_dir.wait_for(new.generation, timeout)
        except ChangeTimeout as e:
            raise ChangeTimeout(f"{what} timed out: {e}; {roll_back(state_dir, current, new.generation + 1)}") from e
        failures = load_failures(reports, LiveState(new.generation, tuple(m for m in new.models if m.name == changed)))
        if failures:
            raise ClientError(f"{what} failed and was rolled back: {'; '.join(failures)}; "
                              f"{roll_back(state_dir, current, new.generation + 1)}")
        seconds = time.monotonic() - start
    model = new.model(changed)
    return {"generation": new.generation, "seconds": round(seconds, 3), "workers": len(reports),
            "model": changed, "versions": list(model.versions) if model else [],
            "traffic": dict(model.traffic) if model else {}}


def roll_back(state_dir: StateDir, previous: LiveState, generation: int) -> str:
    """Write ``previous``'s models back as ``generation`` and wait (ROLLBACK_WAIT_S at most) for every worker:
    what happened, for the answer: every worker serves the previous models again, or which worker serves what."""
    state_dir.write(LiveState(generation, previous.models))
    try:
        state_dir.wait_for(generation, min(ROLLBACK_WAIT_S, state_dir.settings.change_timeout_s))
    except ChangeTimeout:
        return (f"rolled back to the previous models as generation {generation}, which not every worker "
                f"confirmed yet (they apply it when they can); now {who_serves_what(state_dir, generation)}")
    return f"rolled back: every worker serves the previous models again (generation {generation})"


def who_serves_what(state_dir: StateDir, generation: int) -> str:
    """Per worker, from its report: its generation and each model's ready versions, or why it has no say."""
    reports = state_dir.reports()
    parts = []
    for worker in range(1, state_dir.settings.workers + 1):
        report = reports.get(worker)
        if report is None:
            parts.append(f"worker {worker}: no report yet")
            continue
        served = ", ".join(f"{name} [{', '.join(v for v, s in versions.items() if s['state'] == 'READY') or 'none'}]"
                           for name, versions in sorted(report["models"].items())) or "no model"
        dead = "" if alive(report["pid"]) else " (its process is gone: a new one serves the live state on start)"
        parts.append(f"worker {worker} (pid {report['pid']}){dead}: generation {report['generation']}"
                     f"{'' if report['generation'] >= generation else ' (behind)'}: {served}")
    return "; ".join(parts)


def served_config(state: LiveState, name: str) -> ModelConfig:
    current = state.model(name)
    if current is None:
        raise NotFound(f"model {name!r} is not served; served: {', '.join(m.name for m in state.models) or 'none'}")
    return current


def check_name(name: str) -> None:
    if not valid_name(name):
        raise ClientError(f"{str(name)[:100]!r} is not a model name (lowercase letters, digits, '-', '_', '.')")
    model, suffix = split_front_end(name)
    if suffix:
        raise ClientError(f"{name!r} is the {suffix} front end of model {model!r}, which comes and goes with it: "
                          f"load, unload or route {model!r}")


def parse_config(raw: object) -> dict:
    """Triton's load ``config`` parameter: a JSON string (a mapping is taken as is)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ClientError(f"parameter 'config' is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ClientError("parameter 'config' must be a JSON object: a models config entry (docs/service.md)")
    return raw


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            and key != "version_policy" else value
    if "version_policy" in override and ":" in str(out.get("tag", "")):
        out["tag"] = str(out["tag"]).split(":")[0]
    return out


def entry_config(repository: Repository, name: str, entry: dict) -> ModelConfig:
    """A models config entry (as the file takes it) -> ModelConfig, the globals filling what it leaves unset."""
    try:
        entries = read_models_document({"models": {name: entry}}, "config")
        return resolve_entries(repository.settings, entries, "config")[0]
    except SettingsError as e:
        raise ClientError(str(e)) from e


# -- Triton's model configuration and statistics ---------------------------------------------------------------

def model_config(repository: Repository, name: str, version: str = "") -> dict:
    """Triton's model configuration (config.pbtxt as JSON) of a served model, or of its kind's front end
    (``lenet5.image``: one BYTES input, the network's outputs; ``char_lstm.text``: text in, text out,
    decoupled)."""
    model, _ = split_front_end(name)
    served = repository.pick(model, version)  # a read: no lease (it may run off the event loop)
    runtime, config = served.runtime, served.config
    kind, meta = runtime.kind_module, runtime.metadata
    front = kserve.front_end(runtime, name)
    batch_first = all(runtime.batch_axis(t.name) == 0 for t in [*runtime.inputs, *runtime.outputs])
    # Triton's max_batch_size 0 means "no batch axis first": text models carry their state batch-second.
    max_batch_size = config.max_batch_size if batch_first and (front is None or front.batched) else 0

    def dims(shape) -> list[int]:
        return list(shape[1:] if max_batch_size else shape)

    def outputs(specs) -> list[dict]:
        out = []
        for t in specs:
            entry = {"name": t.name, "data_type": TRITON_TYPES.get(t.dtype, "TYPE_INVALID"), "dims": dims(t.shape)}
            if kind.output_labels(meta, t.name):  # what the classification extension answers labels from
                entry["label_filename"] = LABELS_SOURCE
            out.append(entry)
        return out

    policy = config.to_entry()["version_policy"]
    labels = next((kind.output_labels(meta, t.name) for t in runtime.outputs if kind.output_labels(meta, t.name)),
                  None)
    parameters = {"store_tag": {"string_value": runtime.store_tag or runtime.tag},
                  "served_versions": {"string_value": ",".join(config.versions)},
                  **({"labels": {"string_value": json.dumps(labels)}} if labels else {})}
    if front is not None:
        return {
            "name": name, "platform": kserve.FRONT_END_PLATFORM, "version_policy": policy,
            "max_batch_size": max_batch_size,
            "input": [{"name": front.input, "data_type": "TYPE_STRING", "format": "FORMAT_NONE",
                       "dims": dims(front.input_shape)}],
            "output": outputs(runtime.outputs) if front.outputs is None else [
                {"name": n, "data_type": "TYPE_STRING", "dims": dims(shape)} for n, shape in front.outputs],
            "model_transaction_policy": {"decoupled": front.decoupled},
            "parameters": {"model": {"string_value": runtime.name},
                           front.input: {"string_value": front.description}, **parameters}}
    return {
        "name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime", "version_policy": policy,
        "max_batch_size": max_batch_size,
        "input": [{"name": t.name, "data_type": TRITON_TYPES.get(t.dtype, "TYPE_INVALID"),
                   "format": f"FORMAT_{kind.input_layout(meta, t.name) or 'NONE'}", "dims": dims(t.shape)}
                  for t in runtime.inputs],
        "output": outputs(runtime.outputs),
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(config.max_queue_delay_ms * 1e3),
            "preferred_batch_size": list(config.preferred_batch_sizes),
            "default_queue_policy": {"max_queue_size": config.max_queue_size, "timeout_action": "REJECT",
                                     "default_timeout_microseconds": round(config.queue_timeout_ms * 1e3)}},
        # count: sessions per worker (every worker has its own: workers x count in the server)
        "instance_group": [{"name": f"{name}_0", "kind": "KIND_CPU" if runtime.provider == "CPUExecutionProvider"
                            else "KIND_GPU", "count": config.instances}],
        "parameters": {**parameters, "execution_provider": {"string_value": runtime.provider},
                       **execution_parameters(repository, config),
                       **({"front_end": {"string_value": f"{name}.{kind.front_end.suffix}"}}
                          if kind.front_end else {})},
    }


def execution_parameters(repository: Repository, config: ModelConfig) -> dict:
    """How the model runs (Triton's ORT backend parameter names, and ours): effective threads, variant, workers."""
    settings = repository.settings
    return {"intra_op_thread_count": {"string_value": str(settings.threads_for(config))},
            "inter_op_thread_count": {"string_value": str(config.inter_op_threads)},
            "lone_request_thread_count": {"string_value": str(config.lone_request_threads)},
            "variant": {"string_value": config.variant}, "workers": {"string_value": str(settings.workers)}}


def model_statistics(repository: Repository, name: str = "", version: str = "") -> dict:
    """Triton's statistics per served version, summed over every worker from the Prometheus metrics
    (docs/metrics.md): success / fail = requests by outcome with their time; queue = time in the dynamic
    batcher's queue; compute_input = image decode and preprocessing; compute_infer = ONNX Runtime calls;
    inference_count = items run, execution_count = ONNX Runtime calls. compute_output is not measured
    apart (0). A front end (``lenet5.image``) counts its own requests; the ONNX Runtime calls they join
    are its model's (as a Triton ensemble's composing model counts its executions)."""
    snapshot = repository.snapshot()
    if name:  # NotFound / Unavailable as for inference; a read: no lease (this runs in a worker thread)
        kserve.front_end(repository.pick(split_front_end(name)[0], version, snapshot).runtime, name)
    samples = _metric_samples()
    stats = []
    for model, served_name in ((m, n) for m in snapshot.models for n in v2_names(m)):
        if name and served_name != name:
            continue
        for v in (s.version for s in model.versions):
            if version and v != version:
                continue
            get = _summer(samples, served_name, v)
            stats.append({
                "name": served_name, "version": v, "last_inference": 0,
                "inference_count": int(get("nnserve_batch_size_sum")),
                "execution_count": int(get("nnserve_batch_size_count")),
                "inference_stats": {
                    "success": _duration(get("nnserve_requests_total", outcome="ok"),
                                         get("nnserve_request_duration_seconds_sum")),
                    "fail": _duration(get("nnserve_requests_total") - get("nnserve_requests_total", outcome="ok"), 0),
                    "queue": _duration(get("nnserve_batch_wait_duration_seconds_count"),
                                       get("nnserve_batch_wait_duration_seconds_sum")),
                    "compute_input": _duration(get("nnserve_preprocess_duration_seconds_count"),
                                               get("nnserve_preprocess_duration_seconds_sum")),
                    "compute_infer": _duration(get("nnserve_inference_duration_seconds_count"),
                                               get("nnserve_inference_duration_seconds_sum")),
                    "compute_output": _duration(0, 0), "cache_hit": _duration(0, 0), "cache_miss": _duration(0, 0)},
                "batch_stats": []})
    return {"model_stats": stats}


def _duration(count: float, seconds: float) -> dict:
    return {"count": int(count), "ns": int(seconds * 1e9)}


def _metric_samples() -> list:
    """Every sample of every worker's metrics (the multiprocess files /metrics merges too)."""
    import glob
    import os

    from prometheus_client import REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder is None:
        return [s for family in REGISTRY.collect() for s in family.samples]
    # A worker creating a metrics file leaves it empty for an instant (prometheus_client sizes its mmap after
    # opening it), and reading it then raises struct.error: a statistics call under load answered 500. An
    # empty file holds no sample yet; once sized it stays readable (zeros read as no samples).
    files = []
    for path in glob.glob(os.path.join(folder, "*.db")):
        with contextlib.suppress(OSError):  # gone since the listing: nothing to read either
            if os.path.getsize(path) > 0:
                files.append(path)
    return [s for family in MultiProcessCollector.merge(files, accumulate=True) for s in family.samples]


def _summer(samples: list, model: str, version: str):
    def get(metric: str, **labels) -> float:
        return sum(s.value for s in samples if s.name == metric and s.labels.get("model") == model
                   and s.labels.get("version") == version and all(s.labels.get(k) == v for k, v in labels.items()))
    return get
