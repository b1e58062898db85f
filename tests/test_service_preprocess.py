"""Upload decoding and preprocessing in the service (service/images.py), without a server.

The key claim: an image uploaded to the service becomes exactly the tensor training computed for it.
Training sees MNIST digits as uint8 [28, 28] and runs ``standardize(to_unit(x))``; the service gets
encoded bytes (PNG, JPEG, with colour or alpha) and must land on the same floats, using the spec stored
in the model-store metadata.
"""

from __future__ import annotations

import io
import struct
import zlib

import bentoml
import numpy as np
import pytest
from PIL import Image

from models.preprocess import (
    RESAMPLE,
    PreprocessingError,
    TextLine,
    image_to_uint8,
    input_hw,
    preprocess_uint8,
    preprocess_upload_pixels,
    resized_size,
    standardize,
    to_unit,
    validate_spec,
)
from service import images
from service.errors import ClientError
from service.uploads import parse_multipart


@pytest.fixture(scope="module")
def spec(tiny_store) -> dict:
    """The preprocessing spec of the served lenet5, as the service reads it: from the store metadata."""
    return bentoml.models.get(tiny_store["lenet5"]).info.metadata["preprocessing"]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from models.data import load_mnist

    return load_mnist(seed=0, limit=300).x_test[:8]  # uint8 [8, 28, 28], what training evaluates on


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def training_tensor(digit: np.ndarray, spec: dict) -> np.ndarray:
    """Exactly what models/train.py feeds the network for this digit (after augmentation, which is off
    at evaluation): to_unit, then standardize with the training-set mean/std."""
    return standardize(to_unit(digit[None], spec), spec)[0]


def test_png_upload_equals_training_preprocessing(spec, digits):
    for digit in digits:
        got = images.preprocess_upload(encode(Image.fromarray(digit)), spec)
        want = training_tensor(digit, spec)
        assert got.dtype == np.float32 and got.shape == (spec["channels"], spec["input_size"], spec["input_size"])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_and_alpha_uploads_equal_training_preprocessing(spec, digits, mode):
    """A grey digit saved as RGB / with an opaque alpha channel / as a palette image: same tensor."""
    digit = digits[0]
    image = Image.fromarray(digit).convert(mode)
    np.testing.assert_array_equal(images.preprocess_upload(encode(image), spec), training_tensor(digit, spec))


def test_transparent_background_becomes_black(spec, digits):
    """Strokes on a transparent background (alpha = stroke) flatten onto black, like MNIST."""
    digit = digits[0]
    white = np.full_like(digit, 255)
    rgba = np.stack([white, white, white, digit], axis=-1)  # white ink, opacity = the digit
    got = images.preprocess_upload(encode(Image.fromarray(rgba, "RGBA")), spec)
    np.testing.assert_allclose(got, training_tensor(digit, spec), atol=2 / 255 / min(spec["std"]))


def test_larger_image_is_resized_with_the_spec_resampling(spec, digits):
    big = Image.fromarray(digits[0]).resize((56, 56), Image.Resampling.NEAREST)
    got = images.preprocess_upload(encode(big), spec)
    resized = np.asarray(big.resize((spec["content_size"],) * 2, RESAMPLE[spec["resample"]]))
    np.testing.assert_array_equal(got, training_tensor(resized, spec))


def test_jpeg_upload_decodes(spec, digits):
    got = images.preprocess_upload(encode(Image.fromarray(digits[0]), "JPEG", quality=95), spec)
    # JPEG is lossy: close to the training tensor, not equal.
    assert np.abs(got - training_tensor(digits[0], spec)).mean() < 0.1


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC) with one tiny IDAT: a decompression bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"hello, I am text", 415, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 400, "corrupt"),
    (png_header_claiming(30000, 30000), 413, "pixels"),
    (png_header_claiming(5000, 5000), 413, "limit"),
])
def test_bad_uploads_are_client_errors_naming_the_problem(spec, data, status, words):
    with pytest.raises(ClientError) as info:
        images.preprocess_upload(data, spec)
    assert info.value.status == status
    assert words in str(info.value)


