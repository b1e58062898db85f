"""Every served model in this worker process, each in one or more versions: per version an ONNX Runtime
session, its dynamic batcher and (text models) its generation loop; per model the routing of requests that
name no version (the newest, or a weighted split, optionally sticky by a request header).

What is served comes from the live state (service/lifecycle.py): a background thread loads it at start
(health endpoints answer at once) and then reconciles to every change of it: new versions load and warm up
before any request reaches them, then the routing switches at once, then versions no longer served drain
(requests and streams holding them finish) and are freed. A version that cannot load is reported failed
with the reason while the others serve. The data plane (service/dataplane.py) calls ``get`` and then
``batcher`` / ``generator`` for every front end (REST, KServe v2 REST and gRPC); the repository knows
nothing of them.

One owner of the served state: the reconcile step (the worker's ``model-loader`` thread, under one lock) is
the only code that changes what is served and the only writer of this worker's report. Each reconcile
publishes an immutable ``Snapshot`` (generation; per model its config, state, reason, kind and versions
with state and reason; the routing) with one assignment, so a reader (``/readyz``, ``GET /models``, the
repository index, model config, statistics, the report) sees one generation whole, never half of two.
Reports never go back a generation (a drain that finishes late asks the loader to report; it writes
nothing itself).

Requests run inside ``request_scope`` (the front door and the gRPC servicer open it): every version a
request got from ``get`` stays loaded until the request, its streamed body included, is over. Lease counts
change on the thread that opened the scope (the event loop) only: a lookup from another thread (the
statistics, run in a worker thread) takes no lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import logging
import os
import random
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from models.kinds import kinds_for
from service import images, memory, metrics
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import ClientError, Conflict, NotFound, Unavailable
from service.generation import ContinuousBatcher
from service.lifecycle import LiveState, StateDir, store_model_complete, with_versions
from service.runtime import ModelRuntime, load_runtime, store_model
from service.settings import ModelConfig, Settings

log = logging.getLogger("nnserve.repository")

POLL_S = 0.1  # how often a worker looks for a new live state (a stat call)
JOIN_S = 2.0  # how often a worker looks in the store for configured models not exported yet
QUIET_S = 0.1  # a retired version must be idle this long before it is freed (see Served.idle)


def execution_of(model: ModelConfig) -> tuple:
    """What a version's sessions are made with: a change of it loads new ones (the batching alone does not)."""
    return model.instances, model.intra_op_threads, model.inter_op_threads, model.variant, model.lone_request_threads


def batching_config(model: ModelConfig) -> BatchingConfig:
    """The batcher's own config (seconds) from a served model's effective config (ms)."""
    return BatchingConfig(max_batch_size=model.max_batch_size, max_queue_delay_s=model.max_queue_delay_ms / 1e3,
                          preferred_batch_sizes=model.preferred_batch_sizes, max_queue_size=model.max_queue_size,
                          queue_timeout_s=model.queue_timeout_ms / 1e3)


# -- request scope: which versions a request holds ------------------------------------------------------------

@dataclass
class RequestScope:
    headers: Mapping[str, str]  # lower-case names: the sticky header of a traffic split is read here
    held: list[Served] = field(default_factory=list)
    thread: int = field(default_factory=threading.get_ident)  # leases change on this thread only


_scope: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("nnserve_request", default=None)


@contextlib.contextmanager
def request_scope(headers: Mapping[str, str] | None = None) -> Iterator[RequestScope]:
    """Around one request: the versions it gets from ``Repository.get`` are released when it is over."""
    scope = RequestScope(headers or {})
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)
        for served in scope.held:
            served.leases -= 1


