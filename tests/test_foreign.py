"""export/foreign.py on ONNX files made without our exporter: hand-built with onnx.helper, and one from a
plain torch.onnx.export with no dynamic axes (fixed batch 1), as another team would hand them over."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export.foreign import (
    NO_REFERENCE,
    ForeignGraphError,
    batch_consistency,
    check_io,
    fixed_batch_inputs,
    inspect_graph,
    make_batch_dynamic,
    prepare_foreign,
)
from export.parity import cpu_session

CLASSES = 10
DECLARED = {"pixel_values": {"side": "input", "dtype": "float32", "rank": 4, "batch_axis": 0},
            "scores": {"side": "output", "dtype": "float32", "rank": 2, "batch_axis": 0}}


def feeds(n: int) -> dict[str, np.ndarray]:
    return {"pixel_values": np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    # ir_version 8 / opset 17: what a typical exporter of the last few years stamps.
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), str(path))
    return path


def classifier(path: Path, batch: int | str = "batch", reshape_to: list[int] | None = None,
               extra_inputs: tuple[onnx.ValueInfoProto, ...] = ()) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten (or Reshape to a constant) -> Gemm: pixel_values -> scores."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("conv_w", (4, 3, 3, 3)), ("conv_b", (4,)), ("fc_w", (4, CLASSES)),
                                   ("fc_b", (CLASSES,)))]
    if reshape_to is None:
        flatten = [helper.make_node("Flatten", ["pooled"], ["flat"], axis=1)]
    else:  # the batch size baked in as a constant target shape
        weights.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "target"))
        flatten = [helper.make_node("Reshape", ["pooled", "target"], ["flat"])]
    nodes = [helper.make_node("Conv", ["pixel_values", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
             *flatten,
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"])]
    graph = helper.make_graph(nodes, "foreign_classifier",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, 8, 8]),
                               *extra_inputs],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, CLASSES])],
                              initializer=weights)
    return save(graph, path)


class TorchClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def torch_graph(tmp_path_factory) -> tuple[Path, nn.Module]:
    """(d): exported by plain torch.onnx.export, no dynamic_axes: the batch of 1 is fixed in the signature."""
    torch.manual_seed(0)
    module = TorchClassifier().eval()
    path = tmp_path_factory.mktemp("torch") / "torch_fixed.onnx"
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter, as export/graph.py explains
        torch.onnx.export(module, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["scores"])
    return path, module


def test_dynamic_graph_passes_and_is_copied_byte_for_byte(tmp_path):
    src = classifier(tmp_path / "dynamic.onnx")
    dst = tmp_path / "out" / "model.onnx"
    cert = prepare_foreign(src, dst, DECLARED, feeds, make_dynamic=False, reference_npz=None)
    assert cert["passed"] and cert["reference"] == NO_REFERENCE and not cert["batch_made_dynamic"]
    assert dst.read_bytes() == src.read_bytes()
    checks = [c["check"] for c in cert["checks"]]
    assert any("onnx.checker" in c for c in checks) and any("onnxruntime" in c for c in checks)
    assert any(c.startswith("batch consistency") for c in checks)
    consistency = next(c for c in cert["checks"] if c["check"].startswith("batch consistency"))
    assert consistency["batch"] == 5 and consistency["outputs"]["scores"]["max_abs"] <= 1e-4
    assert cert["checks"][-1]["check"] == "reference parity" and "no reference" in cert["checks"][-1]["skipped"]
    assert cert["io"] == {"inputs": [{"name": "pixel_values", "dtype": "float32", "shape": [-1, 3, 8, 8]}],
                          "outputs": [{"name": "scores", "dtype": "float32", "shape": [-1, CLASSES]}]}
    assert [p.name for p in dst.parent.iterdir()] == ["model.onnx"]  # no temp file left behind


def test_fixed_batch_refused_without_make_dynamic(tmp_path):
    src = classifier(tmp_path / "fixed.onnx", batch=1)
    assert fixed_batch_inputs(inspect_graph(src), DECLARED) == [("pixel_values", 0, 1), ("scores", 0, 1)]
    with pytest.raises(ForeignGraphError) as e:
        prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=False, reference_npz=None)
    message = str(e.value)
    assert "fixed batch of 1 on input pixel_values" in message
    assert "--make-batch-dynamic" in message and "dynamic_axes=" in message
    assert not (tmp_path / "model.onnx").exists()


def test_fixed_batch_made_dynamic_and_verified(tmp_path):
    dst = tmp_path / "model.onnx"
    cert = prepare_foreign(classifier(tmp_path / "fixed.onnx", batch=1), dst, DECLARED, feeds, make_dynamic=True,
                           reference_npz=None)
    assert cert["batch_made_dynamic"]
    assert cert["io"]["inputs"][0]["shape"] == [-1, 3, 8, 8] and cert["io"]["outputs"][0]["shape"] == [-1, CLASSES]
    written = onnx.load(str(dst))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert cpu_session(dst).run(None, feeds(7))[0].shape == (7, CLASSES)


def test_torch_export_with_fixed_batch_made_dynamic(tmp_path, torch_graph):
    src, module = torch_graph
    assert fixed_batch_inputs(inspect_graph(src), DECLARED) == [("pixel_values", 0, 1), ("scores", 0, 1)]
    cert = prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=True, reference_npz=None)
    consistency = next(c for c in cert["checks"] if c["check"].startswith("batch consistency"))
    assert cert["batch_made_dynamic"] and consistency["outputs"]["scores"]["max_abs"] <= 1e-4
    # The rewritten graph still computes the module's function at batch 7.
    x = feeds(7)["pixel_values"]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cpu_session(tmp_path / "model.onnx").run(None, {"pixel_values": x})[0], expected,
                               atol=1e-5)


def test_reshape_with_baked_batch_refused_even_with_make_dynamic(tmp_path):
    src = classifier(tmp_path / "baked.onnx", batch=1, reshape_to=[1, -1])
    with pytest.raises(ForeignGraphError, match="baked into the graph's ops") as e:
        prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=True, reference_npz=None)
    assert "dynamic_axes=" in str(e.value)
    assert list(tmp_path.iterdir()) == [src]  # neither dst nor the temp file


def test_dynamic_signature_over_baked_reshape_refused(tmp_path):
    """The signature says "batch" but the ops say 1: shape inference shows it, and running batch N proves it."""
    src = classifier(tmp_path / "lying.onnx", reshape_to=[1, -1])
    assert fixed_batch_inputs(inspect_graph(src), DECLARED) == [("scores", 0, 1)]
    for make_dynamic in (False, True):
        with pytest.raises(ForeignGraphError, match="output scores a fixed batch of 1 .* baked into the graph's ops"):
            prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic, reference_npz=None)
    with pytest.raises(ForeignGraphError, match="runs at batch 1 but fails at batch 5.*baked into"):
        batch_consistency(src, DECLARED, feeds)


def test_rows_that_depend_on_each_other_refused(tmp_path):
    """scores = x - mean over the batch: runs at any batch, but a row's result depends on its neighbours."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["mean"], axes=[0]),
         helper.make_node("Sub", ["pixel_values", "mean"], ["centered"]),
         helper.make_node("Flatten", ["centered"], ["scores"], axis=1)], "batch_mixing",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 192])])
    src = save(graph, tmp_path / "mixing.onnx")
    with pytest.raises(ForeignGraphError, match=r"output scores row \d differs by .* baked into"):
        batch_consistency(src, DECLARED, feeds)


