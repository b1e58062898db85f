"""Fold BatchNorm into the preceding conv/linear and remove dropout, explicitly, before export.

We do this ourselves rather than relying on an exporter's constant folding: the TorchScript exporter
happens to fold Conv+BN in eval mode, the dynamo exporter sometimes keeps Dropout nodes, and neither
folds Linear+BatchNorm1d. The fusion arithmetic is torch's own (``torch.nn.utils.fusion``).

Two paths, because users bring arbitrary networks:

* ``torch.fx`` (preferred): the traced data flow finds each (producer, BN) pair, not the attribute
  order. A BN fed by a Conv/Linear used only there is folded into it; any other BN (after a ReLU or a
  ``torch.cat``, or fed by a conv whose output also goes elsewhere) becomes a :class:`ScaleShift`,
  which exports as Mul+Add. The result is still the user's own module, so its extra methods work.
* ONNX: fx cannot trace data-dependent control flow, ``**kwargs`` forwards or most HuggingFace models.
  Then the BNs stay in the module, the TorchScript exporter (eval mode) folds the plain Conv+BN pairs,
  and :func:`fold_batchnorm_onnx` handles every BatchNormalization node left in the exported graph,
  where the data flow is explicit whatever the Python code looked like.

``strict_fold=True`` makes any BN that cannot be folded into a producer an error instead.
"""

from __future__ import annotations

import collections
import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from models.artifact import atomic_write

log = logging.getLogger("nnserve.export")

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Exact types, not isinstance: a subclass may transform its weight in forward (weight standardization),
# and folding BN into a weight that forward then rescales would be wrong.
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
STRICT_HINT = "without --strict-fold it would become a per-channel scale-and-shift (Mul+Add)"


class FoldError(ValueError):
    """A BatchNorm cannot be exported as a fixed affine map, or (strict) cannot be folded into a producer."""


class UntraceableError(FoldError):
    """torch.fx cannot trace the model; :func:`prepare_for_export` falls back to the ONNX path."""


