"""Shared fixtures. Tests never touch the user's BentoML store or artifacts/: everything lives in a
per-session temp dir, and models are tiny configurations trained in seconds."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# Must be set before anything imports bentoml: the store location is read at import time.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="nnserve-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

TINY_KINDS = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_artifacts(session_dir: Path) -> dict[str, Path]:
    """The four kinds trained with --tiny (seconds each): {kind: artifact_dir}."""
    from models.train import main as train

    out = {}
    for kind in TINY_KINDS:
        target = session_dir / "artifacts" / kind
        if not (target / "card.json").exists():
            train([kind, "--tiny", "--out", str(target)])
        out[kind] = target
    return out


@pytest.fixture(scope="session")
def live_server(tiny_store, session_dir: Path):
    """The real ``bentoml serve service.service:NNServe`` serving the tiny_store models, started once per
    session on free ports. Yields a ``harness.server.LiveServer``: ``http_url``, ``grpc_port``
    (``grpc_url``), ``log()`` for assertion messages. Stopped (SIGTERM, then killed) at session end."""
    from harness.server import running_server

    # A generous queue timeout: the CI box is shared and busy, and a request that waits past it gets a
    # 503 (load shedding), which is not what these tests probe (tests/test_overload.py does).
    env = {"BENTOML_HOME": os.environ["BENTOML_HOME"], "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    # Serve exactly the tiny_store versions, whatever else tests register in the store meanwhile.
    env.update({f"NNSERVE_{kind.upper()}_TAG": tag for kind, tag in tiny_store.items()})
    with running_server(session_dir / "server.log", env) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_store(tiny_artifacts: dict[str, Path], session_dir: Path) -> dict[str, str]:
    """The four tiny artifacts exported (fp32, parity-checked) into this session's BentoML store:
    {kind: "name:version"}. Few latency runs: the numbers are not what tests look at."""
    from export.pipeline import Options, export_artifact

    opts = Options(bench_runs=3, report_dir=session_dir / "exported")
    return {kind: export_artifact(path, opts).tags["fp32"] for kind, path in tiny_artifacts.items()}


@pytest.fixture(scope="session")
def own_server(tiny_store: dict[str, str], session_dir: Path):
    """Start one more real server for a test: ``with own_server("name", {"NNSERVE_...": ...}) as live:``.

    It serves the tiny_store models (``env`` may override any tag) on free ports from the session's
    store; log in ``<session_dir>/<name>-server.log``."""
    from harness.server import running_server

    @contextlib.contextmanager
    def start(name: str, env: dict[str, str] | None = None, ready_path: str = "/readyz"):
        tags = {f"NNSERVE_{kind.upper()}_TAG": tag for kind, tag in tiny_store.items()}
        full_env = {"BENTOML_HOME": os.environ["BENTOML_HOME"], **tags, **(env or {})}
        with running_server(session_dir / f"{name}-server.log", full_env, ready_path) as live:
            yield live

    return start


@pytest.fixture(scope="session")
def user_artifacts(session_dir: Path) -> dict[str, Path]:
    """Networks not written in nnserve, made as docs/your-model.md shows (tests/user_models/make.py)."""
    from tests.user_models import make

    root = session_dir / "user-artifacts"
    if not root.exists():
        make.effnet(root / "effnet_digits")
        make.hf_resnet(root / "resnet_digits")
        make.word_gru(root / "word_gru")
        make.elsewhere_cnn(root / "elsewhere_cnn")
    return {p.name: p for p in sorted(root.iterdir())}


@pytest.fixture(scope="session")
def user_store(user_artifacts: dict[str, Path], session_dir: Path) -> dict[str, str]:
    """The user artifacts exported and registered (fp32), each with its own evaluation data: {name: tag}."""
    from export.pipeline import Options, export_artifact

    eval_data = {"effnet_digits": "eval.npz", "resnet_digits": "eval.npz", "word_gru": "eval.txt"}
    tags = {}
    for name, path in user_artifacts.items():
        data = path / eval_data[name] if name in eval_data else None
        opts = Options(bench_runs=3, report_dir=session_dir / "exported", eval_data=data)
        tags[name] = export_artifact(path, opts).tags["fp32"]
    return tags