def test_missing_declared_output_lists_the_actual_ones(tmp_path):
    model = inspect_graph(classifier(tmp_path / "dynamic.onnx"))
    declared = {**DECLARED, "logits": {"side": "output", "dtype": "float32", "rank": 2, "batch_axis": 0}}
    with pytest.raises(ForeignGraphError) as e:
        check_io(model, declared)
    message = str(e.value)
    assert "logits: declared output not in the graph" in message
    assert "graph outputs: scores float32 ['batch', 10]" in message
    assert "graph inputs: pixel_values float32 ['batch', 3, 8, 8]" in message


@pytest.mark.parametrize("change, expected", [
    ({"pixel_values": {"dtype": "float16"}}, "pixel_values: declared float16 but the graph's input is float32"),
    ({"scores": {"rank": 3}}, "scores: declared rank 3 but the graph's output has rank 2"),
    ({"scores": {"side": "input"}}, "scores: declared as an input but the graph has it as an output"),
    ({"scores": {"dtype": "float64"}}, "scores: the declaration"),
])
def test_declaration_mismatch(tmp_path, change, expected):
    model = inspect_graph(classifier(tmp_path / "dynamic.onnx"))
    declared = {name: {**spec, **change.get(name, {})} for name, spec in DECLARED.items()}
    with pytest.raises(ForeignGraphError, match="fix") as e:
        check_io(model, declared)
    assert expected in str(e.value)


