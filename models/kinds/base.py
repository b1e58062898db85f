"""What every model kind shares, and the numeric checks the kinds' parity certificates are made of.

A kind (models/kinds/image.py, models/kinds/sequence_lm.py) is the one place that knows a kind of model:
its tensor roles and batch axes, warm-up inputs, the REST endpoints that take it, its KServe v2 front end
(``<model>.image``, ``<model>.text``) and input layout, how its card is checked,
how it is wrapped for export, how parity is certified and how INT8 is calibrated and gated. Export and
service both ask the kind; neither switches on kind names. Importable without torch: the export-only
methods import torch (and onnxruntime) when called.

The store metadata names each tensor's role (``roles``): the service finds "the image input" or "the
scores output" there, so graphs keep whatever names their authors gave them (ONNX files made elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

MAX_ABS_ERROR = 1e-4


class KindError(ValueError):
    """The card, network or graph does not fit its kind's contract; the message says what to fix."""


class RequestError(ValueError):
    """A client's request does not fit the kind (an unknown sampling parameter, ...): the service answers
    400 / INVALID_ARGUMENT with the message."""


@dataclass(frozen=True)
class FrontEnd:
    """A kind's BYTES front end over KServe v2: served as a model of its own, ``<model>.<suffix>``, as Triton
    puts an image decoder or text in / text out in an ensemble or BLS model beside the network, so that every
    model's metadata lists exactly the inputs a client must send. It takes one BYTES input; its outputs are
    its own BYTES ones, or (``outputs`` None) the network's."""

    suffix: str  # the model is served as "<model>.<suffix>"; served names may not end so (service/settings.py)
    role: str  # what the service does with the rows: "image" (decode + preprocess, then the network), "prompt"
    input: str  # the BYTES input's name
    input_shape: tuple[int, ...]  # its shape in the metadata; -1 = any (the first, with ``batched``: the batch)
    outputs: tuple[tuple[str, tuple[int, ...]], ...] | None = None  # BYTES (name, shape); None: the network's
    batched: bool = False  # rows are batch items that join the network's dynamic batches (Triton's max_batch_size)
    decoupled: bool = False  # may answer one request with several responses (ModelStreamInfer)
    description: str = ""  # what the input takes, for the model's metadata


