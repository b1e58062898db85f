"""Model kinds as plug-ins: one module per kind, shared by export and service (see models/kinds/base.py).

Adding a kind is adding a module with a ``Kind`` subclass and one line here; nothing else in export or the
service names kinds.
"""

from __future__ import annotations

from models.kinds.base import FrontEnd, Kind, KindError
from models.kinds.image import ImageClassifier, ImageFeatureExtractor
from models.kinds.sequence_lm import SequenceLM

KINDS: dict[str, Kind] = {k.name: k for k in (ImageClassifier(), ImageFeatureExtractor(), SequenceLM())}


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise KindError(f"unknown model kind {name!r}; nnserve knows {sorted(KINDS)} (re-export models made by an "
                        "older nnserve)")
    return KINDS[name]


# The suffixes of the kinds' front ends ("image", "text"): "<model>.<suffix>" is the front end's name over
# KServe v2, so no served model's own name may end with one.
FRONT_END_SUFFIXES = frozenset(k.front_end.suffix for k in KINDS.values() if k.front_end is not None)


def split_front_end(name: str) -> tuple[str, str | None]:
    """``"lenet5.image"`` -> ``("lenet5", "image")``: a front end's name -> (its model, its suffix); any other
    name -> ``(name, None)``."""
    model, dot, suffix = name.rpartition(".")
    return (model, suffix) if dot and model and suffix in FRONT_END_SUFFIXES else (name, None)


def kinds_for(endpoint: str) -> tuple[str, ...]:
    """The kinds a REST endpoint takes (e.g. "/features")."""
    return tuple(name for name, kind in KINDS.items() if endpoint in kind.endpoints)


__all__ = ["FRONT_END_SUFFIXES", "KINDS", "FrontEnd", "Kind", "KindError", "get_kind", "kinds_for", "split_front_end"]