def test_truncated_image_is_a_client_error(spec, digits):
    big = Image.fromarray(np.tile(digits[0], (8, 8)))  # 224x224: enough data to cut in half
    for fmt in ("PNG", "JPEG"):
        data = encode(big, fmt)
        with pytest.raises(ClientError, match="truncated or corrupt"):
            images.preprocess_upload(data[:len(data) // 2], spec)


def test_upload_over_the_byte_limit(spec, digits):
    data = encode(Image.fromarray(digits[0]))
    with pytest.raises(ClientError) as info:
        images.decode_image(data, max_bytes=len(data) - 1)
    assert info.value.status == 413


@pytest.mark.parametrize("body, content_type, status, words", [
    (b"", "multipart/form-data; boundary=b", 400, "empty request body"),
    (b"x", "application/x-www-form-urlencoded", 415, "multipart/form-data"),
    (b"x", "multipart/form-data", 400, "no boundary"),
    (b"--b\r\nContent-Disposi\x01tion: x\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b", 400,
     "malformed multipart"),
    (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b", 400,
     "no Content-Disposition"),
    (b"--b\r\nContent-Disposition: form-data; filename=" + b"a" * 8000 + b"\r\n\r\nx\r\n--b--\r\n",
     "multipart/form-data; boundary=b", 400, "header size"),
    (b"--b\r\nContent-Disposition: form-data; name=image\r\n\r\nx\r\n--b\r\n"
     b"Content-Disposition: form-data; name=image\r\n\r\ny\r\n--b--\r\n", "multipart/form-data; boundary=b", 400,
     "more than once"),
])
def test_malformed_multipart_is_a_client_error_naming_the_problem(body, content_type, status, words):
    with pytest.raises(ClientError) as info:
        parse_multipart(body, content_type)
    assert info.value.status == status and words in str(info.value)


def test_multipart_parts_keep_their_bytes_and_filenames(digits):
    data = encode(Image.fromarray(digits[0]))
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"d.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--xyz\r\n"
            b"Content-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n--xyz--\r\n")
    parts = parse_multipart(body, "multipart/form-data; boundary=xyz")
    assert parts["image"].data == data and parts["image"].filename == "d.png"
    assert parts["top_k"].data == b"3" and parts["top_k"].filename is None


def test_ghostscript_formats_are_refused(spec):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ClientError) as info:
        images.preprocess_upload(eps, spec)
    assert info.value.status == 415


@pytest.mark.parametrize("channels,pad", [(1, 0), (3, 2), (3, 0)])
def test_lookup_table_preprocessing_equals_training_functions(channels, pad):
    # The serving path's table lookup must give the training functions' floats bit for bit.
    spec = {"pad": pad, "mean": [0.5, 0.45, 0.4][:channels], "std": [0.25, 0.2, 0.3][:channels]}
    for shape in ((17, 17), (17, 23), (23, 9)):  # square and non-square, both orientations
        pixels = np.random.default_rng(channels + pad).integers(0, 256, (*shape, channels), dtype=np.uint8)
        got = preprocess_upload_pixels(pixels, spec)
        assert got.shape == (channels, shape[0] + 2 * pad, shape[1] + 2 * pad)
        np.testing.assert_array_equal(got, preprocess_uint8(pixels[None], spec)[0])


