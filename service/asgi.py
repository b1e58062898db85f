"""The HTTP layer under nnserve's own routes: a request, a response, one JSON error writer and a router,
straight on ASGI.

The REST, KServe v2 and OpenAI front ends (rest.py, kserve_http.py, openai_api.py) are codecs over the data
plane: each route a method taking an ``HttpRequest`` and returning an ``HttpResponse``. They used to be
Starlette apps; measured with py-spy on the live server (docs/bench.md, "CPU per request"), Starlette's
middleware stack, router and Request/Response objects were a fifth of a small request's CPU time. What our
routes need from a framework is this file: read a bounded body, match a path, write a status, headers and bytes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import orjson

from service.errors import Failure, MethodNotAllowed, NotFound, PayloadTooLarge, failure_of

Send = Callable[[dict], Awaitable[None]]
Stream = AsyncGenerator[str | bytes, None]  # a streamed body: closed (aclose) when done or when the client leaves
Receive = Callable[[], Awaitable[dict]]
JSON = b"application/json"


class LazyHeaders(Mapping[str, str]):
    """An ASGI header list as a mapping of lower-case names, decoded on first use: most requests never
    look (a sticky traffic split reads one through the request scope)."""

    __slots__ = ("raw", "_decoded")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self._decoded: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._decoded is None:
            self._decoded = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.raw}
        return self._decoded

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class HttpRequest:
    """One request: method, path, lower-case headers (decoded on first use), path parameters, the body
    once read with ``body(limit)``."""

    __slots__ = ("scope", "receive", "params", "headers")

    def __init__(self, scope: dict, receive: Receive, params: Mapping[str, str] | None = None) -> None:
        self.scope, self.receive, self.params = scope, receive, params or {}
        self.headers = LazyHeaders(scope["headers"])

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    def header(self, name: bytes) -> str | None:
        """One header by its lower-case name (None when absent), without decoding the others: the hot path
        looks up two or three."""
        for key, value in self.scope["headers"]:
            if key == name or key.lower() == name:
                return value.decode("latin-1")
        return None

    async def body(self, limit: int, what: str = "request body") -> bytes:
        """The whole body, refused (413) as soon as it is known to pass ``limit``: from Content-Length before
        reading, else while streaming; never buffered past the limit."""
        declared = self.header(b"content-length") or ""
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the {what} has {int(declared)} bytes; the limit is {limit}")
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("the client disconnected while sending its request body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the {what} is over the {limit}-byte limit")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@dataclass(slots=True)
class HttpResponse:
    """A whole body (bytes) or a stream (an async generator of str or bytes chunks)."""

    body: bytes | Stream
    status: int = 200
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def json_response(content: object, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
                  ) -> HttpResponse:
    """orjson: several times faster than the standard library on answers like /classify's; NaN becomes null."""
    return HttpResponse(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, JSON, headers or [])


def error_response(error: BaseException | Failure, where: str = "request") -> HttpResponse:
    """The one JSON error writer: ``{"error": message}`` with the error model's status (service/errors.py),
    Retry-After when it says one, WWW-Authenticate on a 401."""
    failure = error if isinstance(error, Failure) else failure_of(error, where)
    return failure_response(failure, failure.body())


def failure_response(failure: Failure, body: object) -> HttpResponse:
    """``body`` (a protocol's rendering of ``failure``) with the failure's status and headers: Retry-After when
    it says one, WWW-Authenticate on a 401. OpenAI's error object (service/openai_api.py) goes through here."""
    headers = [(b"retry-after", str(failure.retry_after).encode())] if failure.retry_after else []
    if failure.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="nnserve"'))
    return json_response(body, failure.status, headers)


async def send_response(send: Send, response: HttpResponse, receive: Receive | None = None) -> None:
    """Send a whole response, or stream one; ``receive``: the request's, to stop a stream whose client has
    gone (uvicorn drops what is sent after a disconnect without a word, so the stream itself must stop)."""
    headers = [(b"content-type", response.content_type), *response.headers]
    if isinstance(response.body, bytes):
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        return
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    writer = asyncio.ensure_future(_write_stream(send, response.body))
    if receive is None:
        return await writer
    listener = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((writer, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (writer, listener):
            task.cancel()  # the client left: the stream's generator sees CancelledError and frees its slots
        await asyncio.gather(writer, listener, return_exceptions=True)
    if writer.done() and not writer.cancelled() and writer.exception() is not None:
        raise writer.exception()  # type: ignore[misc]


async def _write_stream(send: Send, chunks: Stream) -> None:
    try:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk.encode() if isinstance(chunk, str) else chunk,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await chunks.aclose()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
ErrorWriter = Callable[[BaseException | Failure, str], HttpResponse]


class Router:
    """Paths with ``{name}`` segments (one path segment each) -> a handler per method, tried in order.
    ``errors``: how this front end writes a failure (the front door's refusals included); ``hint``: what the
    404 of an unknown path adds (the routes there are)."""

    def __init__(self, name: str, errors: ErrorWriter = error_response, hint: str = "") -> None:
        self.name = name  # for the 404 message: "no KServe v2 route ..."
        self.errors, self.hint = errors, hint
        self.routes: list[tuple[re.Pattern, dict[str, Handler]]] = []

    def add(self, path: str, method: str, handler: Handler) -> None:
        pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
        for existing, methods in self.routes:
            if existing.pattern == pattern.pattern:
                methods[method] = handler
                return
        self.routes.append((pattern, {method: handler}))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters; NotFound, or MethodNotAllowed when only other methods match."""
        allowed = False
        for pattern, methods in self.routes:
            found = pattern.match(path)
            if found is None:
                continue
            handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
            if handler is not None:
                return handler, found.groupdict()
            allowed = True
        if allowed:
            raise MethodNotAllowed(f"Method Not Allowed: {method[:20]} is not allowed on {path[:200]}")
        raise NotFound(f"no {self.name} route {method[:20]} {path[:200]}{'; ' + self.hint if self.hint else ''}")
