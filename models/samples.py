"""Sample quality a person can check: generated text, and the share of its words that are real words.

The proxy: of the words a model writes (temperature 0.8, 5,000 characters, fixed seeds), the share that occur in
the training text's vocabulary. A model that spells "the kinge of thy sweete lovee" scores low; the held-out plays
themselves score just under 100% (names and rare words a play introduces), which is the ceiling to compare with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A word: letters with inner apostrophes ("o'er", "there's"); "'tis" counts as "tis". Case is folded.
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
TEMPERATURE, CHARS, SEEDS = 0.8, 5000, (0, 1, 2)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def word_share(text: str, vocabulary: set[str]) -> float:
    """Share of ``text``'s words (tokens, not distinct words) that are in ``vocabulary``; 0 if it has none."""
    tokens = words(text)
    return sum(w in vocabulary for w in tokens) / len(tokens) if tokens else 0.0


@dataclass
class WordShare:
    model: float  # mean over SEEDS of the generated text's share
    per_seed: list[float]
    held_out: float  # the held-out text's own share: the ceiling
    vocabulary_size: int


def measure(model, vocab: str, train_text: str, held_out_text: str, prompt: str) -> WordShare:
    """The proxy for one model: TEMPERATURE, CHARS characters per seed in SEEDS."""
    from models.train import sample_text

    vocabulary = set(words(train_text))
    per_seed = [word_share(sample_text(model, vocab, prompt, CHARS, TEMPERATURE, seed), vocabulary) for seed in SEEDS]
    return WordShare(sum(per_seed) / len(per_seed), per_seed, word_share(held_out_text, vocabulary), len(vocabulary))
