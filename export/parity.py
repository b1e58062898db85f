"""Parity certificate: ONNX Runtime (CPU) vs the original PyTorch eval module (BN unfolded, dropout in).

Comparing against the *unfolded* module certifies folding and export together. What is run depends on the
model's kind (models/kinds: images at batch 1, 7, 64 plus top-1 agreement on every evaluation image; a
language model's 200 greedy decode steps with the state round-tripping through ONNX). Every output must be
within ``max_abs_error`` scaled by its magnitude past 1 (models/kinds/base.py ``tolerance``); errors are
reported as max abs and max relative to the output's scale, with the worst output, batch and element.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort
from torch import nn

from models.kinds import Kind
from models.kinds.base import MAX_ABS_ERROR, cpu_session

log = logging.getLogger("nnserve.export")

__all__ = ["MAX_ABS_ERROR", "ParityError", "certify"]


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; carries the certificate."""

    def __init__(self, message: str, certificate: dict) -> None:
        super().__init__(message)
        self.certificate = certificate


def certify(kind: Kind, wrapper: nn.Module, onnx_path: Path, name: str, samples,
            max_abs_error: float = MAX_ABS_ERROR) -> dict:
    """Run the kind's certificate; raise :class:`ParityError` (with the numbers) on failure."""
    cert = kind.certify(wrapper, cpu_session(onnx_path), samples, max_abs_error)
    cert = {"reference": "PyTorch eval module (BN unfolded)", "runtime": f"onnxruntime {ort.__version__} CPU", **cert}
    worst = cert["worst"]
    at = ", ".join(f"{k} {v}" for k, v in worst.items() if k in ("batch", "inputs", "step", "seq_len"))
    summary = (f"max abs error {cert['max_abs']:.3g}, max rel error {cert['max_rel']:.3g}; worst: output "
               f"{worst['output']!r} error {worst['max_abs']:.3g} vs bound {worst['tolerance']:.3g} at element "
               f"{worst['worst_index']} ({at}); {kind.summary_line(cert)}")
    if not cert["passed"]:
        raise ParityError(f"{name}: parity FAILED: {summary}", cert)
    log.info("%s: parity passed: %s", name, summary)
    return cert
