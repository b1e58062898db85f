"""Image preprocessing shared by training, export and serving (numpy + Pillow only, no torch).

The spec is a plain dict stored in the model card and copied into the model store metadata. Our MNIST
models use the legacy square form; a user's ImageNet-style model states a torchvision-like pipeline; a
PaddleOCR text-line model keeps the line's aspect ratio at a fixed height and pads it to a maximum width::

    {"channels": 1, "content_size": 28, "pad": 2, "input_size": 32,
     "mean": [0.1], "std": [0.3], "resample": "bilinear"}
    {"channels": 3, "resize": 256, "crop": [224, 224], "input_size": [224, 224],
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resample": "bilinear"}
    {"channels": 3, "channel_order": "BGR", "resize": {"height": 48, "max_width": 192},
     "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "pad_value": 0.5}

Fields (:func:`validate_spec` checks them all, naming the field and the fix):

- ``channels``: 1 (grayscale) or 3 (colour).
- ``channel_order``: ``RGB`` (default) or ``BGR`` (a network trained on OpenCV's ``cv2.imread`` images);
  ``mean``, ``std`` and ``pad_value`` are listed in that order.
- ``resize``: an int (the shorter side becomes that size, aspect kept: torchvision ``Resize(int)``),
  ``[height, width]`` (exact), or ``{"height": h, "max_width": w}`` (a text line: height h, aspect kept,
  width ``min(ceil(h * width / height), w)`` as PaddleOCR computes it, then padded on the right to w).
  Legacy ``content_size: s`` means ``resize: [s, s]``.
- ``crop``: optional ``[height, width]`` (or an int for a square) center crop after the resize
  (torchvision ``CenterCrop``). Required with a shorter-side resize: the model needs a fixed size.
- ``pad``: optional int, padding on every side after the crop.
- ``pad_value``: the padding's value in [0, 1] units (pixel / 255, before standardizing), one number or one
  per channel; default 0 (black). PaddleOCR pads with 0 *after* normalizing: that is ``pad_value`` = mean.
- ``mean``, ``std``: per-channel lists in [0, 1] units; the input is ``(pixel / 255 - mean) / std``.
- ``resample``: nearest | bilinear (default) | bicubic | lanczos.
- ``input_size``: optional int or ``[height, width]``; must equal :func:`input_hw` when given.

Training feeds uint8 images through :func:`to_unit` (then augments) and :func:`standardize`; the service
decodes an upload with :func:`image_to_uint8` and runs the very same two functions (or a lookup table
built from them), so an image gives the same tensor in both (tests/test_service_preprocess.py proves it).
Export reads evaluation images through the same path, so parity and the INT8 gate see what serving sees.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NoReturn, TypeGuard

import numpy as np
from PIL import Image

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
SPEC_KEYS = ("channels", "channel_order", "resize", "crop", "pad", "pad_value", "mean", "std", "resample",
             "content_size", "input_size", "layout")
LAYOUTS = ("NCHW", "NHWC")  # the model's input layout: PyTorch's channels first, or TensorFlow's channels last
CHANNEL_ORDERS = ("RGB", "BGR")  # BGR: what OpenCV's imread gives, so what OpenCV-trained networks expect
TEXT_LINE_KEYS = ("height", "max_width")


@dataclass(frozen=True)
class TextLine:
    """``resize: {"height": h, "max_width": w}``: PaddleOCR's text-line resize (``resize_norm_img``): height h,
    aspect kept, width ``min(ceil(h * width / height), w)`` (a longer line is squeezed to w), then padded on
    the right to w. Padding, not stretching, keeps a short word's letters their trained shape."""
    height: int
    max_width: int


Resize = int | tuple[int, int] | TextLine


class PreprocessingError(ValueError):
    """The preprocessing spec is invalid: a model configuration problem, not a client's."""


class ImageTooLarge(ValueError):
    """The resize would make more pixels than allowed: a long, thin upload under a shorter-side resize."""


