"""BatchNorm folding on user networks (export/fold.py): fx path, scale-and-shift, ONNX path, real model zoos.

Every test exports with the pipeline's exporter settings and compares ONNX Runtime with the original
eager module; BN running statistics are randomized so that folding actually changes the numbers.
"""

from __future__ import annotations

import collections
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.fold import FoldError, ScaleShift, finish_onnx_folding, fold_batchnorm_onnx, prepare_for_export

ATOL = 1e-4


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics (and affine parameters) on every BatchNorm; returns the eval model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
    return model.eval()


def export(model: nn.Module, x: torch.Tensor, path: Path,
           mode: torch.onnx.TrainingMode = torch.onnx.TrainingMode.EVAL) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, tracer warnings of third-party models
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, training=mode,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def ops(path: Path | onnx.ModelProto) -> collections.Counter:
    model = onnx.load(str(path)) if isinstance(path, Path) else path
    return collections.Counter(node.op_type for node in model.graph.node)


def assert_parity(reference: nn.Module, path: Path, x: torch.Tensor) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = reference(x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def export_checked(model: nn.Module, x: torch.Tensor, tmp_path: Path, strict_fold: bool = False) -> dict:
    """prepare -> export -> (ONNX folding) -> no BN/Dropout nodes, checker passes, ORT matches eager."""
    prepared, info = prepare_for_export(model, strict_fold=strict_fold)
    path = tmp_path / "model.onnx"
    export(prepared, x, path)
    info = finish_onnx_folding(path, info, strict_fold=strict_fold)
    onnx.checker.check_model(str(path), full_check=True)
    counts = ops(path)
    assert counts["BatchNormalization"] == 0 and counts["Dropout"] == 0, counts
    assert_parity(model, path, x)
    return info


# ---- torch.fx path ---------------------------------------------------------------------------------------

class DenseBlock(nn.Module):
    """DenseNet-style pre-activation: BN on a concatenation, BN after a ReLU, one plain Conv+BN pair."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.bn_relu = nn.BatchNorm2d(8, eps=0.1)  # a large eps, so leaving it out would show
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_bn(self.stem(x))
        x = self.bn_cat(torch.cat([x, self.branch(x)], dim=1))
        return self.head(self.drop(self.bn_relu(self.relu(x))))


def test_densenet_preactivation_becomes_scale_shift(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(DenseBlock())
    info = export_checked(model, torch.randn(2, 3, 6, 6), tmp_path)
    assert info["method"] == "torch.fx"
    assert info["batchnorm_folded"] == ["stem_bn -> stem"]
    assert info["batchnorm_scale_shift"] == ["bn_cat", "bn_relu"]
    assert info["dropout_removed"] == ["drop"]
    counts = ops(tmp_path / "model.onnx")
    assert counts["Mul"] == 2 and counts["Add"] == 2, counts
    assert isinstance(model.bn_cat, nn.BatchNorm2d), "the user's module is left untouched"


def test_prepared_model_prepares_again():
    # A ScaleShift must not break a second fx trace (it is kept a leaf): nothing is left to do.
    prepared, _ = prepare_for_export(randomize_bn(DenseBlock()))
    assert isinstance(prepared.bn_cat, ScaleShift)
    again, info = prepare_for_export(prepared)
    assert info["method"] == "torch.fx" and info["batchnorm_folded"] == info["batchnorm_scale_shift"] == []


def test_strict_fold_names_the_layer_and_its_input():
    with pytest.raises(FoldError, match=r"'bn_cat'.*function cat\(\).*without --strict-fold.*scale-and-shift"):
        prepare_for_export(randomize_bn(DenseBlock()), strict_fold=True)
    relu_then_bn = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3)), ("relu", nn.ReLU()),
                                              ("bn_after_relu", nn.BatchNorm2d(4))])).eval()
    with pytest.raises(FoldError, match=r"'bn_after_relu'.*'relu'"):
        prepare_for_export(relu_then_bn, strict_fold=True)


class SkipFromConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv's raw output is needed too: folding BN into it would change it


def test_conv_feeding_bn_and_skip_is_not_folded(tmp_path):
    torch.manual_seed(1)
    info = export_checked(randomize_bn(SkipFromConv()), torch.randn(2, 3, 5, 5), tmp_path)
    assert info["batchnorm_folded"] == [] and info["batchnorm_scale_shift"] == ["bn"]
    with pytest.raises(FoldError, match=r"'bn'.*'conv', whose output .* is used elsewhere"):
        prepare_for_export(SkipFromConv().eval(), strict_fold=True)


def test_batchnorm1d_on_features_and_sequences(tmp_path):
    torch.manual_seed(2)
    seq = nn.Sequential(OrderedDict([
        ("conv", nn.Conv1d(3, 4, 3)), ("conv_bn", nn.BatchNorm1d(4)),  # [N, C, L], folded
        ("relu", nn.ReLU()), ("plain_bn", nn.BatchNorm1d(4, affine=False)),  # [N, C, L], scale-shift
        ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 5, 6)), ("fc_bn", nn.BatchNorm1d(6)),  # folded
        ("tanh", nn.Tanh()), ("tail_bn", nn.BatchNorm1d(6)),  # [N, C], scale-shift
    ]))
    info = export_checked(randomize_bn(seq), torch.randn(3, 3, 7), tmp_path)
    assert info["batchnorm_folded"] == ["conv_bn -> conv", "fc_bn -> fc"]
    assert info["batchnorm_scale_shift"] == ["plain_bn", "tail_bn"]


def test_batchnorm3d_and_affine_false_fold(tmp_path):
    torch.manual_seed(3)
    vol = nn.Sequential(OrderedDict([
        ("conv", nn.Conv3d(2, 3, 2)), ("bn", nn.BatchNorm3d(3, affine=False)),
        ("relu", nn.ReLU()), ("bn_relu", nn.BatchNorm3d(3)),
        ("up", nn.ConvTranspose3d(3, 2, 2)), ("up_bn", nn.BatchNorm3d(2)),
    ]))
    info = export_checked(randomize_bn(vol), torch.randn(2, 2, 4, 4, 4), tmp_path)
    assert info["batchnorm_folded"] == ["bn -> conv", "up_bn -> up"]
    assert info["batchnorm_scale_shift"] == ["bn_relu"]


def test_batch_statistics_batchnorm_is_refused():
    # track_running_stats=False normalizes each batch by itself even in eval: no fixed map to export.
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 2, 3)),
                                       ("bn", nn.BatchNorm2d(2, track_running_stats=False))]))
    with pytest.raises(FoldError, match=r"'bn'.*track_running_stats=False"):
        prepare_for_export(model.eval())


# ---- ONNX path -------------------------------------------------------------------------------------------

class Untraceable(nn.Module):
    """Branches on the input's rank (fx cannot), with a Conv+BN pair, a BN after ReLU, a grouped
    ConvTranspose+BN (the exporter does not fold that one) and a Linear+BatchNorm1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(4, eps=0.1)
        self.up = nn.ConvTranspose2d(4, 6, 2, groups=2)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)
        self.bn4 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x = self.bn3(self.up(self.bn2(self.relu(self.bn1(self.conv(x))))))
        return self.bn4(self.fc(x.mean(dim=(2, 3))))


