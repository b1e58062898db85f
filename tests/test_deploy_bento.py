"""The container side of the Bento, without a container engine (none runs here): ``bentoml build`` of the
CPU (bentofile.yaml) and GPU (deploy/bentofile-gpu.yaml) variants writes ``env/docker/Dockerfile``; check
that it starts the server through BentoML's entry point, exposes HTTP 3000 and gRPC 8001, sets the gRPC
port, runs as the non-root user the manifests expect, and installs the right ONNX Runtime build.
``bentoml containerize`` itself needs Docker / buildx / podman: docs/deploy.md has the commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import bentoml
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BENTO_UID = 1034  # BentoML's bentoml user in the image; deploy/k8s runs the pod as this uid


def _build(bentofile: str) -> Path:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    build = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "build", "-f", bentofile,
                            "--output", "tag"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return Path(bentoml.bentos.get(tag).path)


def test_gpu_bentofile_is_the_cpu_one_with_the_gpu_runtime():
    cpu = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((REPO_ROOT / "deploy" / "bentofile-gpu.yaml").read_text())
    assert gpu["name"] == "nnserve-gpu"
    cpu_packages = [p for p in cpu["python"]["packages"] if not p.startswith("onnxruntime==")]
    gpu_packages = [p for p in gpu["python"]["packages"] if not p.startswith(("onnxruntime-gpu==", "tensorrt"))]
    assert gpu_packages == cpu_packages
    assert gpu["docker"]["cuda_version"].split(".")[0] == "12"
    assert any(p.startswith("tensorrt-cu12==") for p in gpu["python"]["packages"])  # the CUDA major of the base
    for key in ("service", "include", "exclude", "models", "envs"):
        assert gpu[key] == cpu[key], key


def _check_dockerfile(bento: Path) -> str:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    # BentoML's entry point script, which runs `bentoml serve` on the Bento (its CMD default)
    entry = re.search(r'^ENTRYPOINT \[ "([^"]+)" \]', dockerfile, flags=re.MULTILINE)
    assert entry, dockerfile
    assert entry.group(1).endswith("/env/docker/entrypoint.sh")
    script = (bento / "env" / "docker" / "entrypoint.sh").read_text()
    # no arguments: `bentoml serve` on the Bento, exec'd, so the server is PID 1 and gets the pod's SIGTERM
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in script and 'exec "$@"' in script
    exposed = set(re.findall(r"^EXPOSE (\d+)", dockerfile, flags=re.MULTILINE))
    assert {"3000", "8001"} <= exposed, exposed
    assert re.search(r"^ENV NNSERVE_GRPC_PORT=\$NNSERVE_GRPC_PORT", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^ARG NNSERVE_GRPC_PORT=8001", dockerfile, flags=re.MULTILINE)
    assert re.search(rf"^ARG BENTO_USER_UID={BENTO_UID}$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^USER bentoml$", dockerfile, flags=re.MULTILINE)
    return dockerfile


@pytest.mark.integration
def test_cpu_bento_dockerfile(tiny_store):
    bento = _build("bentofile.yaml")
    dockerfile = _check_dockerfile(bento)
    assert "nvidia/cuda" not in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "onnxruntime-gpu" not in requirements


@pytest.mark.integration
def test_gpu_bento_dockerfile(tiny_store):
    bento = _build("deploy/bentofile-gpu.yaml")
    dockerfile = _check_dockerfile(bento)
    base = re.search(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:12."), base
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu==" in requirements and "tensorrt-cu12==" in requirements
    assert not re.search(r"^onnxruntime==", requirements, flags=re.MULTILINE)  # one ORT build, not both


def test_manifests_run_as_the_images_user():
    """runAsNonRoot needs a numeric uid: the image says `USER bentoml`, so the pods name its uid."""
    from deploy.validate import render_all

    for target, objects in render_all().items():
        for obj in objects:
            if obj["kind"] == "Deployment":
                context = obj["spec"]["template"]["spec"]["securityContext"]
                assert context["runAsUser"] == BENTO_UID and context["runAsNonRoot"] is True, target