@dataclass(eq=False)
class Served:
    """One version of a served model in this worker."""

    config: ModelConfig
    runtime: ModelRuntime  # the first instance (generation runs on it)
    batcher: DynamicBatcher
    generator: ContinuousBatcher | None
    instances: tuple[ModelRuntime, ...] = ()  # every session the batcher runs batches on (runtime first)
    lone: ModelRuntime | None = None  # the session with lone_request_threads (adaptive), if any
    leases: int = 0  # requests holding it (request_scope); changed on the scope's thread (event loop) only
    retired: bool = False  # no longer routed to: freed once idle

    def idle(self) -> bool:
        busy = self.generator is not None and (self.generator.active or self.generator.waiting)
        return self.leases == 0 and self.batcher.queued == 0 and not busy


@dataclass
class Route:
    """How a served model's requests find a version: the named one, else the traffic split, else the newest."""

    config: ModelConfig
    versions: dict[str, Served]  # ready versions, oldest first

    def pick(self, version: str, headers: Mapping[str, str]) -> Served:
        if version:
            if version not in self.versions:
                raise NotFound(f"model {self.config.name!r} has no version {str(version)[:100]!r} being served; "
                               f"serving: {', '.join(self.versions) or 'none'}")
            return self.versions[version]
        weights = [(v, w) for v, w in self.config.traffic if v in self.versions and w > 0]
        if not weights:
            return self.versions[next(reversed(self.versions))]
        key = headers.get(self.config.sticky_header) if self.config.sticky_header else None
        # Sticky: the same header value lands on the same version in every worker and replica (crc32 is
        # stable across processes, unlike hash()).
        point = (zlib.crc32(key.encode()) % 10_000) / 100 if key else random.random() * 100
        total = sum(w for _, w in weights)  # < 100 while a weighted version is not ready: the rest share it
        point *= total / 100
        for v, w in weights:
            point -= w
            if point < 0:
                return self.versions[v]
        return self.versions[weights[-1][0]]


@dataclass(frozen=True)
class VersionState:
    """One version of a served model in this worker: Triton's READY / LOADING / UNAVAILABLE, and why not ready."""

    version: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class ModelState:
    """One served model in this worker: "ready" (some version serves), "loading" (or waiting for its export:
    ``reason`` says) or "failed" (``reason`` says why); ``kind`` from the store, known even if loading failed."""

    config: ModelConfig
    state: str
    reason: str
    kind: str | None
    versions: tuple[VersionState, ...]

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Snapshot:
    """What this worker serves, published whole by each reconcile (``Repository.snapshot()``)."""

    generation: int
    models: tuple[ModelState, ...]
    draining: tuple[str, ...] = ()  # "name:version" retired, still finishing requests or not yet freed
    load_failures: Mapping[tuple[str, str], str] = field(default_factory=lambda: MappingProxyType({}))
    routes: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}), repr=False, compare=False)

    def model(self, name: str) -> ModelState | None:
        return next((m for m in self.models if m.name == name), None)

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def ready(self) -> bool:
        return all(m.state == "ready" for m in self.models)

    def not_ready_reason(self) -> str | None:
        """None once every model is ready, else which are not and why (for /readyz)."""
        reasons = [f"{m.name} failed to load: {m.reason}" if m.state == "failed" else m.reason
                   or f"{m.name} is loading" for m in self.models if m.state != "ready"]
        return "; ".join(reasons) or None

    def report(self, pid: int) -> dict:
        """The worker report (service/lifecycle.py) of this snapshot."""
        return {"pid": pid, "generation": self.generation, "draining": list(self.draining),
                "models": {m.name: {v.version: {"state": v.state, "reason": v.reason} for v in m.versions}
                           for m in self.models}}


