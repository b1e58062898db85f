"""make gpu-check (loadtest/gpu_check.py): refuses at once on a host without a GPU, and its CPU-side parts
(the load generator, the report) work against the real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_refuses_at_once_without_a_gpu_and_writes_nothing(tmp_path):
    if gpu_check.no_gpu_reason() is None:
        pytest.skip("this host has an NVIDIA GPU: make gpu-check would run")
    before = gpu_check.DOC.read_text() if gpu_check.DOC.exists() else None
    done = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no NVIDIA GPU: nvidia-smi is not on PATH" in done.stderr
    assert "nothing was installed or written" in done.stderr
    assert (gpu_check.DOC.read_text() if gpu_check.DOC.exists() else None) == before


def test_the_gpu_extra_is_read_from_pyproject():
    requirements = gpu_check.gpu_requirements()
    assert any(r.startswith("onnxruntime-gpu==") for r in requirements)
    assert any(r.startswith("tensorrt") for r in requirements)


def test_report_is_rewritten_after_each_step_and_says_when_incomplete(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DOC", tmp_path / "gpu.md")
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "gpu-check.json")
    report = gpu_check.Report(facts={"gpu": "NVIDIA H100 80GB HBM3", "driver": "570.1"})
    report.step("host", "found", 0.2, "NVIDIA H100 80GB HBM3")
    text = (tmp_path / "gpu.md").read_text()
    assert "INCOMPLETE" in text and "| gpu | NVIDIA H100 80GB HBM3 |" in text and "| host | found | 0.2 |" in text
    report.runs.append({"providers": "CUDA", "model": "lenet5", "endpoint": "/v2", "clients": 32,
                        "served_on": "CUDAExecutionProvider (onnx)", "rps": 1234.5, "p50_ms": 1.5, "p95_ms": 3.25,
                        "errors": 0})
    report.finished = True
    report.save()
    text = (tmp_path / "gpu.md").read_text()
    assert "INCOMPLETE" not in text and "; complete." in text
    assert "| CUDA | lenet5 | /v2 | 32 | CUDAExecutionProvider (onnx) | 1234.5 | 1.50 | 3.25 | 0 |" in text
    assert gpu_check.Report(**__import__("json").loads((tmp_path / "gpu-check.json").read_text())).runs == report.runs
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.integration
def test_load_generator_measures_both_endpoints_of_the_real_server(live_server):
    bodies = gpu_check.request_bodies(live_server.http_url, "lenet5")
    assert set(bodies) == {"/classify", "/v2"}
    for path, body, headers in bodies.values():
        result = gpu_check.load(live_server.http_url, path, body, headers, clients=2, seconds=1.0)
        assert result["errors"] == 0, (path, result, live_server.log())
        assert result["rps"] > 0 and 0 < result["p50_ms"] <= result["p95_ms"]
