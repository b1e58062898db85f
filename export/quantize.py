"""INT8 with ONNX Runtime's quantization tools; the result is measured, not assumed, and gated.

The model's kind says how (models/kinds): static QDQ quantization calibrated on evaluation images for CNNs
(per-channel weights, ``reduce_range`` 7-bit: this CPU has AVX2 but no VNNI, where ORT's U8S8 kernels can
saturate on full-range weights, ORT quantization docs), dynamic quantization for recurrent LMs (a static
scale does not fit a recurrent state). The kind also measures the quality change that gates registration.
"""

from __future__ import annotations

import logging
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
from models.kinds import Kind, KindError

log = logging.getLogger("nnserve.export")

CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 32


class Calibration(CalibrationDataReader):
    """Calibration inputs in batches, with a progress bar (calibration runs the fp32 graph on each)."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        batches = [images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        self.input_name = input_name
        self.batches = iter(tqdm(batches, desc="int8 calibration", unit="batch", leave=False))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def calibration_sample(images: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return images[rng.choice(len(images), min(CALIBRATION_IMAGES, len(images)), replace=False)]


def quantize(kind: Kind, fp32_path: Path, out_path: Path, metadata: dict, samples, opts) -> dict:
    """Write the INT8 graph to ``out_path``; return its report (method, quality vs fp32, gate verdict)."""
    recipe = kind.int8_recipe(metadata)
    # quant_pre_process: symbolic shape inference + ORT-level cleanup, recommended before quantizing.
    prepared = out_path.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    if recipe["mode"] == "dynamic":
        log.info("%s: INT8 dynamic quantization of %s", metadata["name"], recipe["op_types"])
        quantize_dynamic(prepared, out_path, op_types_to_quantize=recipe["op_types"], weight_type=QuantType.QInt8)
        method = {"mode": "dynamic", "op_types": recipe["op_types"], "weights": "int8 per-tensor",
                  "not_quantized": recipe["not_quantized"]}
    else:
        if samples.x_calibration is None:
            raise KindError("INT8 calibration needs real images: pass --eval-data (a folder per label or an .npz)")
        images = calibration_sample(samples.x_calibration)
        log.info("%s: INT8 static QDQ quantization, calibrating on %d images", metadata["name"], len(images))
        quantize_static(prepared, out_path, Calibration(metadata["roles"]["image"], images),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        method = {"mode": "static", "format": "QDQ", "calibration": f"MinMax on {len(images)} of {samples.source}",
                  "activations": "uint8 per-tensor", "weights": "int8 per-channel, reduce_range (7-bit)"}
    prepared.unlink()
    onnx.checker.check_model(str(out_path), full_check=True)
    report = {"method": method, "ops": op_counts(onnx.load(str(out_path))), "file_bytes": out_path.stat().st_size,
              "fp32_file_bytes": fp32_path.stat().st_size,
              **kind.int8_quality(fp32_path, out_path, metadata, samples, opts)}
    log.info("%s: INT8 %s: %s", metadata["name"], "accepted" if report["passed"] else "REJECTED", report["verdict"])
    return report