def test_untraceable_model_folds_in_onnx(tmp_path):
    torch.manual_seed(4)
    model = randomize_bn(Untraceable())
    x = torch.randn(2, 3, 6, 6)
    prepared, info = prepare_for_export(model)
    assert info["method"] == "onnx" and "control flow" in info["fx_error"]
    assert isinstance(prepared.bn2, nn.BatchNorm2d), "BNs stay in the module for the ONNX pass"
    path = tmp_path / "model.onnx"
    export(prepared, x, path)
    assert ops(path)["BatchNormalization"] == 3, "the exporter folded conv+bn1 only; the rest is ours"
    info = finish_onnx_folding(path, info)
    counts = ops(path)
    assert counts["BatchNormalization"] == 0 and counts["Mul"] == 1 and counts["Add"] == 1, counts
    assert info["batchnorm_folded"] == ["/bn3/BatchNormalization -> /up/ConvTranspose",
                                        "/bn4/BatchNormalization -> /fc/Gemm"]  # Linear+BatchNorm1d: into the Gemm
    assert info["batchnorm_scale_shift"] == ["/bn2/BatchNormalization"]
    onnx.checker.check_model(str(path), full_check=True)
    assert_parity(model, path, x)
    assert_parity(model, path, torch.randn(5, 3, 6, 6))  # dynamic batch still right


