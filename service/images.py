"""Uploaded image bytes -> the model's input tensor, with the checks an untrusted upload needs.

Decoding is Pillow; preprocessing is ``models.preprocess`` (the very functions training uses, torch-free),
driven by the ``preprocessing`` spec from the model-store metadata. Every problem with the upload is a
ClientError (4xx) naming it: empty, too many bytes, not an image, a format we do not decode, too many
pixels (checked from the header, before decoding: a decompression bomb never gets decoded), truncated
or corrupt data.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.preprocess import ImageTooLarge, PreprocessingError, image_to_uint8, preprocess_upload_pixels
from service.errors import ClientError, PayloadTooLarge, UnsupportedMedia
from service.settings import Settings

MAX_UPLOAD_BYTES = Settings.max_upload_bytes  # defaults; the server passes its configured limits
MAX_IMAGE_PIXELS = Settings.max_image_pixels
# Raster formats Pillow decodes itself. Left out on purpose: EPS (Pillow runs Ghostscript on it) and
# formats Pillow cannot read at all; a format outside this list is a 415-style client error.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO", "PCX", "SGI", "QOI")


# Pillow reports a corrupt header as "cannot identify image file", like any non-image. These signatures
# tell the two apart so the error names the real problem (a corrupt PNG is not an unsupported format).
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


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
            if data[:8].lower().startswith((b"http://", b"https://", b"ftp://", b"file:")):
                raise UnsupportedMedia("the image field holds a URL, not an image: upload the file's bytes "
                                       "(curl -F image=@digit.png); the server never fetches URLs") from e
            raise UnsupportedMedia(f"the upload is not an image in a supported format ({', '.join(FORMATS)}); "
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


def preprocess_upload(data: bytes, spec: dict, max_bytes: int = MAX_UPLOAD_BYTES,
                      max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Upload bytes -> float32 [C, H, W] (the spec's input_hw), exactly as training preprocesses an image.

    An invalid spec raises PreprocessingError (a server-side problem, not the client's): the model's warm-up
    upload at load time hits it first, so such a model fails to load with the message naming the field."""
    image = decode_image(data, max_bytes, max_pixels)
    try:
        pixels = image_to_uint8(image, spec, max_pixels)
    except PreprocessingError:
        raise  # the model's configuration, not the upload: must not become a 4xx
    except ImageTooLarge as e:
        raise PayloadTooLarge(str(e)) from e
    except (OSError, ValueError) as e:  # e.g. a mode Pillow cannot convert
        raise UnsupportedMedia(f"cannot convert a {image.mode} {image.format} image: {e}") from e
    return preprocess_upload_pixels(pixels, spec)


def blank_png(size: int = 8) -> bytes:
    """A small valid PNG (warm-up input)."""
    buffer = io.BytesIO()
    Image.new("L", (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()
