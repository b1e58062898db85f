"""PyTorch module -> ONNX graph with the I/O names of docs/architecture.md, checked.

Exporter choice: the TorchScript exporter (``dynamo=False``), opset 17, pinned. Measured on our four
models with torch 2.13: both exporters emit native ONNX ``LSTM``/``GRU`` ops (what ORT's fast kernels
and ``DynamicQuantizeLSTM`` need), but the dynamo exporter adds Shape/Reshape/Slice glue around them
(char_lstm: 33 nodes vs 23 plus 14 constants), keeps no-op ``Dropout`` nodes in the VGG graph, and
takes 10-20 s per model instead of 0.2-0.6 s on 2 cores. The TorchScript exporter is deprecated but
present in the pinned torch==2.13.0; its graph is the cleanest, and BN/dropout are gone before export
anyway (export/fold.py), so nothing relies on its own folding.
"""

from __future__ import annotations

import collections
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from models.kinds import Kind

log = logging.getLogger("nnserve.export")

OPSET = 17
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript exporter)"
ONNX_DTYPES: dict[int, str] = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
               onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32"}  # what the service feeds


class GraphError(ValueError):
    """The exported graph fails the checker, shape inference, or still holds BN/Dropout nodes."""


def export_onnx(wrapper: Any, kind: Kind, card: dict, path: Path, check: bool = True,
                exporter_folds_bn: bool = True) -> onnx.ModelProto:
    """Export, then run the full checker and strict shape inference; returns the loaded graph.

    ``exporter_folds_bn=False`` gives the "before" graph of the report: constants folded as usual, but
    the exporter's own eval-mode Conv+BN peephole (run only for ``TrainingMode.EVAL``) is off, so the
    unfolded module's BatchNormalization nodes show.
    """
    with warnings.catch_warnings():
        # The legacy-exporter DeprecationWarning (see module docstring) and the GRU batch-size warning,
        # which does not apply: h is an explicit input with a dynamic batch axis (parity checks B=1,7,64).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        # nn.LSTM/GRU's input-size checks, traced as constants: they only validate, the graph is unaffected.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # PRESERVE on an eval module (the "before" graph) is eval: constant folding mutates nothing trainable.
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        try:
            torch.onnx.export(wrapper, kind.example_inputs(wrapper, card), str(path), dynamo=False,
                              opset_version=OPSET, input_names=wrapper.input_names,
                              output_names=wrapper.output_names, dynamic_axes=kind.dynamic_axes(wrapper),
                              training=torch.onnx.TrainingMode.EVAL if exporter_folds_bn else
                              torch.onnx.TrainingMode.PRESERVE)
        except (torch.onnx.errors.OnnxExporterError, torch.onnx.errors.UnsupportedOperatorError, RuntimeError,
                torch.jit.Error) as e:
            raise GraphError(explain_export_failure(e)) from e
    return check_graph(path) if check else onnx.load(str(path))


def explain_export_failure(error: Exception) -> str:
    """The exporter's complaint, first lines only, with what to do about the usual causes."""
    text = " ".join(str(error).split())[:600]
    hint = ("an operation the ONNX exporter cannot express at opset 17: replace it by standard torch ops in the "
            "network (or an adapter module), or compute it outside the network")
    if "autograd" in text.lower() or "PythonOp" in text or "prim::PythonOp" in text:
        hint = ("a custom torch.autograd.Function has no ONNX form: use the module's plain-torch variant for export "
                "(efficientnet_pytorch: model.set_swish(memory_efficient=False) in your factory)")
    return f"ONNX export failed: {type(error).__name__}: {text}. Likely {hint}"


def check_graph(path: Path) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphError(f"{path.name}: ONNX check failed: {e}") from e
    return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(node.op_type for node in model.graph.node).items()))


def assert_no_bn_dropout(model: onnx.ModelProto) -> None:
    counts = op_counts(model)
    bad = {op: counts[op] for op in ("BatchNormalization", "Dropout") if counts.get(op)}
    if bad:
        raise GraphError(f"exported graph still has {bad}: BatchNorm must be folded and dropout removed")


def io_specs(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """[{"name", "dtype", "shape" (-1 = dynamic)}] for the graph inputs and outputs."""

    def spec(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return {"name": value.name, "dtype": ONNX_DTYPES[tensor.elem_type], "shape": shape}

    initializers = {i.name for i in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]
