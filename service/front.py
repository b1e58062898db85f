"""The outermost ASGI app of every worker: the hot paths go straight to our apps, the rest to BentoML's.

BentoML wraps every route it serves in its middleware stack: OpenTelemetry spans, its own request
metrics, a timeout task per request, a context middleware. For a 0.05 ms model that stack costs more
than the model (measured when this front door was written; docs/bench.md does not hold that figure,
its limit row shows what the bare HTTP stack costs), and nnserve keeps its own complete metrics
(``nnserve_*``, docs/metrics.md). So this front door first checks the request's token (service/auth.py:
the management API always needs one, the rest only with ``NNSERVE_INFERENCE_TOKEN_FILE``; health and
``/metrics`` never), then dispatches:

- ``/classify``, ``/features``, ``/generate``, ``/models`` -> the REST app; ``/v2...`` -> the KServe app,
  behind an admission limit: past ``NNSERVE_MAX_CONCURRENT_REQUESTS`` requests in this worker, a request
  is answered 503 + Retry-After at once, before its body is parsed. The worker's event loop is the real
  queue under overload (sockets wait there before any batcher sees them); bounding it keeps the accepted
  requests fast and the rejections cheap.
- ``/v1/...`` -> OpenAI's API over the text models (service/openai_api.py), behind the same limit; its
  refusals are OpenAI's error object.
- ``/livez`` and ``/readyz`` -> answered here, never queued behind the limit: ``/readyz`` says why it is
  not ready (models loading or failed, with reasons; gRPC not listening).
- ``/playground...`` -> the playground's files (service/playground.py), when ``NNSERVE_PLAYGROUND`` is on.
- everything else (``/metrics``, ``/``, ``/docs.json``, the OpenAPI assets, lifespan) -> BentoML's app.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from service import metrics
from service.auth import Lock
from service.openai_api import error_object
from service.playground import is_playground
from service.repository import Repository, request_scope

ASGIApp = Callable  # (scope, receive, send) -> awaitable
REST_PATHS = frozenset({"/classify", "/features", "/generate", "/models"})
UNLIMITED = frozenset({"/models"})  # cheap reads: never refused


class FrontDoor:
    def __init__(self, bentoml_app: ASGIApp, rest_app: ASGIApp, kserve_app: ASGIApp,
                 get_repository: Callable[[], Repository], readiness: Callable[[], str | None],
                 max_concurrent_requests: int, lock: Lock | None = None, playground_app: ASGIApp | None = None,
                 openai_app: ASGIApp | None = None) -> None:
        self.bentoml_app = bentoml_app
        self.rest_app = rest_app
        self.kserve_app = kserve_app
        self.get_repository = get_repository
        self.readiness = readiness  # None when ready, else why not
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight = 0
        self.lock = lock or Lock()  # no token: management off, the rest open
        self.playground_app = playground_app  # None: NNSERVE_PLAYGROUND=off, BentoML answers 404
        self.openai_app = openai_app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.bentoml_app(scope, receive, send)
        path = scope["path"]
        denied = self.lock.check_rest(path, scope["headers"])
        if denied is not None:
            if scope["type"] == "websocket":  # no websocket route today; closed before accept = 403
                return await send({"type": "websocket.close", "code": 1008})
            if path in REST_PATHS or path == "/v2" or path.startswith("/v2/") or is_openai(path):
                metrics.count_response(route_of(path), denied.status)
            return await respond(send, denied.status, error_body(path, denied.status, denied.message),
                                 headers=[(b"www-authenticate", b'Bearer realm="nnserve"')] if denied.status == 401
                                 else [])
        if scope["type"] != "http":
            return await self.bentoml_app(scope, receive, send)
        if path in REST_PATHS:
            app = self.rest_app
        elif path == "/v2" or path.startswith("/v2/"):
            app = self.kserve_app
        elif self.openai_app is not None and is_openai(path):
            app = self.openai_app
        elif path in ("/livez", "/readyz"):
            if scope["method"] not in ("GET", "HEAD"):
                return await respond(send, 405, {"error": f"{path} takes GET or HEAD, not {scope['method'][:20]}"})
            return await (respond(send, 200, {"alive": True}) if path == "/livez" else self.ready(send))
        elif self.playground_app is not None and is_playground(path):
            return await self.playground_app(scope, receive, send)
        else:
            return await self.bentoml_app(scope, receive, send)
        route = route_of(path)
        # Cheap reads, and the management API: an operator must be able to act on an overloaded server.
        if path in UNLIMITED or scope["method"] != "POST" or path.startswith("/v2/repository/"):
            return await counted(app, route, scope, receive, send)
        if self.in_flight >= self.max_concurrent_requests:
            metrics.count_response(route, 503)
            return await respond(send, 503, error_body(path, 503, f"server busy: {self.in_flight} requests in "
                                 "progress in this worker (NNSERVE_MAX_CONCURRENT_REQUESTS); retry shortly"),
                                 retry_after=1)
        self.in_flight += 1
        try:
            await counted(app, route, scope, receive, send)
        finally:
            self.in_flight -= 1

    async def ready(self, send: Callable) -> None:
        reason = self.readiness()
        models = {m["name"]: {k: m[k] for k in ("state", "version", "reason") if m.get(k) is not None}
                  for m in self.get_repository().describe()}
        body = {"ready": reason is None, "models": models} | ({"reason": reason} if reason else {})
        await respond(send, 200 if reason is None else 503, body)


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def route_of(path: str) -> str:
    """The route label of nnserve_http_responses_total."""
    return "v2" if path.startswith("/v2") else "v1" if is_openai(path) else path[1:]


def error_body(path: str, status: int, message: str) -> dict:
    """An error answered here: OpenAI's error object on /v1 (its clients read that), else ``{"error": ...}``."""
    return error_object(status, message) if is_openai(path) else {"error": message}


async def counted(app: ASGIApp, route: str, scope: dict, receive: Callable, send: Callable) -> None:
    """Run ``app`` in a request scope (the model versions it uses stay loaded until its answer, streams
    included, is over) and count its response by status (nnserve_http_responses_total): BentoML's HTTP
    metrics no longer see these routes."""
    status = None  # no response started yet

    async def send_and_note(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        with request_scope({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}):
            await app(scope, receive, send_and_note)
    except asyncio.CancelledError:
        # uvicorn cancels what still runs once the drain bound (NNSERVE_DRAIN_TIMEOUT_S) has passed after
        # SIGTERM. A request whose answer has not started gets a 503 it can retry on another replica
        # instead of uvicorn's plain 500; the task ends here either way. A started answer is cut.
        if status is not None:
            raise
        status = 503
        await respond(send, 503, error_body(scope["path"], 503, "server shutting down; retry on another replica"),
                      retry_after=1)
    finally:
        metrics.count_response(route, 500 if status is None else status)


async def respond(send: Callable, status: int, body: dict, retry_after: int | None = None,
                  headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON response. The request body is left unread: the server discards it."""
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