def test_unsupported_dtype_named(tmp_path):
    graph = helper.make_graph([helper.make_node("Cast", ["pixel_values"], ["scores"], to=TensorProto.FLOAT)],
                              "double_input",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.DOUBLE, ["batch", 4])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])])
    model = inspect_graph(save(graph, tmp_path / "double.onnx"))
    with pytest.raises(ForeignGraphError, match=r"unsupported tensor dtypes: pixel_values \(double\); nnserve serves "
                                                r"float32, int64, float16, int32"):
        check_io(model, DECLARED)


def test_undeclared_graph_input_named(tmp_path):
    temperature = helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1])
    model = inspect_graph(classifier(tmp_path / "extra.onnx", extra_inputs=(temperature,)))
    with pytest.raises(ForeignGraphError, match=r"graph inputs \['temperature'\] are not declared"):
        check_io(model, DECLARED)
    assert check_io(model, {**DECLARED, "temperature": {"side": "input", "dtype": "float32", "rank": 1}})


def test_checker_failures(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not a protobuf \xff\xff")
    with pytest.raises(ForeignGraphError, match="the ONNX checker rejects it: Unable to parse proto"):
        inspect_graph(garbage)
    unsorted = helper.make_graph([helper.make_node("Relu", ["undefined"], ["scores"])], "dangling",
                                 [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1])],
                                 [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1])])
    with pytest.raises(ForeignGraphError, match="checker rejects it: .*input 'undefined' of node"):
        inspect_graph(save(unsorted, tmp_path / "dangling.onnx"))


def test_opset_this_onnxruntime_cannot_load(tmp_path):
    """The checker accepts an opset newer than onnx's release; onnxruntime refuses it, and the message says so."""
    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["scores"])], "future",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1])])
    future = onnx.defs.onnx_opset_version() + 1
    with pytest.raises(ForeignGraphError, match=rf"cannot load it \(IR version 8, opsets \{{'ai.onnx': {future}\}}\)"):
        inspect_graph(save(graph, tmp_path / "future.onnx", opset=future))


def reference(module: nn.Module, n: int = 4) -> dict[str, np.ndarray]:
    x = feeds(n)["pixel_values"]
    with torch.no_grad():
        return {"pixel_values": x, "scores": module(torch.from_numpy(x)).numpy()}


def test_reference_npz_parity_passes(tmp_path, torch_graph):
    src, module = torch_graph
    np.savez(tmp_path / "ref.npz", **reference(module))
    cert = prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=True,
                           reference_npz=tmp_path / "ref.npz")
    parity = cert["checks"][-1]
    assert cert["reference"] == f"reference outputs from {tmp_path / 'ref.npz'}"
    assert parity["passed"] and parity["worst_output"] == "scores" and parity["max_abs"] <= 1e-5


def test_reference_npz_parity_fails_with_worst_output_and_row(tmp_path, torch_graph):
    src, module = torch_graph
    ref = reference(module)
    ref["scores"][3, 7] += 0.5
    np.savez(tmp_path / "ref.npz", **ref)
    with pytest.raises(ForeignGraphError, match=r"output scores max abs error 0\.5 \(tolerance 0\.0001\), max rel "
                                                r"error [0-9.e-]+, at batch row 3, element \(3, 7\)"):
        prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=True,
                        reference_npz=tmp_path / "ref.npz")
    assert not (tmp_path / "model.onnx").exists()


