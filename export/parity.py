"""Parity certificate: ONNX Runtime (CPU) vs the original PyTorch eval module (BN unfolded, dropout in).

Comparing against the *unfolded* module certifies folding and export together. Errors are reported
as max abs and max relative error, the latter being max |onnx - torch| / max |torch| (relative to the
output's scale; elementwise ratios explode on outputs near zero and say nothing).

Every output must be within ``max_abs_error`` absolutely, except the LSTM cell state ``c_out``: it is
unbounded (it integrates over the sequence; the default char_lstm's reaches ~170 after the 200 greedy
steps) and float32 spacing at 128 is 1.5e-5, so an absolute 1e-4 there would ask for ~7 ulps after 200
recurrent steps. Its bound is ``max_abs_error * max(1, max |c|)``; logits and ``h`` (|h| < 1) keep the
absolute bound.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from export.samples import ImageSamples, TextSamples

log = logging.getLogger("nnserve.export")

MAX_ABS_ERROR = 1e-4
SCALED_OUTPUTS = ("c_out",)  # tolerance scales with max |reference| (see the module docstring)
BATCH_SIZES = (1, 7, 64)
RNN_STEPS = 200
PROMPT_CHARS = 64


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; carries the certificate."""

    def __init__(self, message: str, certificate: dict) -> None:
        super().__init__(message)
        self.certificate = certificate


def cpu_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session.run(None, feeds)


