"""Moved to ``harness.data`` (deploy/ uses it too and must not import loadtest); kept so old imports work."""

from harness.data import PROMPT_SOURCE_CHARS, TRAINING_SEED, held_out_digits, png_bytes, prompts  # noqa: F401
