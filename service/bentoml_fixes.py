"""A fix for a BentoML bug nnserve hits, applied when ``service.service`` is imported (every server process).

BentoML 1.4.39's ``TimeoutMiddleware`` (the ``traffic.timeout`` setting) schedules a timer per request
with ``loop.call_later(timeout, ...)`` and never cancels it. The pending timer keeps the request's
future and context (its OpenTelemetry span, ...) alive for the whole timeout after the response: about
5 KB per request, so under load every server process grows by rate x timeout x 5 KB (measured:
+70 MiB per 15,000 ``/livez`` calls) before the first timers expire. 1.4.40 has the same code.

Hand-written because no BentoML release has a fix: the method below is BentoML's own, plus cancelling the
timer once the request is over. Remove it when BentoML cancels the timer itself
(``tests/test_service_runtime.py`` checks the patched behaviour).
"""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http import traffic


async def _timeout_middleware_call(self: traffic.TimeoutMiddleware, scope, receive, send) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await waiter
    except TimeoutError:
        if fut.cancel():
            resp = traffic.JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504)
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()  # the fix: release the request's future and context now, not after the timeout


def apply() -> None:
    traffic.TimeoutMiddleware.__call__ = _timeout_middleware_call
