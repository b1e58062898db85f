"""Model kinds as plug-ins: one module per kind, shared by export and service (see models/kinds/base.py).

Adding a kind is adding a module with a ``Kind`` subclass and one line here; nothing else in export or the
service names kinds.
"""

from __future__ import annotations

from models.kinds.base import Kind, KindError
from models.kinds.image import ImageClassifier, ImageFeatureExtractor
from models.kinds.sequence_lm import SequenceLM

KINDS: dict[str, Kind] = {k.name: k for k in (ImageClassifier(), ImageFeatureExtractor(), SequenceLM())}


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise KindError(f"unknown model kind {name!r}; nnserve knows {sorted(KINDS)} (re-export models made by an "
                        "older nnserve)")
    return KINDS[name]


def kinds_for(endpoint: str) -> tuple[str, ...]:
    """The kinds a REST endpoint takes (e.g. "/features")."""
    return tuple(name for name, kind in KINDS.items() if endpoint in kind.endpoints)


__all__ = ["KINDS", "Kind", "KindError", "get_kind", "kinds_for"]