class Kind:
    name: ClassVar[str]
    endpoints: ClassVar[tuple[str, ...]] = ()  # REST endpoints that take this kind
    generates: ClassVar[bool] = False  # served by the continuous (decode-step) batcher too

    # ---- the serving contract (store metadata) -------------------------------------------------------

    def batch_axis(self, metadata: dict, tensor: str) -> int:
        return 0

    def example_feeds(self, metadata: dict, inputs: list, batch: int, seq_len: int = 1) -> dict[str, np.ndarray]:
        """Zero inputs of the right dtypes for ``batch`` items (``inputs``: TensorSpec-like name/shape/numpy_dtype)."""
        feeds = {}
        for t in inputs:
            axis = self.batch_axis(metadata, t.name)
            shape = [d if d >= 0 else 1 for d in t.shape]
            shape[axis] = batch
            feeds[t.name] = np.zeros(shape, dtype=t.numpy_dtype)
        return feeds

    def warmup_feeds(self, metadata: dict, inputs: list, batch_sizes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
        return [self.example_feeds(metadata, inputs, b) for b in batch_sizes]

    def describe(self, metadata: dict) -> dict:
        """The kind's own facts for ``GET /models``."""
        return {}

    def check_request_shapes(self, metadata: dict, shapes: dict[str, list[int]], limits: Any) -> str | None:
        """What a raw-tensor (/v2) request's shapes break beyond the graph's (e.g. a sequence limit), as a client
        error message; checked before any data is decoded. ``limits``: max_sequence_length, max_request_tokens."""
        return None

    def check_request_values(self, metadata: dict, arrays: dict[str, np.ndarray]) -> str | None:
        """What a raw-tensor request's values break (e.g. token ids outside the vocabulary)."""
        return None

    # ---- Triton's protocol extras (service/kserve.py, service/management.py) ------------------------------

    front_end: ClassVar[FrontEnd | None] = None  # the kind's BYTES front end over KServe v2, if it has one

    def input_layout(self, metadata: dict, tensor: str) -> str | None:
        """The memory layout of an image input ("NCHW" or "NHWC": Triton's config ``format``); None for
        tensors that are not images."""
        return None

    def output_labels(self, metadata: dict, output: str) -> list[str] | None:
        """Class labels of a [batch, classes] output, for Triton's classification extension (None: unlabelled)."""
        return None

    def sampling_options(self, parameters: dict) -> tuple[dict, dict]:
        """Triton request parameters -> (GenerationRequest fields, field -> the parameter's name for messages).
        Raises RequestError for a parameter the kind does not take."""
        raise RequestError(f"a {self.name} model does not generate text")

    # ---- export -------------------------------------------------------------------------------------

    def check_card(self, card: dict) -> None:
        """Checks the schema cannot express (raise KindError)."""

    def store_metadata(self, card: dict, roles: dict, outputs: list[dict] | None = None, model=None) -> dict:
        """The kind's facts in the store metadata besides inputs/outputs (labels, vocabulary, ...)."""
        return {"roles": roles}

    # Every kind implements the export contract below (export/pipeline.py, parity.py, quantize.py call it);
    # declared here so that a call the kinds do not offer is a type error, not a crash on some host.

    def export_wrapper(self, model: Any, card: dict) -> Any:
        """The eval module wrapped so that its forward returns the graph's outputs as a tuple, named."""
        raise NotImplementedError

    def example_inputs(self, wrapper: Any, card: dict, batch: int = 2) -> tuple:
        raise NotImplementedError

    def dynamic_axes(self, wrapper: Any) -> dict:
        raise NotImplementedError

    def probe(self, wrapper: Any, card: dict) -> dict:
        """The eager network checked against the card (shapes, labels, vocabulary): facts for the metadata."""
        raise NotImplementedError

    def roles_for(self, output_names: list[str], input_names: list[str], card: dict) -> dict:
        raise NotImplementedError

    def load_samples(self, card: dict, artifact_dir: Path, eval_data: Path | None) -> Any:
        raise NotImplementedError

    def certify(self, wrapper: Any, session: Any, samples: Any, max_abs_error: float) -> dict:
        raise NotImplementedError

    def summary_line(self, cert: dict) -> str:
        raise NotImplementedError

    def int8_recipe(self, metadata: dict) -> dict:
        raise NotImplementedError

    def int8_quality(self, fp32_path: Path, int8_path: Path, metadata: dict, samples: Any, opts: Any) -> dict:
        raise NotImplementedError

    # ONNX files made elsewhere (export/foreign.py): only kinds that take them override these.

    def foreign_io(self, card: dict, path: Path) -> tuple[dict, dict]:
        raise KindError(f"a {self.name} model is exported from its PyTorch module, not from an ONNX file")

    def foreign_feeds(self, card: dict, declared: dict, batch: int) -> dict[str, np.ndarray]:
        raise KindError(f"a {self.name} model is exported from its PyTorch module, not from an ONNX file")

    def foreign_quality(self, path: Path, roles: dict, samples: Any) -> dict:
        raise KindError(f"a {self.name} model is exported from its PyTorch module, not from an ONNX file")


# ---- numeric helpers of the parity certificates ---------------------------------------------------------

def cpu_session(path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def errors(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> dict:
    """Per output: max abs error, max error relative to the output's scale (max |reference|), and that scale."""
    out = {}
    for name, ref, got in zip(names, reference, candidate, strict=True):
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        worst = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
        out[name] = {"max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-12), "scale": scale,
                     "worst_index": [int(i) for i in worst]}
    return out


def tolerance(err: dict, max_abs_error: float) -> float:
    """The bound an output is held to: ``max_abs_error`` absolute, scaled by its magnitude past 1. Float32
    spacing grows with the value (1.5e-5 at 128), so a flat 1e-4 on large logits or an LSTM cell state
    asks for a few ulps after many ops; on values <= 1 (probabilities, h) it is the plain absolute bound."""
    return max_abs_error * max(1.0, err["scale"])


def summarize(checks: list[dict], names: list[str], max_abs_error: float) -> dict:
    """Worst error per output over the checks, whether each is within its bound, and the worst offender."""
    worst: dict[str, dict] = {}
    where: dict[str, dict] = {}
    for check in checks:
        for name in names:
            err = check["errors"][name]
            if name not in worst or err["max_abs"] / tolerance(err, max_abs_error) > \
                    worst[name]["max_abs"] / tolerance(worst[name], max_abs_error):
                worst[name] = err
                where[name] = {k: v for k, v in check.items() if k != "errors"}
    ratios = {n: worst[n]["max_abs"] / tolerance(worst[n], max_abs_error) for n in names}
    offender = max(ratios, key=lambda n: ratios[n])
    return {"max_abs": max(e["max_abs"] for e in worst.values()), "max_rel": max(e["max_rel"] for e in worst.values()),
            "within_tolerance": all(r <= 1.0 for r in ratios.values()),
            "worst": {"output": offender, **worst[offender], "tolerance": tolerance(worst[offender], max_abs_error),
                      **where[offender]}}
