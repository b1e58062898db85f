"""Request bodies read once, within a byte limit, and multipart forms parsed from those bytes.

Uploads are read as bytes by this module, never by BentoML's file input (which downloads a URL sent
as a text value: a server-side fetch a client could aim anywhere). The multipart framing is parsed by
python-multipart (Starlette's own parser); every framing problem is a 400 naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ClientError, UnsupportedMedia

# python-multipart logs every framing error it raises at WARNING; we turn each into a 400 that the front end
# logs at DEBUG, so its own line would be a second, louder log line per client mistake.
logging.getLogger("python_multipart").setLevel(logging.ERROR)

MAX_PARTS = 16  # a form has a handful of fields; more is a mistake or an attack
MAX_HEADER_BYTES = 4096  # one part's headers (Content-Disposition with its filename, Content-Type)


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None  # None: sent as a text value, not as a file


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    """``multipart/form-data`` body -> {field name: Part}. A field given twice is an error."""
    try:
        media_type, params = parse_options_header(content_type)
    except UnicodeEncodeError as e:  # HTTP headers arrive latin-1 decoded; other callers may pass anything
        raise UnsupportedMedia(f"the Content-Type {content_type[:100]!r} is not latin-1 text") from e
    if not body:
        raise ClientError("empty request body: expected multipart/form-data with the image file in field 'image' "
                          "(curl -F image=@digit.png ...)")
    if media_type != b"multipart/form-data":
        raise UnsupportedMedia(f"expected a multipart/form-data body with the image file in field 'image' "
                               f"(curl -F image=@digit.png ...), got Content-Type {content_type[:100]!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ClientError("the multipart/form-data Content-Type has no boundary parameter")
    parts: dict[str, Part] = {}
    current: dict = {}

    def on_part_begin() -> None:
        current.clear()
        current.update(headers=[], header=b"", value=b"", data=[], header_bytes=0)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current["header"] += data[start:end]
        _count_header(end - start)

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current["value"] += data[start:end]
        _count_header(end - start)

    def _count_header(n: int) -> None:
        current["header_bytes"] += n
        if current["header_bytes"] > MAX_HEADER_BYTES:
            raise ClientError(f"a multipart part has over {MAX_HEADER_BYTES} bytes of headers")

    def on_header_end() -> None:
        current["headers"].append((current["header"].lower(), current["value"]))
        current["header"], current["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"].append(data[start:end])

    def on_part_end() -> None:
        disposition = dict(current["headers"]).get(b"content-disposition")
        if disposition is None:
            raise ClientError("a multipart part has no Content-Disposition header")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise ClientError("a multipart part's Content-Disposition has no name")
        name = options[b"name"].decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        if name in parts:
            raise ClientError(f"form field {name[:100]!r} is given more than once")
        if len(parts) >= MAX_PARTS:
            raise ClientError(f"the form has more than {MAX_PARTS} fields")
        parts[name] = Part(name, b"".join(current["data"]), filename)

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]  # its TypedDict of callbacks
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise ClientError(f"malformed multipart/form-data body: {e}") from e
    return parts


def text_field(parts: dict[str, Part], name: str, default: str) -> str:
    part = parts.get(name)
    if part is None:
        return default
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(f"form field {name!r} is not UTF-8 text") from e


def int_field(parts: dict[str, Part], name: str, default: int, minimum: int) -> int:
    text = text_field(parts, name, str(default)).strip()
    if not (text.isascii() and text.isdigit()) or int(text) < minimum or len(text) > 18:
        raise ClientError(f"form field {name!r} must be an integer >= {minimum}, got {text[:50]!r}")
    return int(text)


def bool_field(parts: dict[str, Part], name: str, default: bool) -> bool:
    text = text_field(parts, name, "true" if default else "false").strip().lower()
    if text not in ("true", "false"):
        raise ClientError(f"form field {name!r} must be true or false, got {text[:50]!r}")
    return text == "true"


def choice_field(parts: dict[str, Part], name: str, choices: tuple[str, ...]) -> str:
    text = text_field(parts, name, choices[0]).strip()
    if text not in choices:
        raise ClientError(f"form field {name!r} must be one of {', '.join(choices)}, got {text[:50]!r}")
    return text


def check_fields(parts: dict[str, Part], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(parts) - set(allowed))
    if unknown:
        raise ClientError(f"unknown form field(s) {[u[:50] for u in unknown[:5]]}; this endpoint takes "
                          f"{', '.join(allowed)}")