def _fail(message: str) -> NoReturn:
    raise PreprocessingError(f"preprocessing spec: {message}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, Integral) and not isinstance(value, bool)  # numpy ints welcome; JSON true is no size


def _size_pair(spec: dict, key: str, int_means: str) -> int | tuple[int, int]:
    """A positive int or [height, width] of positive ints from spec[key], else a PreprocessingError."""
    value = spec[key]
    if _is_int(value) and value > 0:
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    _fail(f"'{key}' must be a positive int ({int_means}) or [height, width] of positive ints, got {value!r}")


def _text_line(value: dict) -> TextLine:
    keys = sorted(value)
    if keys != sorted(TEXT_LINE_KEYS) or not all(_is_int(v) and v > 0 for v in value.values()):
        _fail(f"'resize' as an object is a text-line resize and needs exactly 'height' and 'max_width', positive "
              f"ints (e.g. {{\"height\": 48, \"max_width\": 320}}), got {value!r}")
    return TextLine(int(value["height"]), int(value["max_width"]))


def _geometry(spec: dict) -> tuple[Resize, tuple[int, int] | None, int]:
    """(resize, crop, pad) of a spec, checked: resize is an int (shorter side), (h, w) or a TextLine; crop is
    (h, w) or None."""
    if "resize" in spec and "content_size" in spec:
        _fail("give 'resize' or the legacy 'content_size', not both")
    if "content_size" in spec:
        side = spec["content_size"]
        if not (_is_int(side) and side > 0):
            _fail(f"'content_size' must be a positive int (the side of the square), got {side!r}; "
                  "use 'resize': [height, width] for a non-square size")
        resize: Resize = (side, side)
    elif isinstance(spec.get("resize"), dict):
        resize = _text_line(spec["resize"])
    elif "resize" in spec:
        resize = _size_pair(spec, "resize", "the shorter side, aspect kept")
    else:
        _fail("missing 'resize': give the shorter side as an int (with a 'crop'), the exact size as "
              "[height, width], or a text line's {\"height\": h, \"max_width\": w}")
    crop: tuple[int, int] | None = None
    if spec.get("crop") is not None:
        size = _size_pair(spec, "crop", "a square")
        crop = (size, size) if isinstance(size, int) else size
    pad = spec.get("pad", 0)
    if not (_is_int(pad) and pad >= 0):
        _fail(f"'pad' must be an int >= 0 (pixels on every side), got {pad!r}")

    if isinstance(resize, TextLine):
        if crop is not None:
            _fail("'crop' does not go with a text-line 'resize' ({\"height\", \"max_width\"}): the line is padded "
                  "to max_width, not cropped; drop 'crop'")
    elif isinstance(resize, int):
        if crop is None:
            _fail(f"'resize': {resize} (shorter side) without a 'crop' gives each upload's aspect ratio, but the "
                  f"model needs a fixed height x width: add 'crop': [height, width] or give 'resize' as "
                  f"[height, width]")
        if max(crop) > resize:  # else an upload whose short side lies along that axis is too small to crop
            _fail(f"'crop' {list(crop)} is larger than the shorter side 'resize': {resize}: crop at most "
                  f"{resize} on each side, or resize larger")
    elif crop is not None and (crop[0] > resize[0] or crop[1] > resize[1]):
        _fail(f"'crop' {list(crop)} is larger than 'resize' {list(resize)}: crop at most the resized "
              f"[height, width], or resize larger")
    return resize, crop, pad


def _check_channel_stats(spec: dict, key: str, channels: int) -> list[float]:
    if key not in spec:
        _fail(f"missing '{key}': give one value per channel in [0, 1] units (pixel / 255)")
    values = spec[key]
    if not (isinstance(values, (list, tuple)) and all(isinstance(v, Real) and not isinstance(v, bool)
                                                      and math.isfinite(v) for v in values)):
        _fail(f"'{key}' must be a list of finite numbers, one per channel, got {values!r}")
    if len(values) != channels:
        _fail(f"'{key}' has {len(values)} value(s) but 'channels' is {channels}: give one per channel")
    return list(values)


def _parse(spec: dict) -> tuple[Resize, tuple[int, int] | None, int, tuple[int, int]]:
    """Every check of validate_spec; returns (resize, crop, pad, input (h, w)) for the functions that need them."""
    if not isinstance(spec, dict):
        _fail(f"must be a dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        _fail(f"unknown key(s) {', '.join(map(repr, unknown))}: allowed keys are {', '.join(SPEC_KEYS)}")
    channels = spec.get("channels")
    if channels not in (1, 3) or isinstance(channels, bool):
        _fail(f"'channels' must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    order = spec.get("channel_order", "RGB")
    if order not in CHANNEL_ORDERS:
        _fail(f"'channel_order' must be RGB or BGR (OpenCV's order), got {order!r}")
    if order == "BGR" and channels != 3:
        _fail("'channel_order' BGR needs 'channels': 3 (a grayscale image has one channel to order)")
    resize, crop, pad = _geometry(spec)
    if isinstance(resize, TextLine):
        h, w = resize.height, resize.max_width
    elif crop is not None:
        h, w = crop
    else:
        assert not isinstance(resize, int)  # _geometry refuses an int (shorter side) resize without a crop
        h, w = resize
    derived = h + 2 * pad, w + 2 * pad
    mean = _check_channel_stats(spec, "mean", channels)
    std = _check_channel_stats(spec, "std", channels)
    if not all(0 <= m <= 1 for m in mean):  # the usual slip: ImageNet's 123.675 instead of 0.485
        _fail(f"'mean' must be in [0, 1] units (pixel / 255), got {mean}: divide 0-255 values by 255")
    if not all(s > 0 for s in std):
        _fail(f"'std' must be > 0 for every channel (it divides), got {std}")
    if "pad_value" in spec:
        value = spec["pad_value"]
        values = value if isinstance(value, (list, tuple)) else [value]
        if not (len(values) in (1, channels) and all(isinstance(v, Real) and not isinstance(v, bool)
                                                     and math.isfinite(v) and 0 <= float(v) <= 1 for v in values)):
            _fail(f"'pad_value' must be one number, or one per channel, in [0, 1] units (pixel / 255, like "
                  f"'mean'), got {value!r}: e.g. 0 (black), 0.5, or the mean to pad with 0 after normalizing")
    if spec.get("layout", "NCHW") not in LAYOUTS:
        _fail(f"'layout' must be NCHW (channels first, PyTorch) or NHWC (channels last, TensorFlow/Keras), "
              f"got {spec['layout']!r}")
    resample = spec.get("resample", "bilinear")
    if not isinstance(resample, str) or resample not in RESAMPLE:
        _fail(f"'resample' must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    if "input_size" in spec:
        size = _size_pair(spec, "input_size", "a square")
        stated = (size, size) if isinstance(size, int) else size
        if stated != derived:
            _fail(f"'input_size' {spec['input_size']!r} disagrees with the [height, width] the spec gives, "
                  f"{list(derived)} (crop, the exact resize or the text line's height x max_width, plus 2 * pad): "
                  "fix 'input_size' or resize/crop/pad")
    return resize, crop, pad, derived


def validate_spec(spec: dict) -> None:
    """Raise PreprocessingError naming the field and the fix if ``spec`` is not a usable preprocessing spec."""
    _parse(spec)


def input_hw(spec: dict) -> tuple[int, int]:
    """The model input's (height, width): the crop (exact resize, or text line's height x max_width) plus
    2 * pad. Validates the spec."""
    return _parse(spec)[3]


def resized_size(width: int, height: int, resize: Resize) -> tuple[int, int]:
    """Pillow (width, height) a width x height image gets from ``resize`` (an int: the shorter side, sized exactly
    as torchvision does; (height, width); or a TextLine, sized exactly as PaddleOCR does)."""
    if isinstance(resize, TextLine):
        wide = math.ceil(resize.height * (width / float(height)))  # PaddleOCR's resize_norm_img, to the float
        return min(wide, resize.max_width), resize.height
    if not isinstance(resize, int):
        return resize[1], resize[0]
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def image_to_uint8(image: Image.Image, spec: dict, max_pixels: int | None = None) -> np.ndarray:
    """Decoded PIL image -> uint8 array [H, W, channels] in the spec's channel order: mode conversion, resize,
    center crop (no padding: :func:`to_unit` adds it; a text line comes back at its own width). Raises
    PreprocessingError for an invalid spec, and ImageTooLarge if the resized image (before the crop) would have
    more than ``max_pixels``."""
    resize, crop, _, _ = _parse(spec)
    size = resized_size(*image.size, resize)
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        # A shorter-side resize scales the long side too: a 1 x 50000 upload would become 256 x 12800000.
        raise ImageTooLarge(f"the {image.width}x{image.height} image would be resized to {size[0]}x{size[1]} = "
                            f"{size[0] * size[1]} pixels for this model, over the limit of {max_pixels}: send an "
                            f"image closer to the model's aspect ratio")
    mode = "L" if spec["channels"] == 1 else "RGB"
    if image.mode in ("RGBA", "LA", "P"):
        # Flatten transparency onto black, the background of the training digits.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, RESAMPLE[spec.get("resample", "bilinear")])
    array = np.asarray(image, dtype=np.uint8)
    if crop is not None:
        # torchvision CenterCrop's offsets, Python's round() included (halves go to even).
        top = int(round((array.shape[0] - crop[0]) / 2.0))
        left = int(round((array.shape[1] - crop[1]) / 2.0))
        array = array[top:top + crop[0], left:left + crop[1]]
    if array.ndim == 2:
        return array[:, :, None]
    # Pillow decodes RGB; a network trained on cv2.imread's arrays takes them reversed.
    return np.ascontiguousarray(array[:, :, ::-1]) if spec.get("channel_order") == "BGR" else array


def padding(spec: dict, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of a [height, width] image from :func:`image_to_uint8`: ``pad`` on every
    side, and a text line's right side up to its max_width."""
    p = spec.get("pad", 0)
    resize = spec.get("resize")
    max_width = resize["max_width"] if isinstance(resize, dict) else width
    if max_width < width:
        raise PreprocessingError(f"preprocessing: an image {width} wide is wider than the text line's max_width "
                                 f"{max_width}: make it with image_to_uint8")
    extra = max_width - width
    return p, p, p, p + extra


def pad_unit(spec: dict, channels: int) -> np.ndarray:
    """float32 [channels]: the padding's value in [0, 1] units (``pad_value``, default 0)."""
    value = spec.get("pad_value", 0)
    values = value if isinstance(value, (list, tuple)) else [value] * channels
    return np.asarray(values if len(values) == channels else values * channels, dtype=np.float32)


def to_unit(images: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 [N,H,W] or [N,H,W,C] -> float32 [N,C,H',W'] in [0,1], padded (:func:`padding`) with ``pad_value``."""
    if images.ndim == 3:
        images = images[..., None]
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    n, channels, height, width = x.shape
    top, bottom, left, right = padding(spec, height, width)
    if not (top or bottom or left or right):
        return x
    out = np.empty((n, channels, height + top + bottom, width + left + right), dtype=np.float32)
    out[:] = pad_unit(spec, channels).reshape(1, channels, 1, 1)
    out[:, :, top:top + height, left:left + width] = x
    return out


def standardize(x: np.ndarray, spec: dict) -> np.ndarray:
    """Per-channel (x - mean) / std with the training-set statistics from the spec."""
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def preprocess_uint8(images: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 images as :func:`image_to_uint8` gives them, [N,H,W(,C)] -> the model's float32 input [N,C,H',W']."""
    return standardize(to_unit(images, spec), spec)


@functools.cache
def _lookup_table(channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [C, 256]: what to_unit + standardize make of each uint8 value, computed by those very functions
    (so the values are bit-identical)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (1, 256, channels)).copy()
    spec = {"pad": 0, "mean": list(mean), "std": list(std)}
    return standardize(to_unit(values, spec), spec)[0, :, :, 0]


@functools.cache
def _pad_fill(channels: int, pad_value: float | tuple[float, ...], mean: tuple[float, ...],
              std: tuple[float, ...]) -> np.ndarray:
    """float32 [C]: what to_unit + standardize make of the padding, computed by those very functions."""
    spec = {"pad_value": list(pad_value) if isinstance(pad_value, tuple) else pad_value, "mean": list(mean),
            "std": list(std)}
    return standardize(pad_unit(spec, channels).reshape(1, channels, 1, 1), spec).reshape(channels)


def preprocess_upload_pixels(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """One image's uint8 [H,W,C] -> the model's float32 input [C,H',W'] (or [H',W',C] for an NHWC ``layout``),
    equal to preprocess_uint8 (tested) at a fraction of the cost: one table lookup per pixel into a tensor
    pre-filled with the padding's value (serving hot path)."""
    height, width, channels = pixels.shape
    top, bottom, left, right = padding(spec, height, width)
    mean, std = tuple(spec["mean"]), tuple(spec["std"])
    table = _lookup_table(channels, mean, std)
    out = np.empty((channels, height + top + bottom, width + left + right), dtype=np.float32)
    if top or bottom or left or right:
        value = spec.get("pad_value", 0)
        out[:] = _pad_fill(channels, tuple(value) if isinstance(value, list) else value, mean, std)[:, None, None]
    for c in range(channels):
        out[c, top:top + height, left:left + width] = table[c][pixels[:, :, c]]
    return np.ascontiguousarray(out.transpose(1, 2, 0)) if spec.get("layout") == "NHWC" else out


def preprocess_image(image: Image.Image, spec: dict) -> np.ndarray:
    """One decoded upload -> the model's float32 input [C,H,W]."""
    return preprocess_uint8(image_to_uint8(image, spec)[None], spec)[0]