def test_reference_npz_bad_keys_and_pickles(tmp_path, torch_graph):
    src, module = torch_graph
    unknown = r"names unknown tensors \['probabilities'\]"
    for name, arrays, expected in (
            ("unknown", {**reference(module), "probabilities": np.zeros(3)}, unknown),
            ("no_input", {"scores": reference(module)["scores"]}, r"lacks inputs \['pixel_values'\]"),
            ("float64", {**reference(module), "pixel_values": feeds(4)["pixel_values"].astype(np.float64)},
             r"fails on the inputs of float64.npz: .*tensor\(float\)"),
            ("pickled", {**reference(module), "meta": np.array([{"a": 1}], dtype=object)}, "not a readable .npz")):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ForeignGraphError, match=expected):
            prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=True,
                            reference_npz=tmp_path / f"{name}.npz")


def test_make_batch_dynamic_leaves_the_caller_model_alone(tmp_path):
    model = inspect_graph(classifier(tmp_path / "fixed.onnx", batch=1))
    rewritten = make_batch_dynamic(model, DECLARED)
    assert fixed_batch_inputs(rewritten, DECLARED) == []
    assert fixed_batch_inputs(model, DECLARED) == [("pixel_values", 0, 1), ("scores", 0, 1)]
    # Stale intermediate shapes were dropped and recomputed: the pooled activations are [batch, 4, 1, 1] now.
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in rewritten.graph.value_info}
    assert shapes["pooled"] == ["batch", 4, 1, 1]


# ---- graphs as other frameworks write them (issue 28) -------------------------------------------------------

def test_a_batch_written_as_minus_one_is_dynamic(tmp_path):
    """PaddlePaddle (paddle2onnx) writes a dynamic batch as dim_value -1: dynamic, not "a fixed batch of -1"."""
    src = classifier(tmp_path / "paddle.onnx", batch=-1)
    assert onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    assert fixed_batch_inputs(inspect_graph(src), DECLARED) == []
    dst = tmp_path / "out" / "model.onnx"
    cert = prepare_foreign(src, dst, DECLARED, feeds, make_dynamic=False, reference_npz=None)
    assert cert["passed"] and not cert["batch_made_dynamic"]
    assert cert["unknown_dims_made_symbolic"] == [["pixel_values", 0], ["scores", 0]]
    written = onnx.load(str(dst))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert written.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert cert["io"]["inputs"][0]["shape"] == [-1, 3, 8, 8]
    rewrite = next(c for c in cert["checks"] if c["check"].startswith("rewritten graph vs the original"))
    assert rewrite["outputs"]["scores"]["max_abs"] == 0.0, "only the signature changed"
    assert cpu_session(dst).run(None, feeds(7))[0].shape == (7, CLASSES)


def test_a_fixed_batch_above_one_names_make_batch_dynamic(tmp_path):
    src = classifier(tmp_path / "fixed4.onnx", batch=4)
    with pytest.raises(ForeignGraphError) as e:
        prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=False, reference_npz=None)
    assert "fixed batch of 4 on input pixel_values" in str(e.value)
    assert "pass --make-batch-dynamic (or set \"make_batch_dynamic\": true" in str(e.value)
    cert = prepare_foreign(src, tmp_path / "model.onnx", DECLARED, feeds, make_dynamic=True, reference_npz=None)
    assert cert["batch_made_dynamic"] and cpu_session(tmp_path / "model.onnx").run(None, feeds(3))[0].shape == (3, 10)
    rewrite = next(c for c in cert["checks"] if c["check"].startswith("rewritten graph vs the original"))
    assert rewrite["batch"] == 4, "the original ran at its own fixed batch"


