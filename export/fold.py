"""Fold BatchNorm into the preceding conv/linear and remove dropout, explicitly, before export.

We do this ourselves rather than relying on an exporter's constant folding: the TorchScript exporter
happens to fold Conv+BN in eval mode, the dynamo exporter sometimes keeps Dropout nodes, and neither
folds Linear+BatchNorm1d. The fusion arithmetic is torch's own (``torch.nn.utils.fusion``); this
module only finds the (producer, BN) pairs, with ``torch.fx`` so the data flow decides, not the
attribute order.
"""

from __future__ import annotations

import copy
import logging

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

log = logging.getLogger("nnserve.export")

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class FoldError(ValueError):
    """A BatchNorm cannot be folded (no conv/linear feeds it alone), or the model cannot be traced."""


def _set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return an eval copy of ``model`` with every BatchNorm folded into its producer (BN -> Identity).

    Raises :class:`FoldError` naming the layer when a BN's input is not the output of a conv/linear
    used only there (e.g. BN after a ReLU, or a conv whose output also feeds something else).
    """
    model = copy.deepcopy(model).eval()
    bn_names = [name for name, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    if not bn_names:
        return model, []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises many types for untraceable control flow
        raise FoldError(f"cannot trace {type(model).__name__} with torch.fx to fold its BatchNorm layers "
                        f"{bn_names}: {e}") from e
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), BATCHNORMS):
            continue
        bn_name = node.target
        producer = node.args[0] if node.args else None
        producer_module = (model.get_submodule(producer.target)
                           if isinstance(producer, fx.Node) and producer.op == "call_module" else None)
        if not isinstance(producer_module, FOLDABLE):
            what = (f"{producer.op} {producer.target}" if isinstance(producer, fx.Node) else repr(producer))
            raise FoldError(f"BatchNorm layer {bn_name!r} cannot be folded: its input comes from {what}, "
                            f"not from a Conv/Linear layer")
        if len(producer.users) != 1 or calls[producer.target] != 1 or calls[bn_name] != 1:
            raise FoldError(f"BatchNorm layer {bn_name!r} cannot be folded into {producer.target!r}: the "
                            f"layer's output (or the layer itself) is used elsewhere too")
        bn = model.get_submodule(bn_name)
        if isinstance(producer_module, nn.Linear):
            fused = fuse_linear_bn_eval(producer_module, bn)
        else:
            fused = fuse_conv_bn_eval(producer_module, bn)
        _set_submodule(model, producer.target, fused)
        _set_submodule(model, bn_name, nn.Identity())
        folded.append(f"{bn_name} -> {producer.target}")
    log.info("folded %d BatchNorm layers: %s", len(folded), ", ".join(folded))
    return model, folded


def remove_dropout(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace dropout modules by Identity and zero the RNNs' inter-layer dropout (in place)."""
    removed = []
    for name, m in list(model.named_modules()):
        if isinstance(m, DROPOUTS):
            _set_submodule(model, name, nn.Identity())
            removed.append(name)
        elif isinstance(m, nn.RNNBase) and m.dropout:
            m.dropout = 0.0
            removed.append(f"{name}.dropout")
    log.info("removed %d dropout layers: %s", len(removed), ", ".join(removed) or "none")
    return model, removed


def prepare_for_export(model: nn.Module) -> tuple[nn.Module, dict]:
    """Eval copy with BN folded and dropout removed, plus what was done (for the report)."""
    model, folded = fold_batchnorm(model)
    model, removed = remove_dropout(model)
    leftovers = [name for name, m in model.named_modules() if isinstance(m, BATCHNORMS + DROPOUTS)]
    if leftovers:  # fold_batchnorm covers every BN in the traced graph; one outside it was never called
        raise FoldError(f"layers left after folding (not reached by forward?): {leftovers}")
    return model.eval(), {"batchnorm_folded": folded, "dropout_removed": removed}

