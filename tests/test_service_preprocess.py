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

from models.preprocess import RESAMPLE, standardize, to_unit
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
    from models.preprocess import preprocess_uint8, preprocess_upload_pixels

    spec = {"pad": pad, "mean": [0.5, 0.45, 0.4][:channels], "std": [0.25, 0.2, 0.3][:channels]}
    pixels = np.random.default_rng(channels + pad).integers(0, 256, (17, 17, channels), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_upload_pixels(pixels, spec), preprocess_uint8(pixels[None], spec)[0])
