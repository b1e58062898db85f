"""One adapter per model kind: what the rest of the service must know about a kind, in one place.

- which axis of each input and output is the batch axis (the dynamic batcher merges and splits along it),
- example inputs and the shapes to warm up,
- how many items a request holds and which requests can share a batch,
- what ``GET /models`` shows besides the tensors.

Kinds come from the store metadata (``kind``): ``image_classifier`` and ``image_feature_extractor``
(images [N, C, H, W]) and ``char_lm`` (tokens [B, T] plus RNN state [layers, B, hidden]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.runtime import ModelRuntime

PREFILL_WARMUP_LEN = 16  # one T > 1 shape for text models: prompts are prefilled in one call


class ImageAdapter:
    """Every input and output is batched along axis 0."""

    is_image = True

    def batch_axis(self, tensor: str) -> int:
        return 0

    def example_feeds(self, runtime: ModelRuntime, batch: int, seq_len: int = 1) -> dict[str, np.ndarray]:
        return {t.name: np.zeros([batch if d < 0 else d for d in t.shape], dtype=t.numpy_dtype)
                for t in runtime.inputs}

    def warmup_feeds(self, runtime: ModelRuntime, batch_sizes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
        return [self.example_feeds(runtime, b) for b in batch_sizes]

    def describe(self, runtime: ModelRuntime) -> dict:
        return {"labels": runtime.metadata["labels"], "preprocessing": runtime.metadata["preprocessing"]}


class CharLMAdapter:
    """tokens [B, T] and logits [B, T, V] are batched along axis 0; the RNN state (h, c and their ``_out``)
    is [layers, B, hidden], batched along axis 1."""

    is_image = False

    def batch_axis(self, tensor: str) -> int:
        return 0 if tensor in ("tokens", "logits") else 1

    def example_feeds(self, runtime: ModelRuntime, batch: int, seq_len: int = 1) -> dict[str, np.ndarray]:
        feeds = {}
        for t in runtime.inputs:
            shape = [batch, seq_len] if t.name == "tokens" else [t.shape[0], batch, t.shape[2]]
            feeds[t.name] = np.zeros(shape, dtype=t.numpy_dtype)
        return feeds

    def warmup_feeds(self, runtime: ModelRuntime, batch_sizes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
        return [self.example_feeds(runtime, b) for b in batch_sizes] + [
            self.example_feeds(runtime, 1, seq_len=PREFILL_WARMUP_LEN)]

    def describe(self, runtime: ModelRuntime) -> dict:
        return {"vocab_size": len(runtime.metadata["vocab"]), "rnn": runtime.metadata.get("rnn")}


ADAPTERS = {"image_classifier": ImageAdapter(), "image_feature_extractor": ImageAdapter(), "char_lm": CharLMAdapter()}


def adapter_for(kind: str) -> ImageAdapter | CharLMAdapter:
    if kind not in ADAPTERS:
        raise ValueError(f"unknown model kind {kind!r}; nnserve serves {sorted(ADAPTERS)}")
    return ADAPTERS[kind]


def warmup_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: the batch shapes served most."""
    return tuple(sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch} | {max_batch}))