# ---- the spec beyond our square MNIST models: users' RGB / non-square models --------------------------------

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGENET = {"channels": 3, "resize": 256, "crop": [224, 224], "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "resample": "bilinear"}


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random image (noise upsampled), so that resampling and cropping offsets both matter."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    noise = np.random.default_rng(seed).integers(0, 256, (height // 8 + 2, width // 8 + 2, channels), dtype=np.uint8)
    small = Image.fromarray(noise[..., 0] if channels == 1 else noise, mode)
    return small.resize((width, height), Image.Resampling.BICUBIC)


def torchvision_reference(image: Image.Image, shorter: int, crop: tuple[int, int], mean: list, std: list,
                          resample: str = "bilinear") -> np.ndarray:
    """What torchvision's Resize(shorter) -> CenterCrop(crop) -> ToTensor() -> Normalize(mean, std) computes on a
    PIL image, written out plainly: Pillow resize, Pillow crop, / 255, then (x - mean) / std in float64."""
    w, h = image.size
    # torchvision _compute_resized_output_size: the short side becomes `shorter`, the long one int(shorter*long/short)
    size = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)
    resized = image.resize(size, RESAMPLE[resample]) if size != image.size else image
    top, left = int(round((size[1] - crop[0]) / 2.0)), int(round((size[0] - crop[1]) / 2.0))  # torchvision CenterCrop
    cropped = resized.crop((left, top, left + crop[1], top + crop[0]))
    x = np.asarray(cropped, dtype=np.float64).reshape(crop[0], crop[1], -1).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(mean).reshape(-1, 1, 1)) / np.asarray(std).reshape(-1, 1, 1)


OLD_SPEC = {"channels": 1, "content_size": 28, "pad": 2, "input_size": 32, "mean": [0.13], "std": [0.31],
            "resample": "bilinear"}


def old_preprocess_image(image: Image.Image, spec: dict) -> np.ndarray:
    """image_to_uint8, to_unit and standardize of models/preprocess.py before resize/crop existed (commit 5985ba4),
    inlined verbatim: the legacy spec must keep giving exactly these floats."""
    mode = "L" if spec["channels"] == 1 else "RGB"
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert(mode)
    size = spec["content_size"]
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE[spec.get("resample", "bilinear")])
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    x = array[None].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    p = spec["pad"]
    x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)[0]


@pytest.mark.parametrize("mode, size", [("L", (28, 28)), ("L", (56, 56)), ("RGB", (40, 30)), ("RGBA", (33, 47)),
                                        ("P", (28, 28)), ("LA", (20, 64))])
@pytest.mark.parametrize("legacy", ["card", "fixture"])
def test_legacy_spec_is_bit_identical_to_the_old_code(spec, mode, size, legacy):
    legacy_spec = OLD_SPEC if legacy == "card" else spec
    base = photo(*size, "RGBA" if mode in ("RGBA", "LA") else "RGB", seed=size[0])
    image = base.convert(mode)
    want = old_preprocess_image(image, legacy_spec)
    assert input_hw(legacy_spec) == (32, 32) and want.shape == (1, 32, 32)
    np.testing.assert_array_equal(images.preprocess_upload(encode(image), legacy_spec), want)  # serving fast path
    np.testing.assert_array_equal(preprocess_uint8(image_to_uint8(image, legacy_spec)[None], legacy_spec)[0], want)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (301, 200), (427, 640), (224, 224), (64, 48)])
@pytest.mark.parametrize("crop", [(224, 224), (224, 160)])
def test_rgb_shorter_side_resize_and_center_crop_match_torchvision_semantics(size, crop):
    spec = {**IMAGENET, "crop": list(crop)}
    image = photo(*size, seed=size[0] + size[1])
    got = images.preprocess_upload(encode(image), spec)
    assert got.dtype == np.float32 and got.shape == (3, *crop) and input_hw(spec) == crop
    np.testing.assert_allclose(got, torchvision_reference(image, 256, crop, IMAGENET_MEAN, IMAGENET_STD),
                               rtol=0, atol=1e-6)


def test_shorter_side_sizes_are_torchvision_s():
    # Known torchvision Resize(256) output sizes, (width, height): the long side truncates, never rounds.
    for (w, h), want in {(500, 375): (341, 256), (375, 500): (256, 341), (301, 200): (385, 256),
                         (100, 100): (256, 256), (640, 427): (383, 256), (427, 640): (256, 383),
                         (3, 1000): (256, 85333)}.items():
        assert resized_size(w, h, 256) == want
    assert resized_size(500, 375, (24, 40)) == (40, 24)  # [height, width] -> Pillow's (width, height)


