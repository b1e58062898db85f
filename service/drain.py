"""The uvicorn settings of every worker, applied when ``service.service`` is imported: the SIGTERM drain bound
(``NNSERVE_DRAIN_TIMEOUT_S``) and the header timeout (``NNSERVE_HEADER_TIMEOUT_S``).

Drain: on SIGTERM each worker's uvicorn stops accepting, lets the requests and streams it has open finish,
then runs the shutdown hooks. BentoML only passes uvicorn a bound for that wait from
``bentoml serve --timeout-graceful-shutdown`` (a hidden flag, unset by default: uvicorn then waits for
as long as any request runs, up to ``traffic.timeout``, 300 s). A setting is easier to get right in
every deployment (ConfigMap, Bento, ``make serve``) than a flag on each command line, so the worker's
uvicorn Config gets the setting as its default; an explicit flag still wins. Past the bound uvicorn
cancels what is still running (a stream ends cut short) and the worker exits.

Header timeout: uvicorn has none. A client that opens a connection and trickles the request line and
headers a byte at a time (or sends nothing) holds a file descriptor and a parser for ever; a few thousand
of them exhaust a worker. ``HeaderTimeoutProtocol`` (uvicorn's httptools protocol, which BentoML's worker
uses, plus a timer) answers 408 and closes a connection whose request line and headers are not complete
within the bound from its opening, or from the first byte of its next request on a kept-alive connection
(nginx's ``client_header_timeout``). Idle time between requests stays governed by uvicorn's keep-alive
timeout (BentoML's ``--timeout-keep-alive``, 5 s); request bodies and responses are not bounded by it.

The worker script imports this service before it builds ``uvicorn.Config`` (BentoML 1.4.39,
``_bentoml_impl/worker/service.py``), which is why replacing the class here reaches it.
``tests/test_faults.py`` checks the drain through a real server, ``tests/test_header_timeout.py`` the
header timeout.
"""

from __future__ import annotations

import json

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s = 60.0  # set by configure_uvicorn
    header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:  # the first byte of a request: the next one on a kept-alive connection
        super().on_message_begin()
        if self.header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's headers lag while the previous response is still being sent: no 408
            # written into that response; the connection closes once it is done.
            self.cycle.keep_alive = False
            return
        body = json.dumps({"error": f"request line and headers not complete within {self.header_timeout_s:g} s "
                                    "(NNSERVE_HEADER_TIMEOUT_S)"}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def configure_uvicorn(drain_timeout_s: float, header_timeout_s: float) -> None:
    """Make ``drain_timeout_s`` uvicorn's default ``timeout_graceful_shutdown`` and ``HeaderTimeoutProtocol``
    with ``header_timeout_s`` its default HTTP protocol in this process."""
    HeaderTimeoutProtocol.header_timeout_s = header_timeout_s
    base: type = uvicorn.Config
    if getattr(base, "nnserve_defaults", False):  # already applied (module re-import)
        base = base.__mro__[1]

    class Config(base):
        nnserve_defaults = True

        def __init__(self, *args, timeout_graceful_shutdown: float | None = None, http="auto", **kwargs) -> None:
            if timeout_graceful_shutdown is None:
                timeout_graceful_shutdown = drain_timeout_s
            if http == "auto":  # what BentoML's worker asks for (httptools is installed: pyproject.toml)
                http = HeaderTimeoutProtocol
            super().__init__(*args, timeout_graceful_shutdown=timeout_graceful_shutdown, http=http, **kwargs)

    uvicorn.Config = Config  # type: ignore[misc]  # the patch: uvicorn.run builds this Config
