"""Peers whose pins conflict with the bench extra run from venvs of their own (.venv-mlserver, .venv-triton),
created on first use and rebuilt when their pins change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def own_venv(venv: Path, pins: tuple[str, ...] | list[str], ready: bool) -> str | None:
    """Make ``venv`` hold exactly ``pins`` (its bench-pins.txt says which it has; ``ready``: the caller's own
    check that the peer's program is there). None when done, else why it could not be installed."""
    marker = venv / "bench-pins.txt"
    if ready and marker.exists() and marker.read_text() == " ".join(pins):
        return None
    try:
        if not (venv / "bin" / "pip").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *pins], check=True,
                       capture_output=True, text=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        tail = getattr(e, "stderr", "") or ""
        return f"pip install {' '.join(pins)} into {venv} failed: {e} {tail[-500:]}"
    marker.write_text(" ".join(pins))
    return None