class ScaleShift(nn.Module):
    """An eval-mode BatchNorm as ``x * scale + shift`` per channel (dim 1); exports as Mul+Add."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> ScaleShift:
        _require_running_stats(bn, "")
        assert bn.running_mean is not None and bn.running_var is not None  # checked just above
        # float64 so the only rounding is the final cast
        mean, var = bn.running_mean.double(), bn.running_var.double()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:  # affine=False has neither weight nor bias
            scale = scale * bn.weight.detach().double()
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
        # [C, 1, ..., 1] for the usual input rank; BatchNorm1d defaults to [N, C] (its [N, C, L] in forward)
        spatial = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(bn), 0)
        shape = (-1,) + (1,) * spatial
        dtype = bn.running_mean.dtype
        return cls(scale.to(dtype).reshape(shape), shift.to(dtype).reshape(shape))

    scale: torch.Tensor
    shift: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale, self.shift
        if x.dim() != scale.dim() + 1:  # e.g. BatchNorm1d on [N, C, L]; a constant reshape once exported
            shape = (-1,) + (1,) * (x.dim() - 2)
            scale, shift = scale.reshape(shape), shift.reshape(shape)
        return x * scale + shift


class _Tracer(fx.Tracer):
    """Keeps ScaleShift a leaf, so an already prepared model traces again (its forward branches on rank), and
    every Conv subclass (e.g. a library's padding conv), so the BN after it is seen fed by a conv layer."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ScaleShift | nn.modules.conv._ConvNd) or super().is_leaf_module(m, module_qualified_name)


def _require_running_stats(bn: nn.Module, name: str) -> None:
    # In eval, torch normalizes with the batch's own statistics when there are no running buffers: the
    # output would depend on whatever else is in the batch, which no fixed Mul+Add (or server) can honour.
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise FoldError(f"BatchNorm layer {name!r} has no running statistics (track_running_stats=False), so it "
                        f"normalizes each batch with its own statistics: it cannot be exported for serving")


def _set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _fuse(producer: Any, bn: Any) -> nn.Module | None:
    """The fused producer, or None when the pair cannot be folded whatever the graph. (``Any``: nn.Module's
    attributes type as Tensor | Module, and the type checks below are what narrows them.)"""
    if type(producer) in CONVS and producer.out_channels == bn.num_features:
        return fuse_conv_bn_eval(producer, bn)
    # torch's transposed fusion scales weight dim 1, which is out_channels // groups: right for groups=1 only
    if type(producer) in CONV_TRANSPOSES and producer.groups == 1 and producer.out_channels == bn.num_features:
        return fuse_conv_bn_eval(producer, bn, transpose=True)
    # Assumes the Linear's features are the BN's channels ([N, F] input), as in every MLP head; fx has no shapes.
    if type(producer) is nn.Linear and bn.num_features in (producer.out_features, 1):
        return fuse_linear_bn_eval(producer, bn)
    return None


def _describe(node: object) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"layer {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    return f"{'the model input' if node.op == 'placeholder' else node.op} {node.target!r}"


def fold_batchnorm(model: nn.Module, strict_fold: bool = False
                   ) -> tuple[nn.Module, list[str], list[str], list[str]]:
    """Eval copy of ``model`` with each BN folded into its producer (BN -> Identity) or made a ScaleShift.

    Returns (model, ["bn -> producer" folded], [BN names made ScaleShift], [BN names left to the ONNX
    pass]). A BN folds when its input is the output of a Conv/Linear used only there. Raises
    :class:`FoldError` naming the layer for any other
    BN when ``strict_fold``, and :class:`UntraceableError` when torch.fx cannot trace the model.
    """
    model = copy.deepcopy(model).eval()
    if not any(isinstance(m, BATCHNORMS) for m in model.modules()):
        return model, [], [], []
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable control flow
        why = (str(e).strip().splitlines() or [""])[0]
        raise UntraceableError(f"{type(e).__name__}: {why}" if why else type(e).__name__) from e
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded, scale_shift, deferred, done = [], [], [], set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target in done or not isinstance(model.get_submodule(node.target),
                                                                             BATCHNORMS):
            continue
        bn_name = node.target
        done.add(bn_name)
        bn: Any = model.get_submodule(bn_name)  # a BatchNorm (checked above)
        _require_running_stats(bn, bn_name)
        producer = node.args[0] if node.args else node.kwargs.get("input")
        is_module = isinstance(producer, fx.Node) and producer.op == "call_module"
        what = _describe(producer)
        fused, why = None, f"its input comes from {what}, not from a Conv/Linear layer that can absorb it"
        if is_module and (len(producer.users) != 1 or calls[producer.target] != 1 or calls[bn_name] != 1):
            why = f"its input comes from {what}, whose output (or the layer itself) is used elsewhere too"
        elif is_module:
            fused = _fuse(model.get_submodule(producer.target), bn)
        if fused is not None:
            _set_submodule(model, producer.target, fused)
            _set_submodule(model, bn_name, nn.Identity())
            folded.append(f"{bn_name} -> {producer.target}")
        elif is_module and len(producer.users) == 1 and isinstance(model.get_submodule(producer.target),
                                                                   CONVS + CONV_TRANSPOSES):
            # A Conv subclass (e.g. efficientnet_pytorch's static-same-padding conv) may change its weight in
            # forward, so its module is not fused here; its exported Conv node is, by the ONNX pass.
            deferred.append(bn_name)
        elif strict_fold:
            raise FoldError(f"BatchNorm layer {bn_name!r} cannot be folded: {why}; {STRICT_HINT}")
        else:
            _set_submodule(model, bn_name, ScaleShift.from_batchnorm(bn))
            scale_shift.append(bn_name)
    log.info("folded %d BatchNorm layers: %s%s", len(folded), ", ".join(folded) or "none",
             f"; {len(deferred)} after Conv subclasses are folded in the ONNX graph" if deferred else "")
    if scale_shift:
        log.info("BatchNorm layers made scale-and-shift (nothing to fold into): %s", ", ".join(scale_shift))
    return model, folded, scale_shift, deferred


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


def prepare_for_export(model: nn.Module, strict_fold: bool = False) -> tuple[nn.Module, dict]:
    """Eval copy with BN folded (or scale-and-shift) and dropout removed, plus what was done (for the report).

    ``info["method"] == "onnx"`` means fx could not trace the model: its BNs are untouched and the caller
    must run :func:`finish_onnx_folding` on the exported file (``info["fx_error"]`` says why).
    """
    for name, m in model.named_modules():
        if isinstance(m, BATCHNORMS):
            _require_running_stats(m, name)
    info: dict = {"method": "torch.fx"}
    try:
        model, folded, scale_shift, deferred = fold_batchnorm(model, strict_fold)
        if deferred:
            info = {"method": "torch.fx+onnx", "deferred_to_onnx": deferred}
    except UntraceableError as e:
        log.info("torch.fx cannot trace %s (%s): BatchNorm is folded in the exported ONNX graph instead",
                 type(model).__name__, e)
        model, folded, scale_shift = copy.deepcopy(model).eval(), [], []
        info = {"method": "onnx", "fx_error": str(e),
                "batchnorm_layers": sum(isinstance(m, BATCHNORMS) for m in model.modules())}
    model, removed = remove_dropout(model)
    # Every BN in the fx graph was handled, so one left was never called as a module (e.g. only its
    # tensors were used); with the ONNX method BNs stay on purpose.
    kinds = DROPOUTS + (BATCHNORMS if info["method"] != "onnx" else ())
    leftovers = [name for name, m in model.named_modules()
                 if isinstance(m, kinds) and name not in info.get("deferred_to_onnx", ())]
    if leftovers:
        raise FoldError(f"layers left after folding (not reached by forward?): {leftovers}")
    info.update(batchnorm_folded=folded, batchnorm_scale_shift=scale_shift, dropout_removed=removed)
    return model.eval(), info


# ---- ONNX path -----------------------------------------------------------------------------------------

def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _names_used(graph: onnx.GraphProto) -> collections.Counter:
    """How many times each value is read: node inputs (subgraphs included, they may read outer names), outputs."""
    used = collections.Counter(o.name for o in graph.output)
    for node in graph.node:
        used.update(i for i in node.input if i)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used.update(_names_used(g))
    return used


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # inference is a hint here; the pipeline's own check is strict
        log.warning("ONNX shape inference failed (%s); BatchNorm inputs assumed to be rank 4", e)
        inferred = model
    g = inferred.graph
    return {v.name: v.type for v in list(g.value_info) + list(g.input) + list(g.output)}


class _Graph:
    """Lookups over one graph: who produces a value, what constant a value holds, fresh names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers = {t.name: t for t in graph.initializer}
        self.producers = {o: node for node in graph.node for o in node.output if o}
        self.taken = set(self.initializers) | set(self.producers) | {v.name for v in graph.input}
        self.taken |= {n.name for n in graph.node}

    def constant(self, name: str) -> np.ndarray | None:
        """The value if it is constant: an initializer, a Constant node, or an Identity of one (the
        TorchScript exporter shares equal tensors, e.g. zero running_mean and bias, through Identity)."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":
            return self.constant(node.input[0])
        return None

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def add_initializer(self, graph: onnx.GraphProto, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def _fold_into_conv(g: _Graph, graph: onnx.GraphProto, conv: onnx.NodeProto, scale: np.ndarray,
                    shift: np.ndarray) -> bool:
    """Fold y = x * scale + shift into the Conv/ConvTranspose's constant weight and bias; False if not constant."""
    w = g.constant(conv.input[1])
    b = g.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if w is None or (len(conv.input) > 2 and conv.input[2] and b is None):
        return False
    k = (1,) * (w.ndim - 2)
    if conv.op_type == "Conv":  # W [M, C/group, k...]: output channel is dim 0
        if w.shape[0] != scale.size:
            return False
        w_new = w.astype(np.float64) * scale.reshape(-1, 1, *k)
    else:  # ConvTranspose W [C, M/group, k...]: output channel (g, j) is W[g * C/group + i, j]
        group = _attr(conv, "group", 1)
        if w.shape[1] * group != scale.size or w.shape[0] % group:
            return False
        grouped = w.astype(np.float64).reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        w_new = (grouped * scale.reshape(group, 1, -1, *k)).reshape(w.shape)
    b_new = (b.astype(np.float64) if b is not None else 0.0) * scale + shift
    base = conv.name or conv.output[0]
    inputs = [conv.input[0], g.add_initializer(graph, f"{base}.weight_bnfold", w_new.astype(w.dtype)),
              g.add_initializer(graph, f"{base}.bias_bnfold", b_new.astype(w.dtype))]
    del conv.input[:]
    conv.input.extend(inputs)
    return True


def _fold_into_gemm(g: _Graph, graph: onnx.GraphProto, gemm: onnx.NodeProto, scale: np.ndarray,
                    shift: np.ndarray) -> bool:
    """Fold y = x * scale + shift (per column) into Gemm's constant B and C; False if not constant or mis-sized.

    Gemm is ``alpha * A' B' + beta * C``: B' columns scale, and C becomes ``beta * C * scale + shift`` with
    beta set to 1 (so a Gemm without C gets one)."""
    b = g.constant(gemm.input[1])
    has_c = len(gemm.input) > 2 and bool(gemm.input[2])
    c = g.constant(gemm.input[2]) if has_c else None
    if b is None or b.ndim != 2 or (has_c and c is None):
        return False
    trans_b = _attr(gemm, "transB", 0)
    if b.shape[0 if trans_b else 1] != scale.size:  # B' is [K, M]: M output columns, the BN's channels
        return False
    b_new = b.astype(np.float64) * (scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1))
    beta = float(_attr(gemm, "beta", 1.0))
    c_new = (beta * c.astype(np.float64) if c is not None else 0.0) * scale + shift
    base = gemm.name or gemm.output[0]
    inputs = [gemm.input[0], g.add_initializer(graph, f"{base}.weight_bnfold", b_new.astype(b.dtype)),
              g.add_initializer(graph, f"{base}.bias_bnfold", np.asarray(c_new).astype(b.dtype))]
    del gemm.input[:]
    gemm.input.extend(inputs)
    attributes = [a for a in gemm.attribute if a.name != "beta"]
    del gemm.attribute[:]
    gemm.attribute.extend([*attributes, onnx.helper.make_attribute("beta", 1.0)])
    return True


FOLD_PRODUCERS = {"Conv": _fold_into_conv, "ConvTranspose": _fold_into_conv, "Gemm": _fold_into_gemm}


def fold_batchnorm_onnx(model: onnx.ModelProto, strict_fold: bool = False, reasons: dict[str, str] | None = None
                        ) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Fold or replace every BatchNormalization node of the main graph; ``model`` itself is not changed.

    Returns (new model, ["bn node -> producer node" folded], [bn nodes made Mul+Add]). A BN folds into the
    Conv/ConvTranspose/Gemm producing its input when that output feeds nothing else and the weights are
    constant; any other BN becomes Mul+Add (a :class:`FoldError` with ``strict_fold``), and ``reasons`` (when
    given) gets why, by BN node. A BN in training mode or with non-constant statistics is always a FoldError.
    Arithmetic in float64, then cast.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    types = _value_types(model)
    used = _names_used(graph)
    g = _Graph(graph)
    folded: list[str] = []
    scale_shift: list[str] = []
    stale: set[str] = set()
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization":
            continue
        bn_name = node.name or node.output[0]
        found = [g.constant(name) for name in node.input[1:5]]
        params = [p for p in found if p is not None]
        if _attr(node, "training_mode", 0) or any(o for o in node.output[1:]) or len(params) != len(found):
            raise FoldError(f"BatchNormalization node {bn_name!r} uses batch statistics (training mode or "
                            f"non-constant mean/variance): it is not a fixed per-channel scale-and-shift")
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))
        shift = beta - mean * scale
        x, y = node.input[0], node.output[0]
        stale.update(node.input[1:5])
        producer = g.producers.get(x)
        what = f"{producer.op_type} node {producer.name or x!r}" if producer is not None else f"graph input {x!r}"
        why: str | None
        if producer is None or producer.op_type not in FOLD_PRODUCERS:
            why = f"its input comes from {what}, not from a Conv or Gemm"
        elif used[x] != 1:
            why = f"its input comes from {what}, whose output is used elsewhere too"
        else:
            old_weights = list(producer.input[1:])
            why = None if FOLD_PRODUCERS[producer.op_type](g, graph, producer, scale, shift) else \
                f"its input comes from {what}, whose weights are not constant or do not match"
            stale.update(old_weights)
        if why is None:
            assert producer is not None  # why is None only when the Conv/Gemm above absorbed the BN
            producer.output[0] = y  # the conv now computes the BN's output directly
            g.producers[y] = producer  # so a second BN right after folds into it too
            replacements[index] = []
            folded.append(f"{bn_name} -> {producer.name or producer.output[0]}")
            continue
        if strict_fold:
            raise FoldError(f"BatchNormalization node {bn_name!r} cannot be folded: {why}; {STRICT_HINT}")
        if reasons is not None:
            reasons[bn_name] = why
        x_type = types.get(x)
        shape = x_type.tensor_type.shape if x_type is not None and x_type.tensor_type.HasField("shape") else None
        # Unknown rank: assume NCHW (rank 4), what image models feed BN; exporter graphs have full shapes.
        rank = len(shape.dim) if shape is not None else 4
        dtype = (onnx.helper.tensor_dtype_to_np_dtype(x_type.tensor_type.elem_type)
                 if x_type is not None and x_type.tensor_type.elem_type else params[0].dtype)
        const_shape = (-1,) + (1,) * (rank - 2)
        mul_c = g.add_initializer(graph, f"{bn_name}.scale", scale.reshape(const_shape).astype(dtype))
        add_c = g.add_initializer(graph, f"{bn_name}.shift", shift.reshape(const_shape).astype(dtype))
        scaled = g.fresh(f"{y}_scaled")
        replacements[index] = [
            onnx.helper.make_node("Mul", [x, mul_c], [scaled], name=g.fresh(f"{bn_name}_scale")),
            onnx.helper.make_node("Add", [scaled, add_c], [y], name=g.fresh(f"{bn_name}_shift")),
        ]
        scale_shift.append(bn_name)
    if not replacements:
        return model, [], []
    nodes = []  # same order, so the graph stays topologically sorted
    for index, node in enumerate(graph.node):
        nodes.extend(replacements.get(index, [copy.deepcopy(node)]))
    del graph.node[:]
    graph.node.extend(nodes)
    # Drop what the BNs and the folded convs no longer read (and the exporter's Identity/Constant nodes
    # that fed them); a graph input keeps its initializer.
    still_used = _names_used(graph) + collections.Counter(v.name for v in graph.input)
    dead = {i for i, n in enumerate(graph.node) if n.op_type in ("Identity", "Constant") and n.output[0] in stale
            and not still_used[n.output[0]]}
    if dead:
        stale.update(name for i in dead for name in graph.node[i].input)
        nodes = [copy.deepcopy(n) for i, n in enumerate(graph.node) if i not in dead]
        del graph.node[:]
        graph.node.extend(nodes)
        still_used = _names_used(graph) + collections.Counter(v.name for v in graph.input)
    kept = [t for t in graph.initializer if t.name not in stale or still_used[t.name]]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # The folded convs' old outputs are gone; stale shape entries for them would confuse checkers.
    names = {o for n in graph.node for o in n.output} | {v.name for v in graph.input} | set(g.initializers)
    value_info = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    log.info("ONNX: folded %d BatchNormalization nodes (%s), %d made Mul+Add (%s)", len(folded),
             ", ".join(folded) or "none", len(scale_shift), ", ".join(scale_shift) or "none")
    return model, folded, scale_shift


