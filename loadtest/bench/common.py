"""Small helpers every part of the bench uses: logging, the machine's description, atomic writes."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from models.artifact import atomic_write as write_atomic  # noqa: F401 (the bench's parts import it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)




def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:,.{digits}f}"  # None/NaN: nothing measured


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def machine() -> dict[str, str]:
    import importlib.metadata as metadata

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    memory = ""
    if Path("/proc/meminfo").exists():
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 2**20:.1f} GiB memory"

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    packages = ("onnxruntime", "torch", "bentoml", "locust", "litserve", "fastapi", "uvicorn", "uvloop", "httptools")
    return {"cpu": f"{cpu or 'unknown CPU'}, {os.cpu_count()} logical cores{memory}", "os": platform.platform(),
            "versions": f"python {platform.python_version()}, "
                        + ", ".join(f"{p} {version(p)}" for p in packages)}


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())
