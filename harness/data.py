"""Inputs for the load tests and benchmarks, built in memory (nothing is written to disk or git).

- Images: the held-out test split of ``models.data.load_mnist`` with the default training seed, i.e. the
  1,000 digits the default lenet5 / vgg_fc7 never trained on (tiny test models use a subset split, so
  for them these are just real digits).
- Prompts: snippets from the start of the stdlib docs (the tiny test models' corpus), kept only where every
  character is in the served model's vocabulary when one is given (``served_vocab``: GET /models publishes
  it). The default char models train on Shakespeare, whose vocabulary lacks characters such as ``_`` or
  ``=``: without the filter a share of the prompts would be answered 400.
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


def prompts(count: int = 64, seed: int = 0, min_chars: int = 4, max_chars: int = 40,
            vocab: str | None = None) -> list[str]:
    """``count`` prompts of ``min_chars``..``max_chars`` characters, each starting at a word; with ``vocab``,
    only characters in it (a prompt with others is a client error, 400)."""
    text, _ = load_text()
    source = text[:PROMPT_SOURCE_CHARS]
    allowed = set(vocab) if vocab else None
    starts = [i for i in range(len(source) - max_chars)
              if source[i].isalnum() and (i == 0 or source[i - 1].isspace())]
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < count:
        start, length = int(rng.choice(starts)), int(rng.integers(min_chars, max_chars + 1))
        snippet = source[start:start + length]
        if allowed is None or set(snippet) <= allowed:
            out.append(snippet)
    return out


def served_vocab(url: str, model: str = "char_lstm") -> str | None:
    """The characters of ``model``'s vocabulary as the server at ``url`` publishes it (GET /models), or None
    when it does not say (then ``prompts`` does not filter)."""
    import json
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=30) as response:
        models = {m["name"]: m for m in json.load(response)["models"]}
    vocab = models.get(model, {}).get("vocab")
    return vocab["tokens"] if isinstance(vocab, dict) and vocab.get("type") == "characters" else None