def bn_node(name: str, x: str, y: str, channels: int, seed: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    rng = np.random.default_rng(seed)
    params = {"scale": rng.uniform(0.5, 2, channels), "bias": rng.standard_normal(channels),
              "mean": rng.standard_normal(channels), "var": rng.uniform(0.2, 3, channels)}
    tensors = [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in params.items()]
    node = helper.make_node("BatchNormalization", [x, *(t.name for t in tensors)], [y], name=name, epsilon=1e-3)
    return node, tensors


def paddle_like_with_bn(path: Path) -> Path:
    """Conv -> BN -> Relu -> BN (nothing to fold into) -> pool -> Gemm(transB) -> BN, batch written as -1."""
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("conv_w", (4, 3, 3, 3)), ("fc_w", (CLASSES, 4)), ("fc_b", (CLASSES,)))]
    bns = [bn_node("bn_conv", "conv", "conv_bn", 4, 2), bn_node("bn_relu", "relu", "relu_bn", 4, 3),
           bn_node("bn_fc", "fc", "scores", CLASSES, 4)]
    nodes = [helper.make_node("Conv", ["pixel_values", "conv_w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             bns[0][0], helper.make_node("Relu", ["conv_bn"], ["relu"], name="relu"), bns[1][0],
             helper.make_node("GlobalAveragePool", ["relu_bn"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], name="fc", transB=1, beta=0.5), bns[2][0]]
    graph = helper.make_graph(nodes, "paddle_like",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [-1, 3, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [-1, CLASSES])],
                              initializer=weights + [t for _, ts in bns for t in ts])
    return save(graph, path)


def test_batchnorm_in_a_foreign_graph_folds_into_conv_and_gemm(tmp_path):
    src = paddle_like_with_bn(tmp_path / "bn.onnx")
    dst = tmp_path / "model.onnx"
    cert = prepare_foreign(src, dst, DECLARED, feeds, make_dynamic=False, reference_npz=None)
    folding = cert["folding"]
    assert folding["batchnorm_nodes"] == 3
    assert folding["batchnorm_folded"] == ["bn_conv -> conv", "bn_fc -> fc"]
    assert folding["batchnorm_scale_shift"] == ["bn_relu"]
    assert "Relu node 'relu'" in folding["not_folded_because"]["bn_relu"]
    counts = collections.Counter(n.op_type for n in onnx.load(str(dst)).graph.node)
    assert counts["BatchNormalization"] == 0 and counts["Mul"] == 1 and counts["Add"] == 1, counts
    rewrite = next(c for c in cert["checks"] if c["check"].startswith("rewritten graph vs the original"))
    assert rewrite["outputs"]["scores"]["max_abs"] <= 1e-5
    x = feeds(6)
    np.testing.assert_allclose(cpu_session(dst).run(None, x)[0], cpu_session(src).run(None, x)[0], atol=1e-5)


def test_strict_fold_refuses_a_foreign_bn_with_nothing_to_fold_into(tmp_path):
    from export.fold import FoldError

    with pytest.raises(FoldError, match="'bn_relu' cannot be folded: its input comes from Relu node 'relu'"):
        prepare_foreign(paddle_like_with_bn(tmp_path / "bn.onnx"), tmp_path / "model.onnx", DECLARED, feeds,
                        make_dynamic=False, reference_npz=None, strict_fold=True)
    assert not (tmp_path / "model.onnx").exists()


def test_a_card_size_other_than_the_graphs_fixed_size_is_named(tmp_path):
    declared = {**DECLARED, "pixel_values": {**DECLARED["pixel_values"], "shape": [None, 3, 16, 16],
                                             "shape_from": "preprocessing"}}
    with pytest.raises(ForeignGraphError, match=r"pixel_values: the graph's input is \['batch', 3, 8, 8\] but the "
                                                r"card makes \['N', 3, 16, 16\]: fix the card \(preprocessing\)"):
        check_io(inspect_graph(classifier(tmp_path / "g.onnx")), declared)
    widthless = {**DECLARED, "pixel_values": {**DECLARED["pixel_values"], "shape": [None, 3, 8, 8]}}
    assert check_io(inspect_graph(classifier(tmp_path / "g.onnx")), widthless)["inputs"][0]["shape"] == [-1, 3, 8, 8]
