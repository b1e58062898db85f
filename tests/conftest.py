"""Shared fixtures. Tests never touch the user's BentoML store or artifacts/: everything lives in a
per-session temp dir, and models are tiny configurations trained in seconds."""

from __future__ import annotations

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
