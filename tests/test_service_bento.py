"""Packaging: ``bentoml build`` (what ``make bento`` runs) turns bentofile.yaml into a Bento holding the
service code and the registered models, with the serving dependencies only (no torch)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import bentoml
import pytest
import yaml

from service import playground

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVED = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")


def test_bentofile_packages_are_the_pyproject_dependencies():
    """One list of serving dependencies: the bentofile repeats pyproject's, this keeps them equal."""
    bentofile = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert bentofile["python"]["packages"] == pyproject["project"]["dependencies"]
    assert not any(p.split("=")[0].startswith("torch") for p in bentofile["python"]["packages"])
    assert sorted(m.split(":")[0] for m in bentofile["models"]) == sorted(SERVED)


@pytest.mark.integration
def test_bento_builds_with_the_service_code_and_the_registered_models(tiny_store):
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    build = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "build", "--output", "tag"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = bentoml.bentos.get(tag)
    assert bento.tag.name == "nnserve"
    # The models the store's "latest" pointed at when building: for each served name, its newest version.
    want = {str(bentoml.models.get(f"{name}:latest").tag) for name in SERVED}
    assert {str(m.tag) for m in bento.info.models} == want
    src = Path(bento.path) / "src"
    for path in ("service/service.py", "service/runtime.py", "models/runtime.py", "service/images.py",
                 "service/metrics.py",
                 "service/generation.py", "service/kserve_http.py", "service/kserve_grpc.py", "service/rest.py",
                     "service/batching.py", "service/repository.py", "service/settings.py", "service/uploads.py",
                 "models/preprocess.py", "models/__init__.py", "service/playground.py",
                 *(f"service/playground/{name}" for name in (*playground.FILES, playground.GALLERY_SHEET.name))):
        assert (src / path).is_file(), path
    assert not (src / "models" / "train.py").exists() and not (src / "export").exists()  # training code stays out
    requirements = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements
    assert bento.info.entry_service == "NNServe"
    # The REST routes are mounted Starlette routes (service/rest.py), not @bentoml.api ones: BentoML's
    # schema lists none of them; the service's /docs.json documents them (tests/test_service.py).
    assert bento.info.schema["routes"] == []
