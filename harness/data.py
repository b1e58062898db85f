"""Inputs for the load tests and benchmarks, built in memory (nothing is written to disk or git).

- Images: the held-out test split of ``models.data.load_mnist`` with the default training seed, i.e. the
  1,000 digits the default lenet5 / vgg_fc7 never trained on (tiny test models use a subset split, so
  for them these are just real digits).
- Prompts: snippets from the start of the char models' training corpus. The server does not publish a
  char model's vocabulary, and every char model is trained on a prefix of that corpus at least
  ``PROMPT_SOURCE_CHARS`` long (the tiny test config uses 20,000), so these characters are in its vocab.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models.data import load_mnist, load_text

TRAINING_SEED = 0  # models.train's default --seed: it decides which digits are held out
PROMPT_SOURCE_CHARS = 2000


def held_out_digits() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 28, 28] digits and their int64 labels (MNIST test split of the default models)."""
    split = load_mnist(seed=TRAINING_SEED)
    return split.x_test, split.y_test


def png_bytes(digit: np.ndarray) -> bytes:
    """One uint8 [H, W] digit as a PNG file, what a client uploads to /classify."""
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


def prompts(count: int = 64, seed: int = 0, min_chars: int = 4, max_chars: int = 40) -> list[str]:
    """``count`` prompts of ``min_chars``..``max_chars`` characters, each starting at a word."""
    text, _ = load_text()
    source = text[:PROMPT_SOURCE_CHARS]
    starts = [i for i in range(len(source) - max_chars)
              if source[i].isalnum() and (i == 0 or source[i - 1].isspace())]
    rng = np.random.default_rng(seed)
    out = []
    for start in rng.choice(starts, size=count):
        length = int(rng.integers(min_chars, max_chars + 1))
        out.append(source[start:start + length])
    return out
