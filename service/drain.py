"""The SIGTERM drain bound (``NNSERVE_DRAIN_TIMEOUT_S``), applied when ``service.service`` is imported.

On SIGTERM each worker's uvicorn stops accepting, lets the requests and streams it has open finish,
then runs the shutdown hooks. BentoML only passes uvicorn a bound for that wait from
``bentoml serve --timeout-graceful-shutdown`` (a hidden flag, unset by default: uvicorn then waits for
as long as any request runs, up to ``traffic.timeout``, 300 s). A setting is easier to get right in
every deployment (ConfigMap, Bento, ``make serve``) than a flag on each command line, so the worker's
uvicorn Config gets the setting as its default; an explicit flag still wins. Past the bound uvicorn
cancels what is still running (a stream ends cut short) and the worker exits.

The worker script imports this service before it builds ``uvicorn.Config`` (BentoML 1.4.39,
``_bentoml_impl/worker/service.py``), which is why replacing the class here reaches it.
``tests/test_faults.py`` checks the behaviour through a real server.
"""

from __future__ import annotations

import uvicorn


def bound_graceful_shutdown(seconds: float) -> None:
    """Make ``seconds`` uvicorn's default ``timeout_graceful_shutdown`` in this process."""
    base = uvicorn.Config
    if getattr(base, "nnserve_drain_default", None) is not None:  # already applied (module re-import)
        base = base.__mro__[1]

    class Config(base):
        nnserve_drain_default = seconds

        def __init__(self, *args, timeout_graceful_shutdown: float | None = None, **kwargs) -> None:
            if timeout_graceful_shutdown is None:
                timeout_graceful_shutdown = seconds
            super().__init__(*args, timeout_graceful_shutdown=timeout_graceful_shutdown, **kwargs)

    uvicorn.Config = Config
