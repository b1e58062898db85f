"""The model card (``card.json``): validated against the published JSON Schema, then turned into a module.

An artifact directory is the contract between training (ours or the user's) and export:
``card.json`` + weights (a PyTorch network built by ``config.factory(**config.kwargs)``) or
``card.json`` + an ONNX file made elsewhere. The schema (``models/card_schema.json``, documented in
docs/your-model.md) is checked before any work starts; every error names the JSON path and the fix.

Weights are never unpickled: safetensors, or ``torch.load(weights_only=True)`` for ``.pt``/``.pth``/``.bin``
state_dicts (tensors and plain containers only; a pickled whole model is refused).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("nnserve.export")

FORMAT = "nnserve.artifact/2"
CARD = "card.json"
DEFAULT_WEIGHTS = "weights.safetensors"
SCHEMA_PATH = Path(__file__).with_name("card_schema.json")


class CardError(ValueError):
    """The card is invalid, or the network it describes cannot be built or loaded as it says."""


@functools.cache
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _json_path(path) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def validate_card(card: object, where: str = CARD) -> dict:
    """Raise CardError naming the JSON path of the first problem the schema finds, with the allowed names for a
    misspelled field.

    Unknown fields come first: a misspelled required field (``labeles``) is also a missing one, and the name
    it is closest to is the fix, where "'labels' is a required property" alone would hide the typo. Otherwise
    the deepest, most specific error (jsonschema's best match)."""
    import jsonschema

    if isinstance(card, dict) and card.get("kind") == "sequence_lm" and "onnx" in card:
        raise CardError(f"{where}: $.onnx: a sequence_lm is exported from its PyTorch module (config + weights): "
                        "its recurrent state needs the module to be certified; ONNX files made elsewhere are "
                        "supported for the image kinds")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(card), key=jsonschema.exceptions.relevance)
    if not errors:
        return card  # type: ignore[return-value]
    unknown = [e for e in errors if e.validator == "additionalProperties"]
    error = min(unknown, key=lambda e: len(e.absolute_path)) if unknown else jsonschema.exceptions.best_match(errors)
    path = _json_path(error.absolute_path)
    message = error.message
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        close = {k: difflib.get_close_matches(k, allowed, 1) for k in extra}
        hints = [f"{k!r} (did you mean {close[k][0]!r}?)" if close[k] else repr(k) for k in extra]
        message = f"unknown field(s) {', '.join(hints)}; allowed: {', '.join(allowed)}"
        hinted = {c[0] for c in close.values() if c}
        missing = sorted({name for e in errors if e.validator == "required" and e.absolute_path == error.absolute_path
                          for name in e.validator_value if name not in e.instance and name not in hinted})
        if missing:
            message += f"; also missing: {', '.join(map(repr, missing))}"
    elif error.validator == "oneOf" and error.absolute_path == type(error.absolute_path)():
        message = ("give either 'config' (a PyTorch factory + weights) or 'onnx' (an ONNX file made elsewhere), "
                   "not both or neither")
    elif error.validator == "const" and list(error.absolute_path) == ["format"]:
        message = (f"format is {error.instance!r}, expected {FORMAT!r} (cards of older nnserve versions: retrain "
                   "with `make train`, or add the fields docs/your-model.md lists)")
    raise CardError(f"{where}: {path}: {message}")


def read_card(artifact_dir: str | Path) -> dict:
    path = Path(artifact_dir) / CARD
    if not path.is_file():
        raise CardError(f"{artifact_dir}: no {CARD}; an artifact directory holds card.json plus weights or an "
                        "ONNX file (docs/your-model.md)")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CardError(f"{path}: not valid JSON ({e})") from e
    return validate_card(card, str(path))


