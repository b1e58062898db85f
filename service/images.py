"""Uploaded image bytes -> the model's input tensor, with the checks an untrusted upload needs.

Decoding is Pillow; preprocessing is ``models.preprocess`` (the very functions training uses, torch-free),
driven by the ``preprocessing`` spec from the model-store metadata. Every problem with the upload is a
ClientError (4xx) naming it: empty, too many bytes, not an image, a format we do not decode, too many
pixels (checked from the header, before decoding: a decompression bomb never gets decoded), truncated
or corrupt data.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.preprocess import image_to_uint8, preprocess_uint8
from service.runtime import ClientError, PayloadTooLarge

MAX_UPLOAD_BYTES = int(os.environ.get("NNSERVE_MAX_UPLOAD_BYTES", str(10 << 20)))  # 10 MiB
MAX_IMAGE_PIXELS = int(os.environ.get("NNSERVE_MAX_IMAGE_PIXELS", str(4096 * 4096)))
# Raster formats Pillow decodes itself. Left out on purpose: EPS (Pillow runs Ghostscript on it) and
# formats Pillow cannot read at all; a format outside this list is a 415-style client error.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO", "PCX", "SGI", "QOI")


# Pillow reports a corrupt header as "cannot identify image file", like any non-image. These signatures
# tell the two apart so the error names the real problem (a corrupt PNG is not an unsupported format).
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


class UnsupportedImage(ClientError):
    status = 415


class UploadSizeLimit:
    """ASGI middleware on the upload routes: a body whose Content-Length is over the limit gets its 413 before
    it is read (BentoML would first spool the whole multipart body to disk). Allows for multipart overhead."""

    def __init__(self, app, paths: tuple[str, ...], max_bytes: int = MAX_UPLOAD_BYTES + (64 << 10)) -> None:
        self.app, self.paths, self.max_bytes = app, paths, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                from starlette.responses import JSONResponse

                body = {"error": f"the request body has {int(length)} bytes; uploads are limited to {MAX_UPLOAD_BYTES}"}
                await JSONResponse(body, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def decode_image(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Upload bytes -> a fully decoded PIL image (first frame of an animation)."""
    if not data:
        raise ClientError("the uploaded image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the uploaded image has {len(data)} bytes; the limit is {max_bytes}")
    with warnings.catch_warnings():
        # Pillow's own bomb check warns (or raises past 2x its limit); ours below is stricter and explicit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # parses the header only
        except UnidentifiedImageError as e:
            claimed = next((fmt for magic, fmt in SIGNATURES.items() if data.startswith(magic)), None)
            if claimed:
                raise ClientError(f"corrupt {claimed} image: its header cannot be parsed") from e
            raise UnsupportedImage(f"the upload is not an image in a supported format ({', '.join(FORMATS)}); "
                                   f"it starts with {data[:8]!r}") from e
        except Image.DecompressionBombError as e:
            raise PayloadTooLarge(f"the image has too many pixels: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ClientError(f"corrupt image header: {e}") from e
        width, height = image.size
        if width < 1 or height < 1:
            raise ClientError(f"the image is {width}x{height} pixels: nothing to classify")
        if width * height > max_pixels:
            raise PayloadTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                                  f"{max_pixels} (decompression bomb guard)")
        try:
            image.load()  # the actual decode: truncated or corrupt data fails here
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise ClientError(f"truncated or corrupt {image.format} image: {e}") from e
    return image


def preprocess_file(path: Path, spec: dict) -> np.ndarray:
    """An uploaded file (BentoML spools uploads to disk) -> the model input; its size is checked before
    it is read into memory."""
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(f"the uploaded image has {size} bytes; the limit is {MAX_UPLOAD_BYTES}")
    return preprocess_upload(path.read_bytes(), spec)


def preprocess_upload(data: bytes, spec: dict) -> np.ndarray:
    """Upload bytes -> float32 [C, input_size, input_size], exactly as training preprocesses an image."""
    image = decode_image(data)
    try:
        pixels = image_to_uint8(image, spec)
    except (OSError, ValueError) as e:  # e.g. a mode Pillow cannot convert
        raise UnsupportedImage(f"cannot convert a {image.mode} {image.format} image: {e}") from e
    return preprocess_uint8(pixels[None], spec)[0]
