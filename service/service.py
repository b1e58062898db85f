"""nnserve's BentoML service: ``bentoml serve service.service:NNServe``.

BentoML runs the HTTP server and its worker processes, the model store, health, metrics and the
OpenAPI page; the hot path is ours. Each worker process (NNSERVE_WORKERS) serves every model itself:

    HTTP :3000 ─► front door (front.py): tokens (auth.py), /livez, /readyz, the page at /playground
              │   (playground.py: static files that call the routes below from a browser); the rest to BentoML's
              ─► REST codec (rest.py)            ─┐   DataPlane (dataplane.py): readiness, model resolution,
                  OpenAI codec (openai_api.py)    ─┤   admission, inference, generation start; over the
                  KServe v2 REST codec            ─┼─► Repository (repository.py): per model an ONNX Runtime
                  (kserve_http.py)                 │   session, a dynamic batcher thread (batching.py) and,
    gRPC :8001 ─► KServe v2 gRPC codec            ─┘   for text models, a generation thread (generation.py)
                  (kserve_grpc.py)

Every client mistake answers 4xx with ``{"error": "..."}`` naming it (docs/service.md); on /v1, OpenAI's error
object (docs/openai.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from typing import Any

import bentoml
from bentoml._internal.context import server_context

from service import auth, bentoml_fixes, drain, memory, metrics, playground
from service.dataplane import DataPlane
from service.front import FrontDoor
from service.kserve_grpc import start_grpc_server
from service.kserve_http import KServeHttp
from service.lifecycle import StateDir, default_state_dir
from service.openai_api import OpenAIApi
from service.repository import Repository
from service.rest import RestApi
from service.settings import Settings

bentoml_fixes.apply()  # before BentoML builds its ASGI apps (see the module)
memory.keep_large_blocks_separate()  # large request bodies must not stay in the worker (service/memory.py)
SETTINGS = Settings.from_env()  # validated here: a bad NNSERVE_* value stops the server with its name
# Before the worker builds its uvicorn Config.
drain.configure_uvicorn(SETTINGS.drain_timeout_s, SETTINGS.header_timeout_s)
log = logging.getLogger("nnserve.service")
# BentoML's server logging config sets the root logger to WARNING; our INFO lines (settings, chosen
# execution provider, warm-up times, ...) belong in the server log.
logging.getLogger("nnserve").setLevel(SETTINGS.log_level.upper())
# The tokens, read (or generated) in the serving process first, then in each worker: an unusable token file
# stops the server here, with the variable and the file named.
LOCK = auth.Lock.from_settings(SETTINGS)


# This worker's data plane, once its service object exists (BentoML creates it in the lifespan start-up). A
# plain holder rather than bentoml.get_current_service() on each request: that lookup cost 2% of a request.
PLANE: list[DataPlane] = []


def current_plane() -> DataPlane | None:
    return PLANE[0] if PLANE else None


def plane() -> DataPlane:
    """The codecs' data plane: the front door sends them requests only once it exists."""
    return PLANE[0]


def bentoml_spec() -> dict:
    return SERVICE.openapi_spec.asdict()


# The front door (below) sends our routes' requests straight to these codecs, without BentoML's middleware.
rest_api = RestApi(plane, bentoml_spec)
kserve_api = KServeHttp(plane, max_request_bytes=SETTINGS.kserve_max_request_bytes)
openai_api = OpenAIApi(plane)
playground_app = playground.create_app(SETTINGS) if SETTINGS.playground else None


@bentoml.service(
    workers=SETTINGS.workers,
    # BentoML's own request histograms: same buckets as ours (its default starts at 5 ms).
    metrics={"enabled": True, "duration": {"buckets": list(metrics.LATENCY_BUCKETS)}},
    # BentoML's own routes only: /generate and /v2 go through the front door (front.py) without BentoML's
    # timeout middleware, so a stream (up to 10,000 characters) is bounded by its length (docs/generation.md).
    traffic={"timeout": 300},
    # One INFO line per request costs ~20% of the throughput of a small request: off unless asked for.
    logging={"access": {"enabled": SETTINGS.access_log}},
)
class NNServe:
    """Image classification, FC7 features and text generation over REST; KServe v2 over REST and gRPC."""

    def __init__(self) -> None:
        log.info("nnserve settings:\n%s", SETTINGS.describe())
        state = StateDir(SETTINGS.state_dir or default_state_dir(), SETTINGS)
        worker = server_context.worker_index or 1
        log.info("worker %s serves the live state in %s", worker, state.path)
        self.repository = Repository(SETTINGS, state, worker)
        self.repository.start_loading()  # in a thread; start() waits for it
        self.plane = DataPlane(self.repository)
        PLANE[:] = [self.plane]
        self.grpc_server = None

    @bentoml.on_startup
    async def start(self) -> None:
        # The worker accepts connections only once this returns: a worker restarted after a crash must not
        # take requests (and answer "still loading") while the other workers are ready to serve them. A
        # model that fails to load is marked failed and the worker serves the others.
        await asyncio.to_thread(self.repository.loaded.wait)
        self.grpc_server = await start_grpc_server(self.plane, SETTINGS.grpc_host or http_host(),
                                                   SETTINGS.grpc_port, SETTINGS.kserve_max_request_bytes, LOCK)
        self.plane.grpc_listening = True

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        await self.repository.close_generators()
        self.repository.close()


# @bentoml.service made NNServe a bentoml Service instance; its stubs keep the decorated class's type.
SERVICE: Any = NNServe


def http_host() -> str:
    """The address BentoML's HTTP socket is bound to: circus hands each worker the listening socket as
    ``--fd N`` (bentoml serve --host decides it). "0.0.0.0" if it cannot be found."""
    if "--fd" in sys.argv:
        # A duplicate of the fd (family read from it): closing it leaves the listening socket open.
        with socket.socket(fileno=os.dup(int(sys.argv[sys.argv.index("--fd") + 1]))) as sock:
            return sock.getsockname()[0]
    return "0.0.0.0"


# BentoML builds each worker's ASGI app with Service.to_asgi; ours wraps it in the front door. Service is an
# attrs class with slots, so the method is replaced on the class (only NNServe is served in this process).
_bentoml_to_asgi = type(SERVICE).to_asgi


def _to_asgi(service, is_main: bool = True):
    app = _bentoml_to_asgi(service, is_main)
    if service is not NNServe:
        return app
    return FrontDoor(app, rest_api.router(), kserve_api.router(), current_plane, LOCK, playground_app,
                     openai_api.router())


type(SERVICE).to_asgi = _to_asgi