def test_untraceable_strict_fold_fails_on_the_onnx_node(tmp_path):
    prepared, info = prepare_for_export(randomize_bn(Untraceable()), strict_fold=True)
    path = tmp_path / "model.onnx"
    export(prepared, torch.randn(2, 3, 6, 6), path)
    before = path.read_bytes()
    with pytest.raises(FoldError, match=r"'/bn2/BatchNormalization'.*Relu.*without --strict-fold"):
        finish_onnx_folding(path, info, strict_fold=True)
    assert path.read_bytes() == before, "a failed fold leaves the file alone"


class ConvStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=0.1)  # a large eps, so leaving it out would show
        self.up = nn.ConvTranspose2d(4, 4, 2, groups=4)
        self.up_bn = nn.BatchNorm2d(4, affine=False)
        self.skip_conv = nn.Conv2d(4, 4, 1)
        self.skip_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip_conv(self.up_bn(self.up(self.bn(self.conv(x)))))
        return self.skip_bn(y) + y


def test_fold_batchnorm_onnx_folds_convs_the_exporter_kept(tmp_path):
    # PRESERVE turns the exporter's own Conv+BN folding off, so our ONNX arithmetic does every fold.
    torch.manual_seed(5)
    model = randomize_bn(ConvStack())
    x = torch.randn(2, 3, 5, 5)
    path = tmp_path / "raw.onnx"
    export(model, x, path, mode=torch.onnx.TrainingMode.PRESERVE)
    raw = onnx.load(str(path))
    assert ops(raw)["BatchNormalization"] == 3
    folded_model, folded, scale_shift = fold_batchnorm_onnx(raw)
    assert folded == ["/bn/BatchNormalization -> /conv/Conv", "/up_bn/BatchNormalization -> /up/ConvTranspose"]
    assert scale_shift == ["/skip_bn/BatchNormalization"]  # its conv's output also feeds the Add
    assert ops(raw)["BatchNormalization"] == 3, "the input model is not modified"
    counts = ops(folded_model)
    assert counts["BatchNormalization"] == 0 and counts["Mul"] == 1 and counts["Add"] == 2, counts
    onnx.save(folded_model, str(tmp_path / "folded.onnx"))
    onnx.checker.check_model(str(tmp_path / "folded.onnx"), full_check=True)
    assert_parity(model, tmp_path / "folded.onnx", x)


# ---- third-party model zoos --------------------------------------------------------------------------------

def test_efficientnet_pytorch(tmp_path):
    efficientnet = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(6)
    model = efficientnet.EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=64)
    model.set_swish(memory_efficient=False)  # the memory-efficient Swish is a custom autograd Function
    info = export_checked(randomize_bn(model), torch.randn(2, 3, 64, 64), tmp_path)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # Its convs are Conv2d subclasses (static same padding): each BN is folded into the exported Conv node.
    assert info["method"] == "torch.fx+onnx" and len(info["deferred_to_onnx"]) == n_bn
    assert info["batchnorm_scale_shift"] == [], "every BN follows a conv"
    assert len(info["batchnorm_folded"]) + info["batchnorm_folded_by_exporter"] == n_bn


class Logits(nn.Module):
    """HF models return an output object; export needs a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def test_transformers_resnet(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       num_labels=10)
    model = randomize_bn(Logits(transformers.ResNetForImageClassification(config)))
    info = export_checked(model, torch.randn(2, 3, 32, 32), tmp_path)
    # fx fails (the embedder checks the channel count in Python); every BN follows a conv used only
    # there, so the exporter's own eval-mode folding leaves the ONNX pass nothing to do
    assert info["method"] == "onnx" and "control flow" in info["fx_error"]
