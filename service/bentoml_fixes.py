"""Fixes for BentoML bugs nnserve hits, applied when ``service.service`` is imported (every server process).
Hand-written because no BentoML release fixes them; remove each when BentoML does.

1. Per-request timers kept alive. BentoML 1.4.39's ``TimeoutMiddleware`` (the ``traffic.timeout`` setting)
schedules a timer per request with ``loop.call_later(timeout, ...)`` and never cancels it. The pending timer
keeps the request's future and context (its OpenTelemetry span, ...) alive for the whole timeout after the
response: about 5 KB per request, so under load every server process grows by rate x timeout x 5 KB (measured:
+70 MiB per 15,000 ``/livez`` calls) before the first timers expire. 1.4.40 has the same code. The method
below is BentoML's own, plus cancelling the timer once the request is over
(``tests/test_service_runtime.py`` checks the patched behaviour).

2. Servers wiping each other's metrics. ``bentoml serve`` keeps the Prometheus multiprocess files in
``$BENTOML_HOME/prometheus_multiproc_dir`` and empties that directory when it starts, so a second server
on the same home (replicas on one host, a canary beside the live server, a test server) deletes the
files of the first: its /metrics then shows the newcomer's counters, or resets. Each server gets its own
directory instead, ``$BENTOML_HOME/nnserve-metrics/<host>-<pid>``; directories of servers that are gone
are removed at start (``tests/test_service.py`` starts a second server on the session's home).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

from bentoml._internal.configuration.containers import BentoMLContainer
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _own_prometheus_dir() -> None:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # a worker: its server chose the directory already
        return
    root = Path(BentoMLContainer.bentoml_home.get()) / "nnserve-metrics"
    host = socket.gethostname()
    for old in root.glob(f"{host}-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    # BentoML creates (or empties) it when the server starts.
    BentoMLContainer.prometheus_multiproc_dir.set(str(root / f"{host}-{os.getpid()}"))


def apply() -> None:
    traffic.TimeoutMiddleware.__call__ = _timeout_middleware_call  # type: ignore[method-assign]  # the fix itself
    _own_prometheus_dir()
