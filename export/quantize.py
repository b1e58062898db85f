"""INT8 with ONNX Runtime's quantization tools; the result is measured, not assumed, and gated.

- CNNs: static quantization in QDQ format, calibrated (MinMax) on training images, per-channel
  weights. Weights are ``reduce_range`` (7-bit): this CPU has AVX2 but no VNNI, where ORT's U8S8
  kernels can saturate on full-range weights (ORT quantization docs).
- char LMs: dynamic quantization (weights INT8 ahead of time, activations per call): static does not
  fit a recurrent state. ORT has an INT8 LSTM kernel (DynamicQuantizeLSTM) but none for GRU, so for
  the GRU only the vocabulary head MatMul is quantized; the report lists what was.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm import tqdm

from export.graph import op_counts
from export.parity import cpu_session
from export.samples import ImageSamples, TextSamples

log = logging.getLogger("nnserve.export")

CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 32
# As models/train.py's evaluate_bpc cuts the held-out text (the window size does not matter: the state is
# carried), so the fp32 number reproduces the card's valid_bpc.
BPC_STREAMS, BPC_WINDOW = 16, 100


class ImageCalibration(CalibrationDataReader):
    """Training images in batches, with a progress bar (calibration runs the fp32 graph on each)."""

    def __init__(self, images: np.ndarray) -> None:
        batches = [images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        self.batches = iter(tqdm(batches, desc="int8 calibration", unit="batch", leave=False))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def calibration_images(samples: ImageSamples, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = min(CALIBRATION_IMAGES, len(samples.x_train))
    return samples.x_train[rng.choice(len(samples.x_train), n, replace=False)]


def accuracy(path: Path, samples: ImageSamples) -> tuple[float, np.ndarray]:
    session = cpu_session(path)
    preds = np.concatenate([session.run(["logits"], {"input": samples.x_test[i:i + 64]})[0].argmax(1)
                            for i in range(0, len(samples.x_test), 64)])
    return float((preds == samples.y_test).mean()), preds


def bits_per_char(path: Path, metadata: dict, samples: TextSamples) -> float:
    """Held-out bits/char through ONNX Runtime: 16 contiguous streams, state carried across windows."""
    tokens = samples.encode(samples.valid)
    length = len(tokens) // BPC_STREAMS
    streams = tokens[:length * BPC_STREAMS].reshape(BPC_STREAMS, length)  # models.train.batchify
    x, y = streams[:, :-1], streams[:, 1:]
    session = cpu_session(path)
    input_names = [t["name"] for t in metadata["inputs"]]
    state = {n: np.zeros((metadata["rnn"]["num_layers"], BPC_STREAMS, metadata["rnn"]["hidden_size"]), np.float32)
             for n in input_names[1:]}
    nats, count = 0.0, 0
    for i in range(0, x.shape[1], BPC_WINDOW):
        outs = session.run(None, {"tokens": x[:, i:i + BPC_WINDOW], **state})
        logits, target = outs[0].astype(np.float64), y[:, i:i + BPC_WINDOW]
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nats -= np.take_along_axis(log_probs, target[..., None], -1).sum()
        count += target.size
        state = dict(zip(input_names[1:], outs[1:], strict=True))
    return float(nats / count / math.log(2))


def quantize(fp32_path: Path, out_path: Path, card: dict, samples, metadata: dict, opts) -> dict:
    """Write the INT8 graph to ``out_path``; return its report (method, quality vs fp32, gate verdict)."""
    # quant_pre_process: symbolic shape inference + ORT-level cleanup, recommended before quantizing.
    prepared = out_path.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    if card["kind"] == "char_lm":
        cell_op = metadata["rnn"]["cell"].upper()
        ops = ["MatMul", "LSTM"] if cell_op == "LSTM" else ["MatMul"]
        log.info("%s: INT8 dynamic quantization of %s", card["name"], ops)
        quantize_dynamic(prepared, out_path, op_types_to_quantize=ops, weight_type=QuantType.QInt8)
        method = {"mode": "dynamic", "op_types": ops, "weights": "int8 per-tensor",
                  "not_quantized": [] if cell_op == "LSTM" else ["GRU (no INT8 kernel in ONNX Runtime)"]}
    else:
        images = calibration_images(samples)
        log.info("%s: INT8 static QDQ quantization, calibrating on %d training images", card["name"], len(images))
        quantize_static(prepared, out_path, ImageCalibration(images), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        method = {"mode": "static", "format": "QDQ", "calibration": f"MinMax on {len(images)} training images",
                  "activations": "uint8 per-tensor", "weights": "int8 per-channel, reduce_range (7-bit)"}
    prepared.unlink()
    onnx.checker.check_model(str(out_path), full_check=True)
    report: dict = {"method": method, "ops": op_counts(onnx.load(str(out_path))),
                    "file_bytes": out_path.stat().st_size, "fp32_file_bytes": fp32_path.stat().st_size}

    if card["kind"] == "char_lm":
        fp32_bpc, int8_bpc = bits_per_char(fp32_path, metadata, samples), bits_per_char(out_path, metadata, samples)
        agreement = greedy_agreement(fp32_path, out_path, metadata, samples)
        delta = int8_bpc - fp32_bpc
        passed = delta <= opts.int8_max_bpc_increase
        verdict = (f"held-out bits/char {fp32_bpc:.4f} -> {int8_bpc:.4f} ({delta:+.4f}, allowed "
                   f"+{opts.int8_max_bpc_increase:g})")
        report["metrics"] = {"int8_valid_bpc": int8_bpc, "fp32_onnx_valid_bpc": fp32_bpc}
        report["parity"] = {"reference": "fp32 ONNX graph", "fp32_bpc": fp32_bpc, "int8_bpc": int8_bpc,
                            "bpc_delta": delta, "greedy_200_char_agreement": agreement, "passed": passed}
    else:
        fp32_acc, fp32_pred = accuracy(fp32_path, samples)
        int8_acc, int8_pred = accuracy(out_path, samples)
        drop = 100 * (fp32_acc - int8_acc)
        passed = drop <= opts.int8_max_drop
        verdict = (f"held-out top-1 {100 * fp32_acc:.2f}% -> {100 * int8_acc:.2f}% ({-drop:+.2f} points, "
                   f"allowed -{opts.int8_max_drop:g})")
        report["metrics"] = {"int8_test_accuracy": int8_acc, "fp32_onnx_test_accuracy": fp32_acc}
        report["parity"] = {"reference": "fp32 ONNX graph", "held_out_samples": len(samples.y_test),
                            "fp32_accuracy": fp32_acc, "int8_accuracy": int8_acc, "top1_drop_points": drop,
                            "top1_agreement_with_fp32": float((fp32_pred == int8_pred).mean()), "passed": passed}
    report["passed"], report["verdict"] = passed, verdict
    log.info("%s: INT8 %s: %s", card["name"], "accepted" if passed else "REJECTED", verdict)
    return report


def greedy_agreement(fp32_path: Path, int8_path: Path, metadata: dict, samples: TextSamples,
                     steps: int = 200) -> float:
    """Fraction of a 200-char greedy continuation (held-out prompt) on which INT8 picks fp32's char,
    with INT8 fed fp32's characters so one early difference does not count 200 times."""
    sessions = [cpu_session(fp32_path), cpu_session(int8_path)]
    names = [t["name"] for t in metadata["inputs"]]
    shape = (metadata["rnn"]["num_layers"], 1, metadata["rnn"]["hidden_size"])
    feeds = [{"tokens": samples.encode(samples.valid[:64])[None],
              **{n: np.zeros(shape, np.float32) for n in names[1:]}} for _ in sessions]
    same = 0
    for _ in range(steps):
        outs = [s.run(None, f) for s, f in zip(sessions, feeds, strict=True)]
        picks = [int(o[0][0, -1].argmax()) for o in outs]
        same += picks[0] == picks[1]
        feeds = [{"tokens": np.array([[picks[0]]]), **dict(zip(names[1:], o[1:], strict=True))} for o in outs]
    return same / steps
