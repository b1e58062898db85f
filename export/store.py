"""Register exported files in the BentoML model store, atomically; find earlier exports of an artifact.

Atomicity comes from ``bentoml.models.create`` (bentoml 1.4.39, read in models.py / _internal/store.py):
the context manager yields a model living in a fresh ``tempfile.mkdtemp`` directory; only when the
``with`` body finishes without an exception does it write model.yaml and copy the directory into the
store (``ModelStore.register``, which itself removes the version directory if the copy raises) and
then point ``latest`` at it. An exception inside the body skips all of that, and the temp directory is
removed when the model object is collected. So everything that can fail runs inside the body.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import bentoml
import onnxruntime as ort

log = logging.getLogger("nnserve.export")

FORMAT = 2  # nnserve_format of the store metadata (2: tensor roles, user models)


class StoreError(ValueError):
    """The files about to be registered do not match their metadata."""


def verify_entry(model_dir: Path, metadata: dict) -> None:
    """The served graph loads in ONNX Runtime and has exactly the inputs/outputs the metadata says."""
    onnx_path = model_dir / metadata["onnx_file"]
    if not onnx_path.is_file():
        raise StoreError(f"{metadata['name']}: {metadata['onnx_file']} missing from the model directory")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for side, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        expected = [t["name"] for t in metadata[side]]
        if [a.name for a in actual] != expected:
            raise StoreError(f"{metadata['name']}: graph {side} {[a.name for a in actual]} do not match the "
                             f"metadata's {expected}")


def register(name: str, files_dir: Path, metadata: dict) -> str:
    """Copy every file of ``files_dir`` into a new version of ``name``; returns ``"name:version"``."""
    labels = {"kind": metadata["kind"], "variant": metadata["variant"], "source": metadata["source_sha256"][:12]}
    with bentoml.models.create(name, metadata=metadata, labels=labels) as model:
        for path in sorted(files_dir.iterdir()):  # files, and the tensorrt/ folder of a verified engine
            if path.is_dir():
                shutil.copytree(path, model.path_of(path.name))
            else:
                shutil.copy2(path, model.path_of(path.name))
        verify_entry(Path(model.path), metadata)
    tag = str(model.tag)
    log.info("registered %s in the BentoML model store", tag)
    return tag


def check_name_free(name: str, kind: str) -> None:
    """A store name keeps one kind: a new version of another kind would break every client of the name."""
    try:
        models = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return
    for model in models:
        other = model.info.metadata.get("kind")
        if other != kind:
            raise StoreError(f"the model store already holds {name!r} as a {other!s} ({model.tag}); this card is a "
                             f"{kind}: choose another name, or remove the old one (bentoml models delete {name})")


def find_export(name: str, source_sha256: str, card_sha256: str) -> str | None:
    """Tag of a stored version of ``name`` exported from this very artifact (weights and card), if any."""
    try:
        models = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return None
    for model in sorted(models, key=lambda m: m.info.creation_time, reverse=True):
        meta = model.info.metadata
        if meta.get("source_sha256") == source_sha256 and meta.get("source_card_sha256") == card_sha256:
            return str(model.tag)
    return None
