"""A model as a PaddleOCR user brings it (issue 28): a text-direction classifier exported by another framework,
its dynamic batch and width written as -1, BatchNorm nodes still in the graph, trained on OpenCV's BGR images
resized to height 48 keeping the aspect ratio and padded to width 192. Exported through docs/your-model.md's
card alone and served by the real server; every answer equals PaddleOCR's own preprocessing + the original graph.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import bentoml
import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from export.graph import op_counts
from export.parity import cpu_session
from export.pipeline import Options, export_artifact

HEIGHT, MAX_WIDTH = 48, 192
CARD = {"format": "nnserve.artifact/2", "name": "text_direction", "kind": "image_classifier",
        "onnx": {"file": "inference.onnx", "inputs": {"image": "x"}, "outputs": {"scores": "softmax_0.tmp_0"}},
        "labels": ["0", "180"], "scores": "probabilities",
        "preprocessing": {"channels": 3, "channel_order": "BGR", "resize": {"height": HEIGHT, "max_width": MAX_WIDTH},
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "pad_value": 0.5}}


class DirectionNet(nn.Module):
    """Small, but with what matters: Conv+BN pairs, a dynamic width, a global pool over the padded line."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(torch.flatten(self.features(x), 1)), dim=1)


def paddle_like_onnx(path: Path) -> None:
    torch.manual_seed(0)
    net = DirectionNet().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    torch.onnx.export(net, (torch.zeros(1, 3, HEIGHT, MAX_WIDTH),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["softmax_0.tmp_0"],
                      dynamic_axes={"x": {0: "b", 3: "w"}, "softmax_0.tmp_0": {0: "b"}},
                      training=torch.onnx.TrainingMode.PRESERVE)  # BN nodes kept, as Paddle's exporter keeps them
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:  # paddle2onnx's way of saying "dynamic"
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = -1
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def paddleocr_input(png: bytes) -> np.ndarray:
    """PaddleOCR's ClsPredictor: cv2.imdecode (BGR) -> resize_norm_img, with Pillow's bilinear for cv2.resize."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = rgb.shape[:2]
    ratio = w / float(h)
    resized_w = MAX_WIDTH if np.ceil(HEIGHT * ratio) > MAX_WIDTH else int(np.ceil(HEIGHT * ratio))
    resized = np.asarray(Image.fromarray(rgb).resize((resized_w, HEIGHT), Image.Resampling.BILINEAR))[..., ::-1]
    resized = (resized.astype("float32").transpose((2, 0, 1)) / 255 - 0.5) / 0.5
    padded = np.zeros((3, HEIGHT, MAX_WIDTH), dtype=np.float32)
    padded[:, :, :resized_w] = resized
    return padded


def text_line_png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    page = np.full((height, width, 3), 235, np.uint8)
    for x in range(2, width - 6, 9):  # dark "letters" of varying ink on a light line, coloured so BGR matters
        page[height // 4: 3 * height // 4, x:x + 5] = rng.integers(0, 120, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def text_direction(session_dir) -> tuple[Path, str, dict]:
    folder = session_dir / "text-direction"
    folder.mkdir(exist_ok=True)
    paddle_like_onnx(folder / "inference.onnx")
    (folder / "card.json").write_text(json.dumps(CARD, indent=2))
    result = export_artifact(folder, Options(bench_runs=3, report_dir=session_dir / "exported"))
    return folder, result.tags["fp32"], result.report


def test_paddle_style_graph_exports_with_its_batchnorm_folded(text_direction):
    folder, tag, report = text_direction
    assert op_counts(onnx.load(str(folder / "inference.onnx")))["BatchNormalization"] == 2
    assert report["folding"]["batchnorm_folded"] == [
        "/features/features.1/BatchNormalization -> /features/features.0/Conv",
        "/features/features.4/BatchNormalization -> /features/features.3/Conv"]
    assert report["nodes"]["ops_before_folding"]["BatchNormalization"] == 2
    assert report["parity"]["unknown_dims_made_symbolic"] == [["x", 0], ["x", 3], ["softmax_0.tmp_0", 0]]
    assert not report["parity"]["batch_made_dynamic"], "a -1 batch is dynamic already"
    meta = bentoml.models.get(tag).info.metadata
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 3, 48, -1]}]
    served = onnx.load(bentoml.models.get(tag).path_of("model.onnx"))
    assert op_counts(served).get("BatchNormalization", 0) == 0


@pytest.mark.integration
def test_bgr_text_lines_are_served_as_paddleocr_preprocesses_them(text_direction, own_server, session_dir):
    import requests
    import yaml

    folder, tag, _ = text_direction
    config = session_dir / "text-direction.yaml"
    config.write_text(yaml.safe_dump({"models": {"text_direction": {"tag": tag}}}))
    original = cpu_session(folder / "inference.onnx")
    lines = [text_line_png(w, h, seed) for seed, (w, h) in enumerate([(40, 32), (120, 40), (192, 48), (700, 36),
                                                                      (30, 60)])]
    with own_server("text-direction", {"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_WORKERS": "1"}) as server:
        for png in lines:
            r = requests.post(f"{server.http_url}/classify", files={"image": png}, data={"top_k": "2"}, timeout=60)
            assert r.status_code == 200, (r.text, server.log()[-2000:])
            served = {p["label"]: p["probability"] for p in r.json()["predictions"]}
            want = original.run(None, {"x": paddleocr_input(png)[None]})[0][0]
            np.testing.assert_allclose([served["0"], served["180"]], want, atol=1e-5)
