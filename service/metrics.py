"""Prometheus metrics of the serving path (names and labels: docs/metrics.md), exposed on BentoML's ``/metrics``.

BentoML runs every worker with ``PROMETHEUS_MULTIPROC_DIR`` set and ``/metrics`` merges all processes'
files, so every worker's metrics show up whichever worker answers ``/metrics``.
The metric objects are created on first use, in the worker: prometheus_client picks its multiprocess
value store when first imported, which must not happen in a process without that variable.

Latency buckets are explicit (50 us .. 5 s): our models answer in microseconds to milliseconds, below
the 5 ms where BentoML's default buckets start.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from types import SimpleNamespace

LATENCY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNKNOWN = ("unknown", "")  # model/version labels of a request naming no served model (bounded cardinality)


@functools.cache
def registry() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge, Histogram  # late import: see the module docstring

    model = ["model", "version"]
    request = ["endpoint", *model]
    return SimpleNamespace(
        requests=Counter("nnserve_requests", "Requests by endpoint, model and outcome "
                         "(ok, client_error, unavailable, server_error).", [*request, "outcome"]),
        http_responses=Counter("nnserve_http_responses", "HTTP responses of nnserve's routes by route "
                               "(classify, features, generate, models, docs.json, v2, v1) and status code.",
                               ["route", "code"]),
        in_flight=Gauge("nnserve_in_flight_requests", "Requests being processed.", request,
                        multiprocess_mode="livesum"),
        request_seconds=Histogram("nnserve_request_duration_seconds", "Request latency inside the service, "
                                  "from handler start to response.", request, buckets=LATENCY_BUCKETS),
        preprocess_seconds=Histogram("nnserve_preprocess_duration_seconds", "Image decode + preprocessing.",
                                     model, buckets=LATENCY_BUCKETS),
        batch_wait_seconds=Histogram("nnserve_batch_wait_duration_seconds", "Time in the dynamic batcher's "
                                     "queue: from enqueue until the request's batch starts.",
                                     model, buckets=LATENCY_BUCKETS),
        queued=Gauge("nnserve_queued_requests", "Requests waiting in the dynamic batcher's queue (sampled at "
                     "each batch).", model, multiprocess_mode="livesum"),
        inference_seconds=Histogram("nnserve_inference_duration_seconds", "One ONNX Runtime call (a whole "
                                    "batch or decode step).", [*model, "batcher"], buckets=LATENCY_BUCKETS),
        batch_size=Histogram("nnserve_batch_size", "Items per ONNX Runtime call.", [*model, "batcher"],
                             buckets=BATCH_BUCKETS),
        generated_chars=Counter("nnserve_generated_characters", "Characters sampled by /generate.", model),
        model_ready=Gauge("nnserve_model_ready", "1 when the model is loaded and warmed up in every live worker, "
                          "else 0 (loading, or failed: the reason is in GET /models and /readyz).", ["model"],
                          multiprocess_mode="livemin"),
        active_streams=Gauge("nnserve_generation_streams_active", "Generation requests being decoded "
                             "(streamed or not).", model, multiprocess_mode="livesum"),
        generation_slots=Gauge("nnserve_generation_slots", "Requests of the continuous batcher by state: "
                               "active (holding a batch slot) or waiting (for the next step or a free slot).",
                               [*model, "state"], multiprocess_mode="livesum"),
    )


def set_generation_slots(model, active: int, waiting: int) -> None:
    """The continuous batcher's occupancy (its on_occupancy callback): every front end's generations."""
    m = registry()
    m.generation_slots.labels(model.name, model.version, "active").set(active)
    m.generation_slots.labels(model.name, model.version, "waiting").set(waiting)


def observe_batch(model, batcher: str, size: int, seconds: float, queued: int | None = None) -> None:
    """One ONNX Runtime call of ``size`` items. batcher: dynamic (whole requests) or continuous (decode
    steps of /generate); ``queued``: requests still waiting when it started."""
    m = registry()
    m.inference_seconds.labels(model.name, model.version, batcher).observe(seconds)
    m.batch_size.labels(model.name, model.version, batcher).observe(size)
    if queued is not None:
        m.queued.labels(model.name, model.version).set(queued)


def set_model_ready(name: str, ready: bool) -> None:
    registry().model_ready.labels(name).set(1 if ready else 0)


def count_response(route: str, status: int) -> None:
    """One HTTP response of our routes, by status code (the front door counts them all, refusals included)."""
    _response_counter(route, status).inc()


# The labelled children, looked up once per label set: prometheus_client's labels() takes a lock and
# formats its arguments on every call, a few microseconds per metric and request on the hot path. The
# label sets are bounded (routes x status codes; endpoints x served model versions).
@functools.cache
def _response_counter(route: str, status: int):
    return registry().http_responses.labels(route, str(status))


@functools.cache
def _request_children(endpoint: str, model: str, version: str) -> SimpleNamespace:
    m, labels = registry(), (endpoint, model, version)
    return SimpleNamespace(in_flight=m.in_flight.labels(*labels), seconds=m.request_seconds.labels(*labels),
                           preprocess=m.preprocess_seconds.labels(model, version),
                           batch_wait=m.batch_wait_seconds.labels(model, version),
                           outcomes={o: m.requests.labels(*labels, o)
                                     for o in ("ok", "client_error", "unavailable", "server_error")})


def outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 503:
        return "unavailable"
    return "client_error" if status < 500 else "server_error"


class RequestMetrics:
    """One request's metrics: call ``begin(model)`` once the model is known, ``finish(status)`` always."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self.labels: tuple[str, str] | None = None
        self.children: SimpleNamespace | None = None  # the labelled metrics, once begun
        self.timings: dict[str, float] = {}  # stage -> seconds, for the response's timings_ms

    def begin(self, model) -> None:
        self.labels = (model.name, model.version)
        self.children = _request_children(self.endpoint, model.name, model.version)
        self.children.in_flight.inc()

    def observe(self, stage: str, seconds: float) -> None:
        """stage: preprocess or batch_wait (histograms), or inference (timed where the model runs)."""
        self.timings[stage] = seconds
        if self.children is None:  # no model resolved yet: its histograms have no labels to go under
            return
        if stage == "batch_wait":
            self.children.batch_wait.observe(seconds)
        elif stage == "preprocess":
            self.children.preprocess.observe(seconds)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Observe the time spent in the ``with`` block as ``stage`` (if it completes)."""
        start = time.perf_counter()
        yield
        self.observe(stage, time.perf_counter() - start)

    def timings_ms(self) -> dict[str, float]:
        return {stage: round(seconds * 1e3, 3) for stage, seconds in self.timings.items()}

    def finish(self, status: int) -> float:
        """Count the request by outcome; returns its duration in seconds (also timings["total"])."""
        seconds = self.timings["total"] = time.perf_counter() - self.start
        if self.children is None:
            registry().requests.labels(self.endpoint, *UNKNOWN, outcome(status)).inc()
            return seconds
        self.children.outcomes[outcome(status)].inc()
        self.children.in_flight.dec()
        self.children.seconds.observe(seconds)
        return seconds


class StreamMetrics:
    """One generation: counted as active from ``start()`` to ``stop()``; counts the characters it yields."""

    def __init__(self, model) -> None:
        self.labels = (model.name, model.version)
        self.active = False

    def start(self) -> StreamMetrics:
        registry().active_streams.labels(*self.labels).inc()
        self.active = True
        return self

    def chars(self, n: int) -> None:
        registry().generated_chars.labels(*self.labels).inc(n)

    def stop(self) -> None:
        if self.active:
            registry().active_streams.labels(*self.labels).dec()
            self.active = False