def test_center_crop_rounds_like_torchvision():
    # An exact resize to the image's own size resamples nothing, so the crop offsets show: 9 - 4 = 5 columns
    # to drop, 2.5 on each side; torchvision's int(round(2.5)) is 2 (half to even), not 3.
    pixels = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9)
    spec = {"channels": 1, "resize": [6, 9], "crop": [3, 4], "mean": [0.0], "std": [1.0]}
    got = image_to_uint8(Image.fromarray(pixels), spec)[:, :, 0]
    np.testing.assert_array_equal(got, pixels[2:5, 2:6])  # rows: (6 - 3) / 2 = 1.5 -> 2


def test_non_square_exact_resize():
    spec = {"channels": 1, "resize": [24, 40], "pad": 1, "mean": [0.5], "std": [0.25], "resample": "bicubic",
            "input_size": [26, 42]}
    image = photo(100, 60, "L")
    got = images.preprocess_upload(encode(image), spec)
    assert got.shape == (1, 26, 42) and input_hw(spec) == (26, 42)
    resized = np.asarray(image.resize((40, 24), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    want = (np.pad(resized, 1) - 0.5) / 0.25  # padding is 0 before standardizing, like the legacy pad
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec_", [
    {**IMAGENET, "crop": [224, 160]},
    {**IMAGENET, "crop": 200, "pad": 3, "resample": "lanczos"},
    {"channels": 3, "resize": [24, 40], "pad": 2, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    {"channels": 1, "resize": [40, 24], "crop": [31, 17], "mean": [0.2], "std": [0.7], "resample": "nearest"},
    OLD_SPEC,
])
@pytest.mark.parametrize("size", [(300, 200), (150, 411)])
def test_fast_path_equals_training_functions_for_new_specs(spec_, size):
    pixels = image_to_uint8(photo(*size, seed=size[1]), spec_)
    fast = preprocess_upload_pixels(pixels, spec_)
    assert fast.shape == (spec_["channels"], *input_hw(spec_))
    np.testing.assert_array_equal(fast, preprocess_uint8(pixels[None], spec_)[0])


def test_grayscale_upload_to_an_rgb_model_is_converted():
    image = photo(320, 240, "L", seed=3)
    got = images.preprocess_upload(encode(image), IMAGENET)
    want = torchvision_reference(image.convert("RGB"), 256, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    unit = got * np.reshape(IMAGENET_STD, (3, 1, 1)) + np.reshape(IMAGENET_MEAN, (3, 1, 1))
    np.testing.assert_allclose(unit[0], unit[1], atol=1e-6)  # grey: the three channels carry the same pixels
    np.testing.assert_allclose(unit[0], unit[2], atol=1e-6)


def test_rgba_upload_to_an_rgb_model_flattens_onto_black():
    rgba = np.asarray(photo(300, 260, "RGBA", seed=4))
    got = images.preprocess_upload(encode(Image.fromarray(rgba, "RGBA")), IMAGENET)
    premultiplied = (rgba[..., :3] * (rgba[..., 3:] / 255.0)).round().astype(np.uint8)  # colour over black
    want = torchvision_reference(Image.fromarray(premultiplied), 256, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(got, want, rtol=0, atol=2 / 255 / min(IMAGENET_STD))
    clear = images.preprocess_upload(encode(Image.new("RGBA", (300, 260), (255, 255, 255, 0))), IMAGENET)
    np.testing.assert_allclose(clear, np.broadcast_to(-np.reshape(IMAGENET_MEAN, (3, 1, 1))
                                                      / np.reshape(IMAGENET_STD, (3, 1, 1)), clear.shape), atol=1e-6)


@pytest.mark.parametrize("spec_, hw", [
    (OLD_SPEC, (32, 32)),
    (IMAGENET, (224, 224)),
    ({**IMAGENET, "crop": 224, "input_size": 224}, (224, 224)),
    ({**IMAGENET, "crop": [224, 160], "pad": 4, "input_size": [232, 168]}, (232, 168)),
    ({"channels": 1, "resize": [24, 40], "mean": [0.5], "std": [0.25]}, (24, 40)),
    ({"channels": 3, "resize": [300, 200], "crop": [224, 160], "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
     (224, 160)),
])
def test_input_hw(spec_, hw):
    validate_spec(spec_)
    assert input_hw(spec_) == hw


def without(spec: dict, key: str) -> dict:
    return {k: v for k, v in spec.items() if k != key}


@pytest.mark.parametrize("bad, words", [
    ({**IMAGENET, "channels": 4}, ["'channels'", "1 (grayscale) or 3 (RGB)"]),
    ({**IMAGENET, "channels": True}, ["'channels'"]),
    (without(IMAGENET, "resize"), ["missing 'resize'", "[height, width]"]),
    ({**IMAGENET, "resize": "256"}, ["'resize'", "positive int"]),
    ({**IMAGENET, "resize": [256]}, ["'resize'", "[height, width]"]),
    ({**IMAGENET, "resize": [256, 0]}, ["'resize'"]),
    ({**OLD_SPEC, "resize": [28, 28]}, ["'resize'", "'content_size'", "not both"]),
    ({**OLD_SPEC, "content_size": [28, 28]}, ["'content_size'", "'resize': [height, width]"]),
    ({**IMAGENET, "resize": [256, 256], "crop": [300, 200]}, ["'crop'", "larger than 'resize'"]),
    ({**IMAGENET, "crop": 300}, ["'crop'", "larger", "resize larger"]),
    ({**IMAGENET, "crop": [224, 300]}, ["'crop'", "larger"]),  # a portrait upload would be 256 wide
    ({**IMAGENET, "crop": [224, "x"]}, ["'crop'"]),
    (without(IMAGENET, "crop"), ["'resize'", "'crop'", "aspect ratio", "[height, width]"]),
    ({**IMAGENET, "mean": [0.5]}, ["'mean'", "1 value(s)", "'channels' is 3"]),
    ({**IMAGENET, "std": [0.2, 0.2]}, ["'std'", "2 value(s)"]),
    (without(IMAGENET, "std"), ["missing 'std'"]),
    ({**IMAGENET, "std": [0.2, 0.0, 0.2]}, ["'std'", "> 0"]),
    ({**IMAGENET, "std": [0.2, -0.1, 0.2]}, ["'std'", "> 0"]),
    ({**IMAGENET, "mean": [0.5, float("nan"), 0.5]}, ["'mean'", "finite"]),
    ({**IMAGENET, "mean": [123.675, 116.28, 103.53]}, ["'mean'", "divide 0-255 values by 255"]),
    ({**IMAGENET, "resample": "area"}, ["'resample'", "nearest, bilinear, bicubic, lanczos"]),
    ({**IMAGENET, "corp": [224, 224]}, ["'corp'", "allowed keys are", "crop"]),
    ({**IMAGENET, "input_size": 256}, ["'input_size'", "[224, 224]"]),
    ({**IMAGENET, "crop": [224, 160], "input_size": [160, 224]}, ["'input_size'", "[224, 160]"]),
    ({**OLD_SPEC, "input_size": 28}, ["'input_size'", "[32, 32]", "pad"]),
    ({**OLD_SPEC, "pad": -1}, ["'pad'", ">= 0"]),
])
def test_validate_spec_names_the_field_and_the_fix(bad, words):
    for check in (validate_spec, input_hw, lambda s: image_to_uint8(Image.new("RGB", (300, 300)), s)):
        with pytest.raises(PreprocessingError) as info:
            check(bad)
        assert isinstance(info.value, ValueError)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_a_bad_spec_is_a_server_error_not_the_clients(digits):
    # images.preprocess_upload turns upload problems into 4xx ClientErrors; a broken spec is the model's
    # configuration, so it surfaces as itself (the service's warm-up upload fails the model's load with it).
    with pytest.raises(PreprocessingError, match="'resample'") as info:
        images.preprocess_upload(encode(Image.fromarray(digits[0])), {**OLD_SPEC, "resample": "area"})
    assert not isinstance(info.value, ClientError)


def test_a_long_thin_upload_cannot_blow_up_the_resize():
    # Under the upload pixel limit, but its shorter side to 256 would make 256 x 640000 pixels: refused (413)
    # before Pillow allocates anything, naming the sizes.
    thin = encode(Image.new("RGB", (1, 2500)))
    with pytest.raises(ClientError, match="1x2500 image would be resized to 256x640000") as info:
        images.preprocess_upload(thin, IMAGENET, max_pixels=100_000)
    assert info.value.status == 413
    assert images.preprocess_upload(encode(Image.new("RGB", (50, 2500))), IMAGENET).shape == (3, 224, 224)


# ---- pipelines of other frameworks: OpenCV's BGR, PaddleOCR's text lines (issue 28) ------------------------------

TEXT_LINE = {"channels": 3, "channel_order": "BGR", "resize": {"height": 48, "max_width": 192},
             "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "pad_value": 0.5}


def paddleocr_resize_norm_img(bgr: np.ndarray, height: int, max_width: int) -> np.ndarray:
    """PaddleOCR's ClsPredictor.resize_norm_img, line for line, with Pillow's bilinear resize standing in for
    cv2.resize (the one thing nnserve does differently: Pillow's filter; docs/your-model.md says so)."""
    h, w = bgr.shape[:2]
    ratio = w / float(h)
    resized_w = max_width if np.ceil(height * ratio) > max_width else int(np.ceil(height * ratio))
    resized = np.asarray(Image.fromarray(bgr[..., ::-1]).resize((resized_w, height), Image.Resampling.BILINEAR))
    resized = resized[..., ::-1].astype("float32").transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    padded = np.zeros((3, height, max_width), dtype=np.float32)
    padded[:, :, 0:resized_w] = resized
    return padded


@pytest.mark.parametrize("size", [(30, 40), (100, 48), (300, 40), (900, 30), (192, 48)])
def test_text_line_resize_is_paddleocrs(size):
    """A short word keeps its shape and is padded; a long line is squeezed to max_width; same floats as PaddleOCR."""
    image = photo(*size, seed=size[0])
    got = images.preprocess_upload(encode(image), TEXT_LINE)
    assert got.shape == (3, 48, 192) and input_hw(TEXT_LINE) == (48, 192)
    want = paddleocr_resize_norm_img(np.asarray(image)[..., ::-1], 48, 192)
    np.testing.assert_array_equal(got, want)
    width = min(int(np.ceil(48 * size[0] / size[1])), 192)
    assert resized_size(*size, TextLine(48, 192)) == (width, 48)
    assert (got[:, :, width:] == 0).all(), "padded with 0 after normalizing, as PaddleOCR pads"


def test_bgr_reverses_the_channels_and_mean_std_follow_the_networks_order():
    image = photo(64, 64, seed=7)
    rgb_spec = {"channels": 3, "resize": [32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    bgr_spec = {**rgb_spec, "channel_order": "BGR", "mean": rgb_spec["mean"][::-1], "std": rgb_spec["std"][::-1]}
    rgb = images.preprocess_upload(encode(image), rgb_spec)
    bgr = images.preprocess_upload(encode(image), bgr_spec)
    np.testing.assert_array_equal(bgr, rgb[::-1])
    pixels = image_to_uint8(image, bgr_spec)
    np.testing.assert_array_equal(pixels, np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR))[..., ::-1])


@pytest.mark.parametrize("spec_", [
    TEXT_LINE,
    {**TEXT_LINE, "pad": 2, "pad_value": [0.1, 0.2, 0.3], "resample": "bicubic"},
    {**TEXT_LINE, "channels": 1, "channel_order": "RGB", "mean": [0.5], "std": [0.5], "pad_value": [0.25]},
    {**IMAGENET, "pad": 3, "pad_value": 114 / 255, "channel_order": "BGR"},
    {**TEXT_LINE, "layout": "NHWC"},
])
@pytest.mark.parametrize("size", [(31, 40), (500, 41)])
def test_fast_path_equals_training_functions_with_padding_values(spec_, size):
    pixels = image_to_uint8(photo(*size, seed=size[0]), spec_)
    fast = preprocess_upload_pixels(pixels, spec_)
    slow = preprocess_uint8(pixels[None], spec_)[0]
    np.testing.assert_array_equal(fast, slow.transpose(1, 2, 0) if spec_.get("layout") == "NHWC" else slow)
    height, width = input_hw(spec_)
    assert slow.shape == (spec_["channels"], height, width)
    pad = spec_.get("pad", 0)
    value = np.asarray(spec_["pad_value"], np.float32).reshape(-1)
    corner = (np.broadcast_to(value, (spec_["channels"],)) - np.float32(spec_["mean"])) / np.float32(spec_["std"])
    if pad or pixels.shape[1] + 2 * pad < width:  # a border, or a line narrower than max_width: padded
        np.testing.assert_array_equal(slow[:, -1, -1], corner.astype(np.float32))
    if pad:
        np.testing.assert_array_equal(slow[:, 0, 0], corner.astype(np.float32))


@pytest.mark.parametrize("bad, words", [
    ({**TEXT_LINE, "resize": {"height": 48}}, ["text-line resize", "'height' and 'max_width'"]),
    ({**TEXT_LINE, "resize": {"height": 48, "max_width": 0}}, ["'max_width'", "positive ints"]),
    ({**TEXT_LINE, "resize": {"height": 48, "max_widht": 192}}, ["'height' and 'max_width'"]),
    ({**TEXT_LINE, "crop": [48, 100]}, ["'crop' does not go with a text-line 'resize'"]),
    ({**TEXT_LINE, "channel_order": "bgr"}, ["'channel_order' must be RGB or BGR"]),
    ({**TEXT_LINE, "channels": 1, "mean": [0.5], "std": [0.5]}, ["'channel_order' BGR needs 'channels': 3"]),
    ({**TEXT_LINE, "pad_value": 127}, ["'pad_value'", "[0, 1] units"]),
    ({**TEXT_LINE, "pad_value": [0.5, 0.5]}, ["'pad_value'", "one per channel"]),
    ({**TEXT_LINE, "pad_value": []}, ["'pad_value'"]),
    ({**TEXT_LINE, "input_size": [48, 200]}, ["'input_size'", "[48, 192]"]),
])
def test_new_fields_are_validated_naming_the_fix(bad, words):
    with pytest.raises(PreprocessingError) as info:
        validate_spec(bad)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_text_line_fields_pass_the_card_schema():
    from models.card import CardError, validate_card

    card = {"format": "nnserve.artifact/2", "name": "cls", "kind": "image_classifier", "onnx": {"file": "m.onnx"},
            "labels": ["0", "180"], "preprocessing": {**TEXT_LINE, "input_size": [48, 192], "layout": "NCHW"}}
    assert validate_card(card) is card
    with pytest.raises(CardError, match="preprocessing.resize"):
        validate_card({**card, "preprocessing": {**TEXT_LINE, "resize": {"height": 48, "width": 192}}})
    with pytest.raises(CardError, match="unknown field\\(s\\) 'pad_vaule' \\(did you mean 'pad_value'\\?\\)"):
        validate_card({**card, "preprocessing": {**TEXT_LINE, "pad_vaule": 0.5}})
