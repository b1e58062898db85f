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

import onnx
import torch
from torch import nn

log = logging.getLogger("nnserve.export")

OPSET = 17
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript exporter)"
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
               onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32"}


class GraphError(ValueError):
    """The exported graph fails the checker, shape inference, or still holds BN/Dropout nodes."""


class ImageClassifier(nn.Module):
    """input -> logits."""

    input_names, output_names = ["input"], ["logits"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ImageFeatureExtractor(ImageClassifier):
    """input -> (logits, fc7): one graph so classification and feature extraction share the weights."""

    output_names = ["logits", "fc7"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_fc7(x)


class CharLSTM(nn.Module):
    """(tokens, h, c) -> (logits, h_out, c_out): the state is explicit so the service owns it."""

    input_names, output_names = ["tokens", "h", "c"], ["logits", "h_out", "c_out"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        logits, (h_out, c_out) = self.model(tokens, (h, c))
        return logits, h_out, c_out


class CharGRU(CharLSTM):
    input_names, output_names = ["tokens", "h"], ["logits", "h_out"]

    def forward(self, tokens: torch.Tensor, h: torch.Tensor):
        return self.model(tokens, h)


def wrap(model: nn.Module, card: dict) -> nn.Module:
    """The export wrapper for the card's kind, in eval mode."""
    kind, arch = card["kind"], card["config"]["arch"]
    if kind == "image_classifier":
        return ImageClassifier(model).eval()
    if kind == "image_feature_extractor":
        return ImageFeatureExtractor(model).eval()
    if kind == "char_lm":
        return (CharLSTM(model) if model.cell == "lstm" else CharGRU(model)).eval()
    raise GraphError(f"unknown model kind {kind!r} (arch {arch!r})")


def example_inputs(wrapper: nn.Module, card: dict, batch: int = 2, seq_len: int = 5) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with; batch 2 (not 1) so no exporter specializes a dimension to 1."""
    if card["kind"] == "char_lm":
        rnn = wrapper.model
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        state = torch.zeros(rnn.num_layers, batch, rnn.hidden_size)
        return (tokens, state, state.clone()) if "c" in wrapper.input_names else (tokens, state)
    spec = card["preprocessing"]
    return (torch.zeros(batch, spec["channels"], spec["input_size"], spec["input_size"]),)


def dynamic_axes(wrapper: nn.Module) -> dict[str, dict[int, str]]:
    """Batch is dynamic everywhere; the RNN sequence axis too; state tensors are [layers, B, hidden]."""
    axes: dict[str, dict[int, str]] = {}
    for name in wrapper.input_names + wrapper.output_names:
        if name in ("h", "c", "h_out", "c_out"):
            axes[name] = {1: "batch"}
        elif name in ("tokens", "logits") and isinstance(wrapper, CharLSTM):
            axes[name] = {0: "batch", 1: "seq"}
        else:
            axes[name] = {0: "batch"}
    return axes


def export_onnx(wrapper: nn.Module, card: dict, path: Path, check: bool = True,
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
        torch.onnx.export(wrapper, example_inputs(wrapper, card), str(path), dynamo=False,
                          opset_version=OPSET, input_names=wrapper.input_names,
                          output_names=wrapper.output_names, dynamic_axes=dynamic_axes(wrapper),
                          training=torch.onnx.TrainingMode.EVAL if exporter_folds_bn else
                          torch.onnx.TrainingMode.PRESERVE)
    return check_graph(path) if check else onnx.load(str(path))


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
