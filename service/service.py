"""nnserve's BentoML service: ``bentoml serve service.service:NNServe``.

BentoML runs the HTTP server and its worker processes, the model store, health, metrics and the
OpenAPI page; the hot path is ours. Each worker process (NNSERVE_WORKERS) serves every model itself:

    HTTP :3000 ─► REST (service/rest.py)           ─┐
                  KServe v2 REST (kserve_http.py)  ─┼─► Repository (repository.py): per model an ONNX Runtime
    gRPC :8001 ─► KServe v2 gRPC (kserve_grpc.py)  ─┘   session, a dynamic batcher thread (batching.py) and,
                                                        for text models, a generation thread (generation.py)

Every client mistake answers 4xx with ``{"error": "..."}`` naming it (docs/service.md).
"""

from __future__ import annotations

import logging

import bentoml

from service import bentoml_fixes, drain, metrics, rest
from service.kserve_grpc import start_grpc_server
from service.kserve_http import create_app as create_kserve_app
from service.repository import Repository
from service.settings import Settings

bentoml_fixes.apply()  # before BentoML builds its ASGI apps (see the module)
SETTINGS = Settings.from_env()  # validated here: a bad NNSERVE_* value stops the server with its name
drain.bound_graceful_shutdown(SETTINGS.drain_timeout_s)  # before the worker builds its uvicorn Config
log = logging.getLogger("nnserve.service")
# BentoML's server logging config sets the root logger to WARNING; our INFO lines (settings, chosen
# execution provider, warm-up times, ...) belong in the server log.
logging.getLogger("nnserve").setLevel(SETTINGS.log_level.upper())


def current_repository() -> Repository:
    return bentoml.get_current_service().repository


def bentoml_spec() -> dict:
    return NNServe.openapi_spec.asdict()


# Mounted at "/" (a Mount at /v2 would redirect the bare GET /v2); BentoML's own routes (/livez, /readyz,
# /metrics) still win: mounted apps only claim the paths they have routes for.
rest_app = rest.create_app(current_repository, bentoml_spec)
kserve_app = create_kserve_app(current_repository, prefix="/v2", max_request_bytes=SETTINGS.kserve_max_request_bytes)


@bentoml.service(
    workers=SETTINGS.workers,
    # BentoML's own request histograms: same buckets as ours (its default starts at 5 ms).
    metrics={"enabled": True, "duration": {"buckets": list(metrics.LATENCY_BUCKETS)}},
    traffic={"timeout": 300},  # a 2000-character generation on a busy CPU takes a while
    # One INFO line per request costs ~20% of the throughput of a small request: off unless asked for.
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(rest_app, path="/")
@bentoml.asgi_app(kserve_app, path="/")
class NNServe:
    """Image classification, FC7 features and text generation over REST; KServe v2 over REST and gRPC."""

    def __init__(self) -> None:
        log.info("nnserve settings:\n%s", SETTINGS.describe())
        self.repository = Repository(SETTINGS)
        self.repository.start_loading()  # in a thread: /livez answers while models load and warm up
        self.grpc_server = None

    @bentoml.on_startup
    async def start(self) -> None:
        self.grpc_server = await start_grpc_server(self.repository, SETTINGS.grpc_port,
                                                   SETTINGS.kserve_max_request_bytes)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        for generator in self.repository.generators.values():
            await generator.close()
        self.repository.close()

    async def __is_ready__(self) -> bool:
        """/readyz: every model loaded and warmed up, gRPC listening."""
        return self.grpc_server is not None and self.repository.all_ready()
