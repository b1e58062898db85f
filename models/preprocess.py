"""Image preprocessing shared by training and serving (numpy + Pillow only, no torch).

The spec is a plain dict stored in the model card and copied into the model store metadata, e.g.::

    {"channels": 1, "content_size": 28, "pad": 2, "input_size": 32,
     "mean": [0.1], "std": [0.3], "resample": "bilinear"}

Training feeds uint8 images of ``content_size`` through :func:`to_unit` (then augments) and
:func:`standardize`; the service decodes an upload with :func:`image_to_uint8` and runs the very same
two functions, so an image gives the same tensor in both (tests/test_service_preprocess.py proves it).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def image_to_uint8(image: Image.Image, spec: dict) -> np.ndarray:
    """Decoded PIL image -> uint8 array [content_size, content_size, channels]."""
    mode = "L" if spec["channels"] == 1 else "RGB"
    if image.mode in ("RGBA", "LA", "P"):
        # Flatten transparency onto black, the background of the training digits.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert(mode)
    size = spec["content_size"]
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE[spec.get("resample", "bilinear")])
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def to_unit(images: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 [N,H,W] or [N,H,W,C] -> float32 [N,C,input,input] in [0,1], zero-padded by ``pad``."""
    if images.ndim == 3:
        images = images[..., None]
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    p = spec["pad"]
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


def standardize(x: np.ndarray, spec: dict) -> np.ndarray:
    """Per-channel (x - mean) / std with the training-set statistics from the spec."""
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def preprocess_uint8(images: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 images of content_size -> the model's float32 input [N,C,input,input]."""
    return standardize(to_unit(images, spec), spec)


@functools.cache
def _lookup_table(channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [C, 256]: what to_unit + standardize make of each uint8 value, computed by those very functions
    (so the values are bit-identical); [C, 256] entry 0 is also the padding's value."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (1, 256, channels)).copy()
    spec = {"pad": 0, "mean": list(mean), "std": list(std)}
    return standardize(to_unit(values, spec), spec)[0, :, :, 0]


def preprocess_upload_pixels(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """One image's uint8 [H,W,C] -> float32 [C,input,input], equal to preprocess_uint8 (tested) at a fraction of
    the cost: one table lookup per pixel into a tensor pre-filled with the padding value (serving hot path)."""
    channels, p = pixels.shape[2], spec["pad"]
    table = _lookup_table(channels, tuple(spec["mean"]), tuple(spec["std"]))
    out = np.empty((channels, pixels.shape[0] + 2 * p, pixels.shape[1] + 2 * p), dtype=np.float32)
    out[:] = table[:, :1, None]  # every pixel the padding's value, then the image over it
    for c in range(channels):
        out[c, p:p + pixels.shape[0], p:p + pixels.shape[1]] = table[c][pixels[:, :, c]]
    return out


def preprocess_image(image: Image.Image, spec: dict) -> np.ndarray:
    """One decoded upload -> the model's float32 input [C,input,input]."""
    return preprocess_uint8(image_to_uint8(image, spec)[None], spec)[0]