@torch.no_grad()
def run_torch(wrapper: nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    outs = wrapper(*(torch.from_numpy(feeds[name]) for name in wrapper.input_names))
    return [o.numpy() for o in (outs if isinstance(outs, tuple) else (outs,))]


def errors(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> dict:
    out = {}
    for name, ref, got in zip(names, reference, candidate, strict=True):
        diff = float(np.abs(ref.astype(np.float64) - got).max())
        scale = float(np.abs(ref).max())
        out[name] = {"max_abs": diff, "max_rel": diff / max(scale, 1e-12), "scale": scale}
    return out


def tolerance(name: str, error: dict, max_abs_error: float) -> float:
    return max_abs_error * max(1.0, error["scale"]) if name in SCALED_OUTPUTS else max_abs_error


def bound_used(name: str, error: dict, max_abs_error: float) -> float:
    """The fraction of its bound an output's error uses (> 1: over it)."""
    return error["max_abs"] / tolerance(name, error, max_abs_error)


def summarize(checks: list[dict], names: list[str], max_abs_error: float) -> dict:
    """Max abs / rel error over every check and output, and whether each output stayed within its bound."""
    worst = {n: max((c["errors"][n] for c in checks), key=lambda e, n=n: bound_used(n, e, max_abs_error))
             for n in names}
    return {"max_abs": max(c["errors"][n]["max_abs"] for c in checks for n in names),
            "max_rel": max(c["errors"][n]["max_rel"] for c in checks for n in names),
            "within_tolerance": all(e["max_abs"] <= tolerance(n, e, max_abs_error) for n, e in worst.items()),
            "tolerances": {n: tolerance(n, e, max_abs_error) for n, e in worst.items() if n in SCALED_OUTPUTS}}


def predictions(run, feeds_list: list[dict]) -> np.ndarray:
    return np.concatenate([run(feeds)[0].argmax(axis=1) for feeds in feeds_list])


def image_parity(wrapper: nn.Module, session: ort.InferenceSession, samples: ImageSamples,
                 max_abs_error: float = MAX_ABS_ERROR) -> dict:
    """Held-out and random inputs at batch 1, 7, 64; then top-1 agreement on the whole held-out set."""
    names, rng = wrapper.output_names, np.random.default_rng(0)
    checks = []
    for batch in BATCH_SIZES:
        shape = (batch, *samples.x_test.shape[1:])
        for label, x in (("held_out", np.resize(samples.x_test, shape)),
                         ("random", rng.standard_normal(shape).astype(np.float32))):
            feeds = {"input": np.ascontiguousarray(x)}
            checks.append({"batch": batch, "inputs": label,
                           "errors": errors(run_torch(wrapper, feeds), run_onnx(session, feeds), names)})
    chunks = [{"input": samples.x_test[i:i + 64]} for i in range(0, len(samples.x_test), 64)]
    torch_pred = predictions(lambda f: run_torch(wrapper, f), chunks)
    onnx_pred = predictions(lambda f: run_onnx(session, f), chunks)
    summary = summarize(checks, names, max_abs_error)
    agreement = float((torch_pred == onnx_pred).mean())
    return {
        "tolerance_max_abs": max_abs_error, "max_abs": summary["max_abs"], "max_rel": summary["max_rel"],
        "held_out_samples": len(samples.y_test), "top1_agreement": agreement,
        "torch_accuracy": float((torch_pred == samples.y_test).mean()),
        "onnx_accuracy": float((onnx_pred == samples.y_test).mean()),
        "checks": checks, "passed": summary["within_tolerance"] and agreement == 1.0,
    }


def rnn_state_feeds(wrapper: nn.Module, batch: int, rng: np.random.Generator | None = None) -> dict:
    rnn = wrapper.model
    shape = (rnn.num_layers, batch, rnn.hidden_size)
    make = (lambda: np.zeros(shape, np.float32)) if rng is None else \
        (lambda: (0.5 * rng.standard_normal(shape)).astype(np.float32))
    return {name: make() for name in wrapper.input_names if name != "tokens"}


def rnn_parity(wrapper: nn.Module, session: ort.InferenceSession, samples: TextSamples,
               max_abs_error: float = MAX_ABS_ERROR, steps: int = RNN_STEPS) -> dict:
    """Random tokens/state at batch 1, 7, 64; then a held-out prompt prefilled in one call and
    ``steps`` greedy decode steps, each side feeding its own state back."""
    names, rng = wrapper.output_names, np.random.default_rng(0)
    vocab_size = len(samples.vocab)
    checks = []
    for batch in BATCH_SIZES:
        feeds = {"tokens": rng.integers(0, vocab_size, (batch, 16)), **rnn_state_feeds(wrapper, batch, rng)}
        checks.append({"batch": batch, "inputs": "random", "seq_len": 16,
                       "errors": errors(run_torch(wrapper, feeds), run_onnx(session, feeds), names)})

    prompt = samples.valid[:PROMPT_CHARS]
    tokens = samples.encode(prompt)[None]
    torch_feeds = {"tokens": tokens, **rnn_state_feeds(wrapper, 1)}
    onnx_feeds = dict(torch_feeds)
    torch_text, onnx_text = [], []
    worst_step = {n: {"max_abs": 0.0, "max_rel": 0.0, "scale": 0.0} for n in names}
    for _ in tqdm(range(steps + 1), desc="parity: greedy decode", unit="step", leave=False):
        ref, got = run_torch(wrapper, torch_feeds), run_onnx(session, onnx_feeds)
        for name, err in errors(ref, got, names).items():
            worst_step[name] = max(worst_step[name], err, key=lambda e, n=name: bound_used(n, e, max_abs_error))
        torch_next, onnx_next = int(ref[0][0, -1].argmax()), int(got[0][0, -1].argmax())
        torch_text.append(samples.vocab[torch_next])
        onnx_text.append(samples.vocab[onnx_next])
        # Each side continues from its own outputs: the state really round-trips through ONNX.
        torch_feeds = {"tokens": np.array([[torch_next]]), **dict(zip(wrapper.input_names[1:], ref[1:], strict=True))}
        onnx_feeds = {"tokens": np.array([[onnx_next]]), **dict(zip(wrapper.input_names[1:], got[1:], strict=True))}
    checks.append({"batch": 1, "inputs": "held_out_prompt_then_greedy", "steps": steps,
                   "errors": worst_step})  # per output, the step closest to (or over) its bound
    summary = summarize(checks, names, max_abs_error)
    identical = torch_text == onnx_text
    return {
        "tolerance_max_abs": max_abs_error, "max_abs": summary["max_abs"], "max_rel": summary["max_rel"],
        "scaled_tolerances": summary["tolerances"], "within_tolerance": summary["within_tolerance"],
        "prompt": prompt, "greedy_steps": steps, "greedy_identical": identical,
        "torch_continuation": "".join(torch_text[:steps]), "onnx_continuation": "".join(onnx_text[:steps]),
        "checks": checks, "passed": summary["within_tolerance"] and identical,
    }


def certify(wrapper: nn.Module, onnx_path: Path, card: dict, samples, max_abs_error: float = MAX_ABS_ERROR) -> dict:
    """Run the certificate for the card's kind; raise :class:`ParityError` (with the numbers) on failure."""
    session = cpu_session(onnx_path)
    if card["kind"] == "char_lm":
        cert = rnn_parity(wrapper, session, samples, max_abs_error)
    else:
        cert = image_parity(wrapper, session, samples, max_abs_error)
    cert = {"reference": "PyTorch eval module (BN unfolded)", "runtime": f"onnxruntime {ort.__version__} CPU",
            **cert}
    scaled = "".join(f" ({n}: {t:.3g}, scaled by its magnitude)" for n, t in cert.get("scaled_tolerances", {}).items())
    summary = (f"max abs error {cert['max_abs']:.3g} (tolerance {max_abs_error:g}{scaled}), "
               f"max rel error {cert['max_rel']:.3g}, " +
               (f"greedy {cert['greedy_steps']}-char continuation identical: {cert['greedy_identical']}"
                if "greedy_identical" in cert else
                f"top-1 agreement {cert['top1_agreement']:.4f} on {cert['held_out_samples']} held-out samples"))
    if not cert["passed"]:
        raise ParityError(f"{card['name']}: parity FAILED: {summary}", cert)
    log.info("%s: parity passed: %s", card["name"], summary)
    return cert
