"""Training artifacts: ``artifacts/<name>/`` = weights.safetensors + card.json (+ curves.png).

No pickle anywhere: tensors in safetensors, everything else in JSON. Written atomically: the whole
directory is assembled under a temporary name and renamed into place, so a crash never leaves a
half-written artifact. Loading validates the card (models/card.py) and checks it against the weights,
failing with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from models import card as card_module
from models.card import CARD, FORMAT
from models.card import DEFAULT_WEIGHTS as WEIGHTS
from models.card import CardError as ArtifactError

__all__ = ["CARD", "FORMAT", "WEIGHTS", "ArtifactError", "atomic_dir", "atomic_write", "load_artifact", "read_card",
           "save_artifact", "sha256_file", "write_json"]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: dict) -> Path:
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


def atomic_dir(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory with ``fill(tmp)`` beside ``target`` and rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_artifact(out_dir: str | Path, model, card: dict,
                  extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write weights + card (the card gets the weights' sha256) atomically into ``out_dir``."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        # clone(): safetensors refuses tensors that share memory, as tied weights do (each name gets a copy;
        # loading the copies back into the one shared parameter restores the tie).
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        full = {"format": FORMAT, **card, "weights_sha256": sha256_file(tmp / WEIGHTS)}
        (tmp / CARD).write_text(json.dumps(full, indent=2) + "\n")
        if extra_files is not None:
            extra_files(tmp)

    return atomic_dir(out_dir, fill)


def read_card(artifact_dir: str | Path) -> dict:
    """The validated card (models/card.py); ArtifactError names the JSON path of a problem."""
    return card_module.read_card(artifact_dir)


def load_artifact(artifact_dir: str | Path):
    """Rebuild the model from its card and load its weights; returns ``(model.eval(), card)``.

    The card's ``weights_sha256`` (written by save_artifact) must match the weights file when present."""
    artifact_dir = Path(artifact_dir)
    card = read_card(artifact_dir)
    weights = artifact_dir / card.get("weights", WEIGHTS)
    if weights.is_file() and card.get("weights_sha256") not in (None, digest := sha256_file(weights)):
        raise ArtifactError(f"{weights}: sha256 {digest[:12]}... does not match the card's "
                            f"{card['weights_sha256'][:12]}...; the card belongs to other weights")
    return card_module.load_network(artifact_dir, card)