def import_factory(spec: str, search_dir: Path | None = None):
    """``package.module:attr.path`` -> the object; ``search_dir`` (the artifact directory) is importable too."""
    module_name, _, attr_path = spec.partition(":")
    added = search_dir is not None and str(search_dir) not in sys.path
    if added:
        sys.path.insert(0, str(search_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CardError(f"config.factory {spec!r}: cannot import module {module_name!r} ({e}); install the package "
                        f"that defines it, or put {module_name.replace('.', '/')}.py beside card.json") from e
    finally:
        if added:
            sys.path.remove(str(search_dir))
    target = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, 3)
            raise CardError(f"config.factory {spec!r}: module {module_name!r} has no attribute {part!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else ""))
        target = getattr(target, part)
    if not callable(target):
        raise CardError(f"config.factory {spec!r} is a {type(target).__name__}, not a class or function")
    return target


def build_module(card: dict, artifact_dir: Path | None = None):
    """``factory(**kwargs)``, checked to be an ``nn.Module``."""
    from torch import nn

    config = card["config"]
    factory = import_factory(config["factory"], artifact_dir)
    try:
        model = factory(**config.get("kwargs", {}))
    except TypeError as e:
        raise CardError(f"config.factory {config['factory']!r} rejected config.kwargs "
                        f"{sorted(config.get('kwargs', {}))}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CardError(f"config.factory {config['factory']!r} returned a {type(model).__name__}, not a "
                        "torch.nn.Module")
    return model


def read_state_dict(path: Path) -> dict:
    """A state_dict from safetensors, or from a .pt/.pth/.bin through ``torch.load(weights_only=True)``."""
    import torch

    if not path.is_file():
        raise CardError(f"weights file {path} not found (card field 'weights', default {DEFAULT_WEIGHTS})")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CardError(f"{path}: cannot read safetensors ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError names the global it refused; anything else is a corrupt file
        raise CardError(f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0][:300]}). Only "
                        "state_dicts load: save `model.state_dict()` (better: safetensors), never the whole "
                        "model object") from e
    # Checkpoints often nest the state_dict: {"state_dict": {...}} or {"model": {...}}
    if isinstance(state, dict) and len(state) >= 1 and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [k for k in ("state_dict", "model", "model_state_dict") if isinstance(state.get(k), dict)]
        if nested:
            state = state[nested[0]]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CardError(f"{path}: holds a {type(state).__name__}, not a state_dict of tensors")
    return dict(state)


def load_state(model, state: dict, where: str) -> None:
    """``load_state_dict(strict=True)`` with every missing, unexpected and mis-shaped key listed."""
    expected = model.state_dict()
    state = dict(state)
    prefix = "module."  # torch.nn.DataParallel / DistributedDataParallel checkpoints prefix every key
    if set(state) != set(expected) and {k.removeprefix(prefix) for k in state} == set(expected) and all(
            k.startswith(prefix) for k in state):
        log.info("%s: keys saved from DataParallel ('module.' prefix): prefix removed", where)
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    for keys in tied_groups(expected):  # a tied weight is saved once (safetensors' save_model keeps one name)
        present = [k for k in keys if k in state]
        for key in keys:
            if present and key not in state:
                state[key] = state[present[0]]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            details.append("shape mismatch: " + ", ".join(
                f"{k} model {tuple(expected[k].shape)} vs weights {tuple(state[k].shape)}" for k in wrong[:8]))
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (keys start with 'module.': saved from DataParallel; strip that prefix when saving)"
        elif wrong:
            hint = " (config.kwargs build a network of other sizes than the weights: e.g. num_classes)"
        raise CardError(f"{where}: the weights do not fit the network config.factory builds: "
                        + "; ".join(details) + hint)
    model.load_state_dict(state)


def tied_groups(state: dict) -> list[list[str]]:
    """Groups of keys naming one tensor (tied weights, e.g. an embedding reused as the output head)."""
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        if tensor.numel():
            groups.setdefault(tensor.data_ptr(), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def load_network(artifact_dir: str | Path, card: dict | None = None):
    """Build the card's module and load its weights; returns ``(model.eval(), card)``."""
    artifact_dir = Path(artifact_dir)
    card = card or read_card(artifact_dir)
    if "config" not in card:
        raise CardError(f"{artifact_dir}: the card describes an ONNX file, not a PyTorch network")
    weights = artifact_dir / card.get("weights", DEFAULT_WEIGHTS)
    model = build_module(card, artifact_dir)
    load_state(model, read_state_dict(weights), str(weights))
    return model.eval(), card
