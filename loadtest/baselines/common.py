"""What every baseline shares: the store model, an ORT session configured like nnserve's, decode +
preprocessing exactly as nnserve does it, and the top-k answer.

Which store entry to serve comes from the environment (``BASELINE_LENET5_TAG``, ``BASELINE_VGG_FC7_TAG``,
``BASELINE_<NAME>_TAG`` for any model, default ``<name>:latest``): the bench passes the exact tags nnserve
reported, so every server runs the same graph. ``BASELINE_ORT_THREADS`` sets ORT's intra-op threads (the
launcher sizes it as cores / workers).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from models.preprocess import image_to_uint8, preprocess_uint8
from service.images import preprocess_upload


def tag_variable(name: str) -> str:
    """``BASELINE_<NAME>_TAG``: ``-`` and ``.`` (allowed in store names, not in variable names) become ``_``,
    as in nnserve's ``NNSERVE_<NAME>_TAG``."""
    return f"BASELINE_{re.sub(r'[-.]', '_', name).upper()}_TAG"


def served_models(environ: Mapping[str, str]) -> tuple[str, str | None]:
    """FastAPI's (/classify model, /features model or None): ``BASELINE_CLASSIFY_MODEL`` (default lenet5),
    ``BASELINE_FEATURES_MODEL`` (default vgg_fc7; set empty for none). Here, not in fastapi_app, because that
    module loads the models when imported."""
    features = environ.get("BASELINE_FEATURES_MODEL", "vgg_fc7").strip()
    return environ.get("BASELINE_CLASSIFY_MODEL", "lenet5").strip() or "lenet5", features or None


def output_name(model: StoreModel, role: str, default: str) -> str:
    """The graph output with ``role`` (scores, features) in the store metadata; ``default`` for an entry
    that does not say."""
    return model.metadata.get("roles", {}).get(role, default)


def ort_threads(workers: int = 1) -> int:
    """``BASELINE_ORT_THREADS``, else the cores shared out between the server's worker processes."""
    return int(os.environ.get("BASELINE_ORT_THREADS", "0")) or max(1, (os.cpu_count() or 1) // workers)


def knob(name: str, default: float) -> float:
    """A configuration knob the launcher sets (``BASELINE_WORKERS``, ``BASELINE_MAX_BATCH``,
    ``BASELINE_WAIT_MS``: launch.Config.env)."""
    return float(os.environ.get(f"BASELINE_{name}", default))


@dataclass
class StoreModel:
    """An image model of the BentoML store, run by ONNX Runtime as nnserve runs it."""

    tag: str
    metadata: dict
    session: ort.InferenceSession

    @classmethod
    def load(cls, name: str, threads: int, tag: str | None = None) -> StoreModel:
        """``tag`` if given, else the environment's pin for ``name`` (BASELINE_<NAME>_TAG), else its latest."""
        import bentoml

        entry = bentoml.models.get(tag or os.environ.get(tag_variable(name), f"{name}:latest"))
        metadata: dict[str, Any] = dict(entry.info.metadata)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Same as nnserve's ModelRuntime: spinning threads steal the CPU the HTTP side needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(entry.path_of(metadata["onnx_file"]), options,
                                       providers=["CPUExecutionProvider"])
        model = cls(str(entry.tag), metadata, session)
        model.run(np.zeros((1, *model.input_shape), dtype=np.float32))  # first call per shape is slow
        return model

    @property
    def input_name(self) -> str:
        return self.metadata["inputs"][0]["name"]

    @property
    def input_shape(self) -> list[int]:
        return self.metadata["inputs"][0]["shape"][1:]

    def decode(self, data: bytes) -> np.ndarray:
        """Upload bytes -> float32 [C, H, W] with nnserve's own code (service.images: Pillow decode, then the
        lookup-table preprocessing), so the rows compare serving stacks, not preprocessing paths."""
        return preprocess_upload(data, self.metadata["preprocessing"])

    def decode_reference(self, data: bytes) -> np.ndarray:
        """The same with training's array path (models.preprocess.preprocess_uint8): what the baselines used
        before issue 16; the bench times both (nnserve's preprocessing speed-up, its own row)."""
        spec = self.metadata["preprocessing"]
        return preprocess_uint8(image_to_uint8(Image.open(io.BytesIO(data)), spec)[None], spec)[0]

    def run(self, batch: np.ndarray, output: str | None = None) -> np.ndarray:
        """One ORT call on a float32 [N, C, H, W] batch; the first output unless ``output`` names one."""
        names = [output] if output else None
        return self.session.run(names, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def top_k(self, logits: np.ndarray, k: int = 5) -> dict:
        """One item's logits -> ``{"model", "predictions": [{label, probability}]}``, as nnserve answers."""
        z = np.exp(logits.astype(np.float64) - logits.max())
        probabilities = z / z.sum()
        labels = self.metadata["labels"]
        best = np.argsort(-probabilities, kind="stable")[:max(1, k)]
        return {"model": self.tag, "predictions": [{"label": labels[i], "probability": float(probabilities[i])}
                                                   for i in best]}
