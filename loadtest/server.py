"""Moved to ``harness.server`` (deploy/ uses it too and must not import loadtest); kept so old imports work."""

from harness.server import (  # noqa: F401
    REPO_ROOT,
    SERVICE,
    BackgroundThreads,
    LiveServer,
    free_port,
    running_server,
    start_process,
    start_server,
    stop_server,
    worker_pids,
)
