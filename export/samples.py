"""Real samples for parity, calibration and accuracy: the artifact's own held-out / training split.

The split is rebuilt from the card (dataset, seed, limit, text options) with the same functions
training used (models/data.py), so "held-out" here is exactly the set training never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models import data
from models.preprocess import preprocess_uint8


class SampleError(ValueError):
    """The card's dataset cannot be rebuilt here."""


@dataclass
class ImageSamples:
    x_test: np.ndarray  # float32 [N,C,H,W], preprocessed as the card says
    y_test: np.ndarray  # int64 [N]
    x_train: np.ndarray  # float32, for INT8 calibration


@dataclass
class TextSamples:
    train: str
    valid: str
    vocab: str

    def encode(self, text: str) -> np.ndarray:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        return np.array([index[ch] for ch in text], dtype=np.int64)


def image_samples(card: dict) -> ImageSamples:
    source = card.get("dataset", {}).get("source")
    if source != data.MNIST_SOURCE:
        raise SampleError(f"{card['name']}: held-out data for dataset {source!r} is not available to export")
    training = card.get("training", {})
    split = data.load_mnist(seed=card.get("seed", 0), limit=training.get("limit"))
    spec = card["preprocessing"]
    return ImageSamples(preprocess_uint8(split.x_test, spec), split.y_test, preprocess_uint8(split.x_train, spec))


def text_samples(card: dict) -> TextSamples:
    training = card.get("training", {})
    try:
        text, _ = data.load_text(training.get("text"))
    except OSError as e:
        raise SampleError(f"{card['name']}: training text not readable ({e})") from e
    if training.get("text_limit"):
        text = text[:training["text_limit"]]
    train, valid = data.split_text(text)
    unknown = sorted(set(valid) - set(card["vocab"]))
    if unknown:
        raise SampleError(f"{card['name']}: held-out text has characters outside the card's vocab: {unknown[:10]}")
    return TextSamples(train, valid, card["vocab"])
