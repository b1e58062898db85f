"""The outermost ASGI app of every worker: nnserve's routes go straight to their codecs, the rest to BentoML.

BentoML wraps every route it serves in its middleware stack: OpenTelemetry spans, its own request
metrics, a timeout task per request, a context middleware. For a 0.05 ms model that stack costs more
than the model, and nnserve keeps its own complete metrics (``nnserve_*``, docs/metrics.md). So this
front door first checks the request's token (service/auth.py: the management API always needs one, the
rest only with ``NNSERVE_INFERENCE_TOKEN_FILE``; health and ``/metrics`` never), then dispatches:

- ``/classify``, ``/features``, ``/generate``, ``/models``, ``/docs.json`` -> the REST codec (rest.py);
  ``/v2...`` -> the KServe v2 codec (kserve_http.py); ``/v1...`` -> OpenAI's API over the text models
  (openai_api.py): each a Router of short methods (service/asgi.py) with its own error writer (OpenAI's
  error object on /v1, the front door's refusals included).
  An inference request (a POST but the management API's) first takes an admission slot from the data
  plane (service/dataplane.py; gRPC takes the same slots): past ``NNSERVE_MAX_CONCURRENT_REQUESTS`` in
  this worker it is answered 503 + Retry-After at once, before its body is read. The worker's event loop
  is the real queue under overload (sockets wait there before any batcher sees them); bounding it keeps
  the accepted requests fast and the rejections cheap.
- ``/livez`` and ``/readyz`` -> answered here, never queued behind the limit: ``/readyz`` renders the data
  plane's readiness (the same answer as ``/v2/health/ready`` and gRPC ``ServerReady``).
- ``/playground...`` -> the playground's files (service/playground.py), when ``NNSERVE_PLAYGROUND`` is on.
- everything else (``/metrics``, ``/``, the OpenAPI assets, lifespan) -> BentoML's app.

Every answer of our routes is counted by status (``nnserve_http_responses_total``), refusals included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service import metrics
from service.asgi import ErrorWriter, HttpRequest, HttpResponse, Router, error_response, json_response, send_response
from service.auth import Lock
from service.dataplane import STARTING, DataPlane
from service.errors import ClientError, Failure, MethodNotAllowed, Unavailable
from service.playground import is_playground
from service.repository import request_scope

ASGIApp = Callable  # (scope, receive, send) -> awaitable
REST_PATHS = frozenset({"/classify", "/features", "/generate", "/models", "/docs.json"})
UNLIMITED = frozenset({"/models", "/docs.json"})  # cheap reads: never refused
SHUTTING_DOWN = Unavailable("server shutting down; retry on another replica", retry_after=1)


class FrontDoor:
    def __init__(self, bentoml_app: ASGIApp, rest: Router | None, v2: Router | None,
                 plane: Callable[[], DataPlane | None], lock: Lock | None = None,
                 playground_app: ASGIApp | None = None, openai: Router | None = None) -> None:
        self.bentoml_app, self.rest, self.v2, self.openai = bentoml_app, rest, v2, openai
        self.plane = plane  # None until the worker's service object exists (its lifespan start-up)
        self.lock = lock or Lock()  # no token: management off, the rest open
        self.playground_app = playground_app  # None: NNSERVE_PLAYGROUND=off, BentoML answers 404

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.bentoml_app(scope, receive, send)
        path = scope["path"]
        route = ("v2" if path == "/v2" or path.startswith("/v2/") else path[1:] if path in REST_PATHS
                 else "v1" if self.openai is not None and (path == "/v1" or path.startswith("/v1/")) else None)
        denied = self.lock.check_rest(path, scope["headers"])
        if denied is not None:
            if scope["type"] == "websocket":  # no websocket route today; closed before accept = 403
                return await send({"type": "websocket.close", "code": 1008})
            refusal = Failure(denied.status, "", denied.message)
            return await self.answer(send, route, self.errors(route)(refusal, path))
        if scope["type"] != "http":
            return await self.bentoml_app(scope, receive, send)
        if route is not None:
            return await self.dispatch(scope, receive, send, route)
        if path in ("/livez", "/readyz"):
            if scope["method"] not in ("GET", "HEAD"):
                return await send_response(send, error_response(MethodNotAllowed(
                    f"{path} takes GET or HEAD, not {scope['method'][:20]}")))
            return await send_response(send, json_response({"alive": True}) if path == "/livez" else self.ready())
        if self.playground_app is not None and is_playground(path):
            return await self.playground_app(scope, receive, send)
        return await self.bentoml_app(scope, receive, send)

    def ready(self) -> HttpResponse:
        plane = self.plane()
        readiness = plane.readiness() if plane is not None else STARTING
        return json_response(readiness.body(), 200 if readiness.ready else 503)

    async def dispatch(self, scope: dict, receive: Callable, send: Callable, route: str) -> None:
        """Match the route, take an admission slot for inference, run the handler in a request scope (the
        model versions it uses stay loaded until its answer, streams included, is over), send its answer."""
        plane, method, path = self.plane(), scope["method"], scope["path"]
        request = HttpRequest(scope, receive)
        limited = method == "POST" and path not in UNLIMITED and not path.startswith("/v2/repository/")
        try:
            handler, request.params = self.router(route).match(method, path)
            if plane is None:
                raise Unavailable("the service is starting", retry_after=1)
            if limited:
                plane.admit()
        except ClientError as e:
            return await self.answer(send, route, self.errors(route)(e, route))
        try:
            with request_scope(request.headers):
                await self.run(handler, request, route, send)
        finally:
            if limited:
                plane.release()

    async def run(self, handler: Callable, request: HttpRequest, route: str, send: Callable) -> None:
        status = None  # no answer started yet

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                response = await handler(request)
            except Exception as e:
                response = self.errors(route)(e, route)
            await send_response(send_and_note, response, request.receive)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs once the drain bound (NNSERVE_DRAIN_TIMEOUT_S) has passed after
            # SIGTERM. A request whose answer has not started gets a 503 it can retry on another replica
            # instead of uvicorn's plain 500; the task ends here either way. A started answer is cut.
            if status is not None:
                raise
            status = 503
            await send_response(send, self.errors(route)(SHUTTING_DOWN, route))
        finally:
            metrics.count_response(route, 500 if status is None else status)

    def router(self, route: str) -> Router:
        router = self.v2 if route == "v2" else self.openai if route == "v1" else self.rest
        assert router is not None, route  # a route is only matched when its codec exists
        return router

    def errors(self, route: str | None) -> ErrorWriter:
        """How the front end of ``route`` writes a failure: OpenAI's error object on /v1, else ``{"error"}``."""
        return self.openai.errors if route == "v1" and self.openai is not None else error_response

    async def answer(self, send: Callable, route: str | None, response: HttpResponse) -> None:
        """A refusal of the front door itself, counted under its route."""
        if route is not None:
            metrics.count_response(route, response.status)
        await send_response(send, response)