class Repository:
    """Serves the live state (``state``), or exactly ``settings.models`` when there is none (tests, tools)."""

    def __init__(self, settings: Settings, state: StateDir | None = None, worker: int = 0) -> None:
        self.settings = settings
        self.state = state
        self.worker = worker
        # The reconcile step's own bookkeeping: changed under _reconcile_lock only, never read by front ends
        # (they read the published snapshot).
        self.served: dict[tuple[str, str], Served] = {}  # every loaded version, retiring ones included
        self._version_failures: dict[tuple[str, str], str] = {}  # (name, version) -> why it could not load
        self._kinds: dict[str, str | None] = {}  # name -> kind from the store metadata: known even if loading fails
        self._snapshot = Snapshot(0, tuple(ModelState(m, "loading", "", None, ()) for m in settings.models))
        self._reported = 0  # the newest generation this worker has reported: reports never go back
        self._report_due = threading.Event()  # a drain finished: the loader reports "nothing draining"
        self.loaded = threading.Event()  # the first state is served (or failed)
        self._stop = threading.Event()
        self._reconcile_lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        """What this worker serves now, whole: render it, do not read it twice per answer."""
        return self._snapshot

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._serve_state, name="model-loader", daemon=True)
        thread.start()
        return thread

    def load_all(self) -> None:
        """Serve ``settings.models`` (no live state), in this thread."""
        self.reconcile(LiveState(0, self.settings.models))
        self.loaded.set()

    def _serve_state(self) -> None:
        if self.state is None:
            return self.load_all()
        stamp = None
        try:
            self.state.initialize(self.settings.models)
            stamp = self.state.stamp()
            self.reconcile(self.state.read())
        except Exception as e:  # e.g. an unwritable state dir: every model reports it (/readyz, GET /models)
            log.exception("worker %s cannot serve the live state in %s", self.worker, self.state.path)
            reason = f"the live state in {self.state.path} cannot be used: {e}"
            self._snapshot = Snapshot(0, tuple(ModelState(m, "failed", reason, None, ())
                                               for m in self.settings.models))
        finally:
            self.loaded.set()
        next_join = time.monotonic() + JOIN_S
        while not self._stop.wait(POLL_S):
            if self._report_due.is_set():
                self._report_due.clear()
                with self._reconcile_lock:
                    self._publish(self._snapshot.generation, self._snapshot.models, self._snapshot.routes)
            if any(m.state == "loading" for m in self._snapshot.models) and time.monotonic() > next_join:
                next_join = time.monotonic() + JOIN_S
                self._join_exported()
            if self.state.stamp() == stamp:
                continue
            stamp = self.state.stamp()
            try:
                desired = self.state.read()
            except Exception as e:  # a state this worker cannot read: keep serving, say why
                log.error("worker %s cannot read the live state %s: %s", self.worker, self.state.state_file, e)
                continue
            if desired.generation == self._snapshot.generation:
                continue  # replaced by the same generation (or seen between its stat and its read): served
            if desired.generation < self._snapshot.generation:
                log.error("worker %s: %s went back from generation %d to %d; keeping %d (the live state only "
                          "moves forward)", self.worker, self.state.state_file, self._snapshot.generation,
                          desired.generation, self._snapshot.generation)
                continue
            try:
                self.reconcile(desired)
            except Exception:  # never let the watch loop die: the next change is tried again
                log.exception("worker %s: serving generation %d failed", self.worker, desired.generation)

    def _join_exported(self) -> None:
        """Configured models that were not in the store when the state was written join once they are
        (``make serve`` serves lenet5 while the other default models still train): the worker that sees it
        first writes the next generation, the others load it from there."""
        waiting = [m.config for m in self._snapshot.models if m.state == "loading" and not m.config.versions]
        if self.state is None:  # a repository without a state directory (in-process tools) has nobody to tell
            return
        try:
            if not any(store_model_complete(m.store_name) for m in waiting):
                return
            with self.state.change_lock():
                current = self.state.read()
                models, joined = [], []
                for model in current.models:
                    if not model.versions and store_model_complete(model.store_name):
                        with contextlib.suppress(ClientError):
                            model = with_versions(model)
                            joined.append(model.name)
                    models.append(model)
                if joined:
                    log.info("worker %s: %s now in the store: serving", self.worker, ", ".join(joined))
                    self.state.write(LiveState(current.generation + 1, tuple(models)))
        except Conflict:  # a change (or another worker's join) is being written: look again later
            pass
        except Exception:  # never let the watch loop die
            log.exception("worker %s: looking for newly exported models failed", self.worker)

    def reconcile(self, desired: LiveState) -> None:
        """Serve ``desired``: load what is new, switch the routing, retire what is gone, publish the snapshot
        and report it (the one writer of this worker's report)."""
        with self._reconcile_lock:
            routes: dict[str, Route] = {}
            models: list[ModelState] = []
            for config in desired.models:
                if self._snapshot.routes.get(config.name) is None:
                    metrics.set_model_ready(config.name, False)
                failed = ""
                if not config.versions and self.state is None:  # no live state: this worker resolves its own
                    try:
                        config = with_versions(config)
                    except NotFound:
                        pass  # waiting, below
                    except ClientError as e:
                        failed = str(e)
                if failed or not config.versions:
                    reason = failed or (f"model {config.name!r} is waiting for {config.store_name!r} to be exported "
                                        "into the model store (make export, or python -m export ...); it is served "
                                        "as soon as it is there")
                    models.append(ModelState(config, "failed" if failed else "loading", reason,
                                             self._kinds.get(config.name), ()))
                    continue
                ready = {}
                for version in config.versions:
                    served = self._version(config, version)
                    if served is not None:
                        ready[version] = served
                versions = tuple(
                    VersionState(v, "READY") if v in ready
                    else VersionState(v, "UNAVAILABLE", self._version_failures.get((config.name, v), "not loaded"))
                    for v in config.versions)
                if ready:
                    routes[config.name] = Route(config, ready)
                    models.append(ModelState(config, "ready", "", self._kinds.get(config.name), versions))
                else:
                    models.append(ModelState(config, "failed", "; ".join(v.reason for v in versions),
                                             self._kinds.get(config.name), versions))
            kept = {id(s) for route in routes.values() for s in route.versions.values()}
            retiring = [s for s in self.served.values() if id(s) not in kept and not s.retired]
            for served in retiring:
                served.retired = True
            self._publish(desired.generation, tuple(models), routes)
            for config in desired.models:
                metrics.set_model_ready(config.name, config.name in routes)
        if retiring:
            threading.Thread(target=self._drain, args=(retiring,), name="drain", daemon=True).start()

    def _publish(self, generation: int, models: tuple[ModelState, ...], routes: Mapping[str, Route]) -> None:
        """Replace the snapshot (one assignment: readers see the old one or this one) and report it. Call
        holding _reconcile_lock."""
        self._snapshot = Snapshot(
            generation, models, tuple(sorted(f"{n}:{v}" for (n, v), s in self.served.items() if s.retired)),
            MappingProxyType(dict(self._version_failures)), MappingProxyType(dict(routes)))
        if self.state is None:
            return
        if generation < self._reported:  # cannot happen (_serve_state never goes back): never report it
            log.error("worker %s: not reporting generation %d after %d", self.worker, generation, self._reported)
            return
        if self.state.report(self.worker, self._snapshot.report(os.getpid())):
            self._reported = generation
        else:
            log.error("worker %s: its report already holds a newer generation than %d", self.worker, generation)

    def _version(self, config: ModelConfig, version: str) -> Served | None:
        """The served version, loaded now if it is new or its batching changed; None if it cannot load."""
        key = (config.name, version)
        current = self.served.get(key)
        reused: tuple[ModelRuntime | None, ...] = ()  # the sessions (lone, *instances) when only the batching changes
        if current is not None and not current.retired and execution_of(current.config) == execution_of(config):
            if batching_config(current.config) == batching_config(config):
                current.config = config  # same batching: only versions or traffic changed, which live in the Route
                return current
            reused = (current.lone, *current.instances)
        try:
            served = self._load(config, version, reused)
        except Exception as e:  # a broken version must not take the others down
            self._version_failures[key] = f"{type(e).__name__}: {e}"
            log.error("worker %s: model %s version %s failed to load and is not served: %s", self.worker,
                      config.name, version, self._version_failures[key])
            return None
        self._version_failures.pop(key, None)
        if current is not None:
            current.retired = True
            threading.Thread(target=self._drain, args=([current],), name="drain", daemon=True).start()
        self.served[key] = served
        return served

    def _load(self, config: ModelConfig, version: str, reused: tuple[ModelRuntime | None, ...]) -> Served:
        """A version's sessions, one per instance, and the lone-request one if asked (or ``reused``, when only
        its batching changed: (lone, *instances)), warmed up, and its batchers."""
        tag = f"{config.store_name}:{version}"
        if reused:
            lone, instances = reused[0], tuple(r for r in reused[1:] if r is not None)
        else:
            # The kind first: an endpoint's default model must not change because the model failed to load.
            self._kinds[config.name] = store_model(tag).info.metadata.get("kind")
            instances = tuple(self._session(config, tag, config) for _ in range(config.instances))  # Triton's count
            lone = self._session(config, tag, replace(config, intra_op_threads=config.lone_request_threads)) \
                if config.lone_request_threads else None
            if "image" in instances[0].roles:  # Pillow loads its decoders on first use: not on a client's request
                images.preprocess_upload(images.blank_png(), instances[0].metadata["preprocessing"])
        runtime = instances[0]
        batcher = DynamicBatcher(f"{config.name}:{version}", [r.run for r in instances], runtime.batch_axis,
                                 batching_config(config),
                                 on_batch=functools.partial(metrics.observe_batch, runtime, "dynamic"),
                                 lone=lone.run if lone is not None else None)
        generator = None
        if runtime.kind_module.generates:
            generator = ContinuousBatcher(
                runtime, self.settings.generation_batch_size,
                on_step=functools.partial(metrics.observe_batch, runtime, "continuous"),
                on_occupancy=functools.partial(metrics.set_generation_slots, runtime))
        return Served(config, runtime, batcher, generator, instances, lone)

    def _session(self, config: ModelConfig, tag: str, options: ModelConfig) -> ModelRuntime:
        """One session of the store entry ``tag`` served as ``config.name``, with ``options``' threads, warmed up."""
        runtime = load_runtime(config.name, tag, self.settings, options)
        generates = runtime.kind_module.generates
        runtime.warmup(warmup_sizes(self.settings.generation_batch_size if generates else config.max_batch_size))
        return runtime

    def _drain(self, retiring: list[Served]) -> None:
        """Free retired versions once nothing uses them (NNSERVE_DRAIN_TIMEOUT_S at most): requests and streams
        that got one before the switch finish on it. Writes no report: it asks the loader to (_report_due)."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        quiet_since: dict[int, float] = {}
        pending = list(retiring)
        served: Served | None = None  # the loop's variable, dropped at the end with the last references
        while pending:
            now = time.monotonic()
            for served in list(pending):
                # Idle for QUIET_S, not just now: a request that read the old routing an instant before the
                # switch takes its lease a few microseconds later.
                if served.idle():
                    quiet_since.setdefault(id(served), now)
                else:
                    quiet_since.pop(id(served), None)
                if now - quiet_since.get(id(served), now) >= QUIET_S or now > deadline:
                    if now > deadline and not served.idle():
                        log.warning("worker %s: %s still busy after %.0f s (NNSERVE_DRAIN_TIMEOUT_S): closed",
                                    self.worker, served.runtime.tag, self.settings.drain_timeout_s)
                    self._free(served)
                    pending.remove(served)
            time.sleep(0.02)
        retiring.clear()  # the last references to the sessions (with the loop's variable)
        served = None  # noqa: F841
        gc.collect()
        memory.release_freed_memory()
        # "nothing draining" in the next report now also means the memory is back
        if self.state is None:
            with self._reconcile_lock:
                self._publish(self._snapshot.generation, self._snapshot.models, self._snapshot.routes)
        else:
            self._report_due.set()

    def _free(self, served: Served) -> None:
        served.batcher.close()
        if served.generator is not None:
            asyncio.run(served.generator.close())  # its own loop: no slot is left to wake on the server's
        key = (served.config.name, served.runtime.version)
        with self._reconcile_lock:
            if self.served.get(key) is served:
                del self.served[key]
        log.info("worker %s: freed %s", self.worker, served.runtime.tag)

    def close(self) -> None:
        self._stop.set()
        for served in list(self.served.values()):
            served.batcher.close()

    async def close_generators(self) -> None:
        for served in list(self.served.values()):
            if served.generator is not None:
                await served.generator.close()

    # -- what front ends ask: each answer renders one snapshot --------------------------------------------

    def names(self) -> list[str]:
        return self._snapshot.names()

    @property
    def desired(self) -> LiveState:
        """The live state this worker serves (its generation and model configs)."""
        snapshot = self._snapshot
        return LiveState(snapshot.generation, tuple(m.config for m in snapshot.models))

    @property
    def failures(self) -> dict[str, str]:
        """name -> why it serves no version."""
        return {m.name: m.reason for m in self._snapshot.models if m.state == "failed"}

    @property
    def waiting(self) -> dict[str, str]:
        """name -> why it is not served yet (not in the store: served once it is exported)."""
        return {m.name: m.reason for m in self._snapshot.models if m.state == "loading" and m.reason}

    @property
    def models(self) -> dict[str, ModelRuntime]:
        """Each served model's newest ready version."""
        return {name: route.versions[next(reversed(route.versions))].runtime
                for name, route in self._snapshot.routes.items()}

    def is_ready(self, name: str) -> bool:
        return name in self._snapshot.routes

    def all_ready(self) -> bool:
        return self._snapshot.ready

    def not_ready_reason(self) -> str | None:
        """None once every model is ready, else which are not and why (for /readyz)."""
        return self._snapshot.not_ready_reason()

    def state_of(self, name: str) -> str:
        model = self._snapshot.model(name)
        return model.state if model is not None else "loading"

    def pick(self, name: str, version: str = "", snapshot: Snapshot | None = None) -> Served:
        """The served version ``name`` / ``version`` resolves to (or its routing picks), taking no lease:
        NotFound if unknown, Unavailable while loading or if it failed."""
        snapshot = snapshot or self._snapshot
        route = snapshot.routes.get(name)
        if route is None:
            model = snapshot.model(name)
            if model is None:
                raise NotFound(f"unknown model {str(name)[:100]!r}; served models: "
                               f"{', '.join(snapshot.names()) or 'none'}")
            if model.state == "failed":
                raise Unavailable(f"model {name!r} failed to load: {model.reason}")
            if model.reason:  # waiting for its export
                raise Unavailable(model.reason, retry_after=5)
            raise Unavailable(f"model {name!r} is still loading", retry_after=1)
        scope = _scope.get()
        return route.pick(version, scope.headers if scope else {})

    def get(self, name: str, version: str = "") -> ModelRuntime:
        """The served model ``name`` in ``version`` (or as its routing picks): NotFound if unknown, Unavailable
        while loading or if it failed. Inside a request_scope, on its thread, the version stays loaded until
        the request ends (another thread gets it without a lease: lease counts change on one thread)."""
        served = self.pick(name, version)
        scope = _scope.get()
        if scope is not None and scope.thread == threading.get_ident():
            served.leases += 1
            scope.held.append(served)
        return served.runtime

    def model_for(self, name: str, endpoint: str, version: str = "") -> ModelRuntime:
        """The served model ``name`` if ``endpoint`` takes its kind (models/kinds: each kind lists its endpoints)."""
        model = self.get(name, version)
        if endpoint not in model.kind_module.endpoints:
            fitting = [n for n, m in self.models.items() if endpoint in m.kind_module.endpoints]
            raise ClientError(f"model {name!r} is a {model.kind} model; {endpoint} serves "
                              f"{', '.join(fitting) or 'no model of this server'}")
        return model

    def default_model(self, endpoint: str) -> str:
        """The model ``endpoint`` uses when a request names none: the first in config order of a kind it
        serves (if that one failed to load, requests get its reason from ``get``, not another model)."""
        kinds = kinds_for(endpoint)
        snapshot = self._snapshot
        for model in snapshot.models:
            if model.kind in kinds:
                return model.name
            if model.kind is None and model.state != "failed":  # its kind is not known yet
                raise Unavailable(f"{endpoint}: model {model.name!r} (the first configured one that may serve it) "
                                  f"is still loading{': ' + model.reason if model.reason else ''}", retry_after=1)
        served = ", ".join(f"{m.name} ({m.kind or 'kind unknown'})" for m in snapshot.models)
        wanted = " or ".join(kinds) or "(none serves it)"
        raise NotFound(f"{endpoint} needs a model of kind {wanted} and none is served; served models: {served}")

    def describe(self, snapshot: Snapshot | None = None) -> list[dict]:
        """GET /models: per model its newest ready version (what a request naming none gets without a traffic
        split), every version with its state, and the split."""
        snapshot = snapshot or self._snapshot
        out = []
        for model in snapshot.models:
            route = snapshot.routes.get(model.name)
            if route is None:
                out.append({"name": model.name, "state": model.state, "reason": model.reason or None})
                continue
            config = model.config
            newest = route.versions[next(reversed(route.versions))]
            versions = [{"version": v.version, "state": "ready" if v.state == "READY" else "failed",
                         "reason": v.reason if v.state != "READY" else None} for v in model.versions]
            out.append(newest.runtime.describe() | {
                "state": "ready", "batching": _batching_of(newest.batcher), "execution": self.execution(newest),
                "versions": versions,
                "traffic": {"weights": dict(config.traffic), "sticky_header": config.sticky_header or None}})
        return out

    def execution(self, served: Served) -> dict:
        """How a served version runs in this worker: its sessions and their threads (GET /models)."""
        config = served.config
        return {"instances": len(served.instances), "intra_op_threads": self.settings.threads_for(config),
                "inter_op_threads": config.inter_op_threads, "variant": config.variant,
                "lone_request_threads": config.lone_request_threads if served.lone is not None else 0,
                "workers": self.settings.workers, "oversubscription": self.settings.oversubscription(config)}

    def served_versions(self, name: str) -> list[str]:
        """The ready versions of ``name``, oldest first (KServe model metadata's ``versions``)."""
        route = self._snapshot.routes.get(name)
        return list(route.versions) if route else []

    def served_version(self, runtime: ModelRuntime) -> Served:
        return self.served[(runtime.name, runtime.version)]

    def generator(self, runtime: ModelRuntime) -> ContinuousBatcher:
        """The continuous batcher of a generating version (the data plane checks the kind first)."""
        generator = self.served_version(runtime).generator
        if generator is None:
            raise RuntimeError(f"{runtime.tag} has no continuous batcher: its kind does not generate text")
        return generator

    def batcher(self, runtime: ModelRuntime) -> DynamicBatcher:
        """The dynamic batcher of a version ``get`` returned (the data plane's one inference entry point)."""
        return self.served[(runtime.name, runtime.version)].batcher


def _batching_of(batcher: DynamicBatcher) -> dict:
    """The dynamic batcher's configuration, in the units of its settings (Triton shows its own per model)."""
    c = batcher.config
    return {"max_batch_size": c.max_batch_size, "max_queue_delay_ms": c.max_queue_delay_s * 1e3,
            "preferred_batch_sizes": list(c.preferred_batch_sizes), "max_queue_size": c.max_queue_size,
            "queue_timeout_ms": c.queue_timeout_s * 1e3}


def warmup_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: the batch shapes served most."""
    return tuple(sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch} | {max_batch}))
