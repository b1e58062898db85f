"""Artifacts of networks not written in nnserve, made the way docs/your-model.md shows, at tiny sizes:

- ``effnet_digits``: efficientnet_pytorch's EfficientNet-B0, fine-tuned a few steps on UCI digits
  (``python -m models.finetune``), image classifier;
- ``resnet_digits``: a transformers ResNet from the user's factory file (forward returns an output object),
  image feature extractor on ``resnet.pooler``;
- ``word_gru``: a PyTorch-examples-style word-level GRU LM (time-major, flattened log-probabilities), weights
  saved with ``torch.save(state_dict)`` (.pt, loaded with weights_only=True);
- ``elsewhere_cnn``: an ONNX file "made elsewhere" with a fixed batch of 1, its own tensor names and a
  reference .npz;
- ``keras_like``: an ONNX file "made elsewhere" that takes channels-last (NHWC) RGB images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent
WORDS_TEXT = ("the cat sat on the mat . the dog sat on the log . the cat ate the fish . "
              "a dog saw a cat on the mat . the fish saw the dog . ") * 4


def effnet(out: Path) -> Path:
    from models.finetune import main as finetune

    return finetune(["--factory", "efficientnet_pytorch:EfficientNet.from_name", "--kwargs",
                     json.dumps({"model_name": "efficientnet-b0", "num_classes": 10, "image_size": 32}),
                     "--name", "effnet_digits", "--out", str(out), "--size", "32", "--max-steps", "3"])


def hf_resnet(out: Path) -> Path:
    from models.finetune import main as finetune

    return finetune(["--factory", "my_resnet:build", "--kwargs", json.dumps({"num_labels": 10}),
                     "--code", str(HERE / "my_resnet.py"), "--name", "resnet_digits", "--out", str(out),
                     "--size", "32", "--features-module", "resnet.pooler", "--max-steps", "20"])


def word_gru(out: Path) -> Path:
    from tests.user_models.word_lm import RNNModel

    vocab = sorted(set(WORDS_TEXT.split()))
    torch.manual_seed(0)
    kwargs = {"rnn_type": "GRU", "ntoken": len(vocab), "ninp": 16, "nhid": 32, "nlayers": 2}
    model = RNNModel(**kwargs)
    out.mkdir(parents=True)
    torch.save(model.state_dict(), out / "weights.pt")
    shutil.copy2(HERE / "word_lm.py", out / "word_lm.py")
    (out / "eval.txt").write_text(WORDS_TEXT)
    card = {"format": "nnserve.artifact/2", "name": "word_gru", "kind": "sequence_lm",
            "config": {"factory": "word_lm:RNNModel", "kwargs": kwargs}, "weights": "weights.pt",
            "vocab": vocab, "lm": {"batch_first": False, "separator": " "}, "scores": "log_probabilities"}
    (out / "card.json").write_text(json.dumps(card, indent=2))
    return out


class ElsewhereCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(torch.flatten(x, 1))


def elsewhere_cnn(out: Path) -> tuple[Path, nn.Module]:
    """Exported by "another team" with a fixed batch of 1 and their own tensor names."""
    torch.manual_seed(0)
    model = ElsewhereCNN().eval()
    out.mkdir(parents=True)
    x = torch.randn(1, 1, 8, 8)
    torch.onnx.export(model, (x,), str(out / "cnn.onnx"), dynamo=False, opset_version=17,
                      input_names=["pixels"], output_names=["class_scores"])
    with torch.no_grad():
        np.savez(out / "reference.npz", pixels=x.numpy(), class_scores=model(x).numpy())
    card = {"format": "nnserve.artifact/2", "name": "elsewhere_cnn", "kind": "image_classifier",
            "onnx": {"file": "cnn.onnx", "inputs": {"image": "pixels"}, "outputs": {"scores": "class_scores"},
                     "reference": "reference.npz", "make_batch_dynamic": True},
            "labels": ["circle", "square", "triangle"], "scores": "logits",
            "preprocessing": {"channels": 1, "resize": [8, 8], "mean": [0.5], "std": [0.5]}}
    (out / "card.json").write_text(json.dumps(card, indent=2))
    return out, model


class ChannelsLastCNN(nn.Module):
    """What a TensorFlow/Keras graph looks like to nnserve: images [N, H, W, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):  # x: [N, H, W, C]
        return self.head(self.conv(x.permute(0, 3, 1, 2)).mean((2, 3)))


def keras_like(out: Path) -> Path:
    """An ONNX file "made elsewhere" that takes channels-last RGB images ("layout": "NHWC" in its card)."""
    torch.manual_seed(0)
    out.mkdir(parents=True)
    torch.onnx.export(ChannelsLastCNN().eval(), (torch.randn(2, 12, 10, 3),), str(out / "model.onnx"), dynamo=False,
                      opset_version=17, input_names=["input_1"], output_names=["dense"],
                      dynamic_axes={"input_1": {0: "n"}, "dense": {0: "n"}})
    card = {"format": "nnserve.artifact/2", "name": "keras_like", "kind": "image_classifier",
            "onnx": {"file": "model.onnx"}, "labels": ["x", "y", "z"],
            "preprocessing": {"channels": 3, "resize": [12, 10], "mean": [0.5] * 3, "std": [0.25] * 3,
                              "layout": "NHWC"}}
    (out / "card.json").write_text(json.dumps(card, indent=2))
    return out
