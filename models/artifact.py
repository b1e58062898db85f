"""Training artifacts: ``artifacts/<name>/`` = weights.safetensors + card.json (+ curves.png).

No pickle anywhere: tensors in safetensors, everything else in JSON. Written atomically: the whole
directory is assembled under a temporary name and renamed into place, so a crash never leaves a
half-written artifact. Loading checks the card against the weights and fails with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FORMAT = "nnserve.artifact/1"
WEIGHTS = "weights.safetensors"
CARD = "card.json"


class ArtifactError(ValueError):
    """The artifact is missing, corrupt, or its card does not match its weights."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        full = {"format": FORMAT, **card, "weights_sha256": sha256_file(tmp / WEIGHTS)}
        (tmp / CARD).write_text(json.dumps(full, indent=2) + "\n")
        if extra_files is not None:
            extra_files(tmp)

    return atomic_dir(out_dir, fill)


def read_card(artifact_dir: str | Path) -> dict:
    path = Path(artifact_dir) / CARD
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: no {CARD}; is this a training artifact directory?")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if card.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {card.get('format')!r}, expected {FORMAT!r}")
    for key in ("name", "kind", "config"):
        if key not in card:
            raise ArtifactError(f"{path}: missing required field {key!r}")
    return card


def load_artifact(artifact_dir: str | Path):
    """Rebuild the model from its card and load its weights; returns ``(model.eval(), card)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.arch import build_model

    artifact_dir = Path(artifact_dir)
    card = read_card(artifact_dir)
    weights = artifact_dir / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{artifact_dir}: no {WEIGHTS}")
    digest = sha256_file(weights)
    if card.get("weights_sha256") not in (None, digest):
        raise ArtifactError(f"{weights}: sha256 {digest[:12]}... does not match the card's "
                            f"{card['weights_sha256'][:12]}...; the card belongs to other weights")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights}: cannot read safetensors ({e})") from e
    try:
        model = build_model(card["config"])
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{artifact_dir}: card config cannot build a model ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        if wrong:
            details.append("shape mismatch " + ", ".join(
                f"{k}: card {tuple(expected[k].shape)} vs weights {tuple(state[k].shape)}" for k in wrong[:5]))
        raise ArtifactError(f"{artifact_dir}: card does not match weights: " + "; ".join(details))
    model.load_state_dict(state)
    return model.eval(), card