def finish_onnx_folding(path: Path, info: dict, strict_fold: bool = False) -> dict:
    """After export: unless every BN was handled by torch.fx (``info["method"] == "torch.fx"``), fold the BNs
    left in the ONNX file at ``path`` in place.

    The file is replaced atomically (temp file + rename). ``info``'s lists are extended with the ONNX
    node names and ``info`` is returned; with the torch.fx method nothing is done.
    """
    if info.get("method") == "torch.fx":
        return info
    path = Path(path)
    bn_count = len(info.get("deferred_to_onnx", ())) if info["method"] != "onnx" else info["batchnorm_layers"]
    model, folded, scale_shift = fold_batchnorm_onnx(onnx.load(str(path)), strict_fold=strict_fold)
    if folded or scale_shift:
        atomic_write(path, model.SerializeToString())
    info["batchnorm_folded"] = list(info.get("batchnorm_folded", [])) + folded
    info["batchnorm_scale_shift"] = list(info.get("batchnorm_scale_shift", [])) + scale_shift
    # The exporter's own eval-mode peephole folds Conv+BN before our pass sees the graph: say so, so the
    # certificate accounts for every BatchNorm.
    info["batchnorm_folded_by_exporter"] = bn_count - len(folded) - len(scale_shift)
    log.info("BatchNorm in the ONNX graph: %d folded by the exporter into their Conv, %d folded by nnserve, %d made "
             "scale-and-shift", info["batchnorm_folded_by_exporter"], len(folded), len(scale_shift))
    return info
