"""The bad-request corpus: what a hostile or careless client sends, against the real server (the session's
``live_server``), each case with the status it must get and words the error must contain that name the
problem. Every endpoint: /classify and /features (multipart framing, fields, images), /generate (JSON
shapes and types, limits), KServe v2 over REST (JSON tensors, the binary extension, compression, limits)
and over gRPC. Never a 5xx; afterwards normal requests still answer correctly, nothing was fetched, and
the server log holds no ERROR or traceback for any of it (client mistakes log at DEBUG).

The table is data: add a case by adding a row. docs/reliability.md reports the count.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field

import bentoml
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import requests
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from models.preprocess import standardize, to_unit
from models.train import TINY

pytestmark = pytest.mark.integration

B = "corpusboundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={B}"}
JSON = {"content-type": "application/json"}
LAYERS, HIDDEN = TINY["char_lstm"]["layers"], TINY["char_lstm"]["hidden"]  # the live server's tiny text models
assert (LAYERS, HIDDEN) == (TINY["char_gru"]["layers"], TINY["char_gru"]["hidden"])


@dataclass(frozen=True)
class Case:
    id: str
    method: str  # an HTTP method, or "GRPC" (body is then a ModelInferRequest)
    path: str
    body: bytes | pb.ModelInferRequest = b""
    headers: dict = field(default_factory=dict)
    status: int | str = 400  # HTTP status, or the gRPC status code's name
    message: str = ""  # must appear in the error message


# -- bodies ------------------------------------------------------------------------------------------------


def png(width: int = 28, height: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` with a few bytes of pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1024)))
            + chunk(b"IEND", b""))


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()
BIG_PNG = blank_png(5000, 5000)  # 25 M pixels, over the 16.7 M default limit, in ~25 KB


def part(name: str | None, data: bytes | str, filename: str | None = None, content_type: str | None = None,
         disposition: bool = True) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    headers = ""
    if disposition:
        headers += "Content-Disposition: form-data" + (f'; name="{name}"' if name is not None else "")
        headers += f'; filename="{filename}"' if filename is not None else ""
        headers += "\r\n"
    if content_type:
        headers += f"Content-Type: {content_type}\r\n"
    return f"--{B}\r\n".encode() + headers.encode() + b"\r\n" + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{B}--\r\n".encode()


def image(data: bytes = PNG, filename: str = "digit.png") -> bytes:
    return part("image", data, filename, "image/png")


def js(value) -> bytes:
    return json.dumps(value).encode()


def gen(**fields) -> bytes:
    return js({"prompt": "The ", "max_new_chars": 5, **fields})


def fp32(shape=(1, 1, 32, 32), data=None, **extra) -> dict:
    count = int(np.prod(shape))
    return {"name": "input", "datatype": "FP32", "shape": list(shape), "data": [0.0] * count if data is None else data,
            **extra}


def v2(*inputs, **extra) -> bytes:
    return js({"inputs": list(inputs), **extra})


def text_inputs(tokens, shape=None, batch: int | None = None, names=("h", "c")) -> list[dict]:
    """tokens + zero RNN state for a char model (``names``: its state inputs)."""
    shape = shape or [1, len(tokens)]
    batch = shape[0] if batch is None else batch
    size = LAYERS * batch * HIDDEN
    state = [{"name": n, "datatype": "FP32", "shape": [LAYERS, batch, HIDDEN], "data": [0.0] * size} for n in names]
    return [{"name": "tokens", "datatype": "INT64", "shape": list(shape), "data": tokens}, *state]


def binary(inputs: list[dict], raw: bytes, length: str | None = None) -> tuple[bytes, dict]:
    header = js({"inputs": inputs})
    return header + raw, {"Inference-Header-Content-Length": length if length is not None else str(len(header))}


def image_bytes(rows: list, shape: list[int] | None = None) -> dict:
    """A BYTES ``image`` input in JSON (strings: JSON cannot carry raw bytes)."""
    return {"name": "image", "datatype": "BYTES", "shape": shape or [len(rows)], "data": rows}


def image_bytes_binary(rows: list[bytes]) -> tuple[dict, bytes]:
    """A BYTES ``image`` input in the binary extension: its JSON description and its bytes."""
    raw = b"".join(struct.pack("<I", len(r)) + r for r in rows)
    return {"name": "image", "datatype": "BYTES", "shape": [len(rows)],
            "parameters": {"binary_data_size": len(raw)}}, raw


def tgen(**fields) -> bytes:
    """A generate-extension body."""
    return js({"text_input": "The ", **fields})


def raw_json(text: str) -> bytes:
    """A JSON body json.dumps cannot write (NaN, Infinity, huge literals)."""
    return text.encode()


def zeros_csv(n: int) -> str:
    return ",".join(["0"] * n)


def grpc_request(model: str = "lenet5", inputs=None, raw=None, outputs=(), version: str = "",
                 parameters: dict | None = None, classification: int = 0) -> pb.ModelInferRequest:
    """``inputs``: (name, datatype, shape, typed contents field or None, values); ``raw``: raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape, contents_field, values in inputs or []:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        if contents_field:
            getattr(tensor.contents, contents_field).extend(values)
        for key, value in (parameters or {}).items():
            tensor.parameters[key].string_param = value
    request.raw_input_contents.extend(raw or [])
    for name in outputs:
        out = request.outputs.add(name=name)
        if classification:
            out.parameters["classification"].int64_param = classification
    return request


def bytes_raw(rows: list[bytes]) -> bytes:
    """BYTES raw contents: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(r)) + r for r in rows)


def stream_request(prompt: str = "The ", model: str = "char_lstm.text", **parameters) -> pb.ModelInferRequest:
    """A ModelStreamInfer generation request, sampling options as Triton request parameters."""
    request = grpc_request(model, [("text_input", "BYTES", [1], None, None)], [bytes_raw([prompt.encode()])])
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    return request


IMAGE_RAW = np.zeros((1, 1, 32, 32), np.float32).tobytes()
LENET_RAW = ("input", "FP32", [1, 1, 32, 32], None, None)


def state(batch: int = 1) -> list[tuple]:
    size = LAYERS * batch * HIDDEN
    return [(n, "FP32", [LAYERS, batch, HIDDEN], "fp32_contents", [0.0] * size) for n in ("h", "c")]


def grpc_text(tokens, shape=None, batch=None) -> pb.ModelInferRequest:
    shape = shape or [1, len(tokens)]
    return grpc_request("char_lstm", [("tokens", "INT64", shape, "int64_contents", tokens),
                                      *state(shape[0] if batch is None else batch)])


SECOND_ROW_BAD = image_bytes_binary([PNG, b"GIF89a" + bytes(20)])  # a good PNG, then a corrupt GIF
GZIP_BOMB = gzip.compress(b" " * ((64 << 20) + 1024), compresslevel=9)  # 64 MiB + 1 KiB of spaces: ~65 KB

# -- the corpus --------------------------------------------------------------------------------------------

C = Case
CASES: list[Case] = [
    # /classify: multipart framing
    C("classify-no-boundary", "POST", "/classify", form(image()), {"content-type": "multipart/form-data"}, 400,
      "no boundary"),
    C("classify-wrong-boundary", "POST", "/classify", form(image()),
      {"content-type": "multipart/form-data; boundary=other"}, 400, "malformed multipart"),
    C("classify-invalid-header-char", "POST", "/classify",
      f"--{B}\r\nContent-Disp\x01osition: form-data; name=\"image\"\r\n\r\nabc\r\n--{B}--\r\n".encode(), MULTIPART,
      400, "invalid character"),
    C("classify-8000-char-filename", "POST", "/classify", form(image(filename="a" * 8000 + ".png")), MULTIPART, 400,
      "header size"),
    C("classify-part-without-disposition", "POST", "/classify", form(part("image", PNG, disposition=False,
                                                                          content_type="image/png")),
      MULTIPART, 400, "no Content-Disposition"),
    C("classify-part-without-name", "POST", "/classify", form(part(None, PNG, "d.png")), MULTIPART, 400, "no name"),
    C("classify-unterminated-form", "POST", "/classify", image(), MULTIPART, 400, "image"),
    C("classify-missing-image", "POST", "/classify", form(part("model", "lenet5")), MULTIPART, 400,
      "missing form field 'image'"),
    C("classify-unknown-field", "POST", "/classify", form(image(), part("colour", "red")), MULTIPART, 400,
      "unknown form field"),
    C("classify-duplicate-image", "POST", "/classify", form(image(), image()), MULTIPART, 400, "more than once"),
    C("classify-duplicate-top-k", "POST", "/classify", form(image(), part("top_k", "1"), part("top_k", "2")),
      MULTIPART, 400, "more than once"),
    C("classify-17-fields", "POST", "/classify", form(image(), *[part(f"f{i}", "x") for i in range(16)]), MULTIPART,
      400, "more than 16 fields"),
    C("classify-empty-body", "POST", "/classify", b"", MULTIPART, 400, "empty request body"),
    C("classify-urlencoded", "POST", "/classify", b"image=http://127.0.0.1:9/x.png",
      {"content-type": "application/x-www-form-urlencoded"}, 415, "multipart/form-data"),
    C("classify-json-body", "POST", "/classify", js({"image": "aGVsbG8="}), JSON, 415, "multipart/form-data"),
    C("classify-no-content-type", "POST", "/classify", form(image()), {}, 415, "multipart/form-data"),
    # /classify: the image
    C("classify-image-as-url-text", "POST", "/classify", form(part("image", "http://169.254.169.254/latest")),
      MULTIPART, 415, "never fetches URLs"),
    C("classify-image-file-holding-url", "POST", "/classify", form(image(b"https://example.com/digit.png")),
      MULTIPART, 415, "never fetches URLs"),
    C("classify-empty-file", "POST", "/classify", form(image(b"")), MULTIPART, 400, "empty"),
    C("classify-truncated-png", "POST", "/classify", form(image(PNG[:len(PNG) // 2])), MULTIPART, 400,
      "truncated or corrupt"),
    C("classify-corrupt-png-header", "POST", "/classify", form(image(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)), MULTIPART,
      400, "corrupt PNG"),
    C("classify-corrupt-tiff-header", "POST", "/classify", form(image(b"II*\x00" + b"\xff" * 64)), MULTIPART, 400,
      "corrupt TIFF"),
    C("classify-random-bytes", "POST", "/classify", form(image(bytes(range(256)) * 4)), MULTIPART, 415,
      "not an image"),
    C("classify-eps", "POST", "/classify", form(image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")),
      MULTIPART, 415, "not an image"),
    C("classify-bomb-header-100k-squared", "POST", "/classify", form(image(png_header_only(100_000, 100_000))),
      MULTIPART, 413, "pixels"),
    C("classify-5000x5000-png", "POST", "/classify", form(image(BIG_PNG)), MULTIPART, 413, "pixels"),
    C("classify-over-upload-limit", "POST", "/classify", form(image(b"\0" * (11 << 20))), MULTIPART, 413, "limit"),
    # /classify: fields
    C("classify-top-k-0", "POST", "/classify", form(image(), part("top_k", "0")), MULTIPART, 400, "top_k"),
    C("classify-top-k-negative", "POST", "/classify", form(image(), part("top_k", "-1")), MULTIPART, 400, "top_k"),
    C("classify-top-k-abc", "POST", "/classify", form(image(), part("top_k", "abc")), MULTIPART, 400, "top_k"),
    C("classify-top-k-1e9", "POST", "/classify", form(image(), part("top_k", "1e9")), MULTIPART, 400, "top_k"),
    C("classify-top-k-1.5", "POST", "/classify", form(image(), part("top_k", "1.5")), MULTIPART, 400, "top_k"),
    C("classify-top-k-19-digits", "POST", "/classify", form(image(), part("top_k", "9" * 19)), MULTIPART, 400,
      "top_k"),
    C("classify-top-k-not-utf8", "POST", "/classify", form(image(), part("top_k", b"\xff\xfe")), MULTIPART, 400,
      "not UTF-8"),
    C("classify-unknown-model", "POST", "/classify", form(image(), part("model", "resnet9000")), MULTIPART, 404,
      "unknown model 'resnet9000'"),
    C("classify-text-model", "POST", "/classify", form(image(), part("model", "char_lstm")), MULTIPART, 400,
      "sequence_lm model"),
    C("classify-get", "GET", "/classify", status=405, message="Method Not Allowed"),
    # /features
    C("features-classifier-model", "POST", "/features", form(image(), part("model", "lenet5")), MULTIPART, 400,
      "image_classifier model"),
    C("features-unknown-model", "POST", "/features", form(image(), part("model", "nope")), MULTIPART, 404,
      "unknown model 'nope'"),
    C("features-format-xml", "POST", "/features", form(image(), part("format", "xml")), MULTIPART, 400, "format"),
    C("features-normalize-yes", "POST", "/features", form(image(), part("normalize", "yes")), MULTIPART, 400,
      "normalize"),
    C("features-top-k-not-a-field", "POST", "/features", form(image(), part("top_k", "3")), MULTIPART, 400,
      "unknown form field"),
    C("features-missing-image", "POST", "/features", form(part("format", "npy")), MULTIPART, 400,
      "missing form field 'image'"),
    C("features-not-an-image", "POST", "/features", form(image(b"hello, world")), MULTIPART, 415, "not an image"),
    C("features-put", "PUT", "/features", status=405, message="Method Not Allowed"),
    # /generate: JSON shape
    C("generate-not-json", "POST", "/generate", b"prompt=The", JSON, 400, "JSON object"),
    C("generate-not-utf8", "POST", "/generate", b"\xff\xfe{}", JSON, 400, "JSON object"),
    C("generate-json-array", "POST", "/generate", js([{"prompt": "The"}]), JSON, 400, "got list"),
    C("generate-json-string", "POST", "/generate", js("The"), JSON, 400, "got str"),
    C("generate-deeply-nested", "POST", "/generate", b"[" * 5000 + b"]" * 5000, JSON, 400, "RecursionError"),
    C("generate-5000-digit-int", "POST", "/generate", raw_json('{"prompt": "The", "seed": 1' + "0" * 5000 + "}"),
      JSON, 400, "4300 digits"),
    C("generate-over-64k", "POST", "/generate", gen(prompt="a" * 70_000), JSON, 413, "limit"),
    C("generate-missing-prompt", "POST", "/generate", js({"max_new_chars": 5}), JSON, 400, "missing field 'prompt'"),
    C("generate-unknown-field", "POST", "/generate", gen(length=5), JSON, 400, "unknown field"),
    # /generate: types and limits
    C("generate-stream-yes", "POST", "/generate", gen(stream="yes"), JSON, 400, "stream must be true or false"),
    C("generate-stream-1", "POST", "/generate", gen(stream=1), JSON, 400, "stream must be true or false"),
    C("generate-max-new-chars-negative", "POST", "/generate", gen(max_new_chars=-1), JSON, 400, "max_new_chars"),
    C("generate-max-new-chars-0", "POST", "/generate", gen(max_new_chars=0), JSON, 400, "max_new_chars"),
    C("generate-max-new-chars-huge", "POST", "/generate", gen(max_new_chars=10**9), JSON, 400, "[1, 2000]"),
    C("generate-max-new-chars-float", "POST", "/generate", gen(max_new_chars=5.0), JSON, 400, "max_new_chars"),
    C("generate-max-new-chars-string", "POST", "/generate", gen(max_new_chars="5"), JSON, 400, "max_new_chars"),
    C("generate-temperature-nan", "POST", "/generate", raw_json('{"prompt": "The ", "temperature": NaN}'), JSON, 400,
      "temperature must be a finite number"),
    C("generate-temperature-infinity", "POST", "/generate", raw_json('{"prompt": "The ", "temperature": Infinity}'),
      JSON, 400, "temperature must be a finite number"),
    C("generate-temperature-negative", "POST", "/generate", gen(temperature=-1.0), JSON, 400, "temperature"),
    C("generate-temperature-string", "POST", "/generate", gen(temperature="hot"), JSON, 400, "temperature"),
    C("generate-temperature-bool", "POST", "/generate", gen(temperature=True), JSON, 400, "temperature"),
    C("generate-temperature-400-digits", "POST", "/generate", gen(temperature=10**400), JSON, 400,
      "temperature must be a finite number"),
    C("generate-top-k-0", "POST", "/generate", gen(top_k=0), JSON, 400, "top_k"),
    C("generate-n-0", "POST", "/generate", gen(n=0), JSON, 400, "n must be an integer in [1, 16], got 0"),
    C("generate-n-float", "POST", "/generate", gen(n=1.5), JSON, 400, "n must be an integer in [1, 16], got 1.5"),
    C("generate-n-string", "POST", "/generate", gen(n="3"), JSON, 400, "n must be an integer in [1, 16], got '3'"),
    C("generate-n-bool", "POST", "/generate", gen(n=True), JSON, 400, "n must be an integer in [1, 16], got True"),
    C("generate-n-17", "POST", "/generate", gen(n=17), JSON, 400, "n must be an integer in [1, 16], got 17"),
    C("generate-n-huge", "POST", "/generate", gen(n=10**30), JSON, 400, "n must be an integer in [1, 16]"),
    C("generate-n-times-max-new-chars", "POST", "/generate", gen(n=3, max_new_chars=700), JSON, 400,
      "n x max_new_chars = 3 x 700 = 2100 characters; the limit is 2000 per request (10000 when streamed)"),
    C("generate-n-stream-plain-text", "POST", "/generate", gen(n=2, stream=True), JSON, 400,
      "n is 2 with stream: true, which needs Accept: text/event-stream"),
    C("generate-max-new-chars-10001-stream", "POST", "/generate", gen(max_new_chars=10_001, stream=True), JSON, 400,
      "max_new_chars must be an integer in [1, 10000]"),
    C("generate-max-new-chars-10000-json", "POST", "/generate", gen(max_new_chars=10_000), JSON, 400,
      "[1, 2000] (10000 when streamed)"),
    C("generate-top-k-string", "POST", "/generate", gen(top_k="5"), JSON, 400, "top_k"),
    C("generate-seed-negative", "POST", "/generate", gen(seed=-1), JSON, 400, "seed"),
    C("generate-seed-float", "POST", "/generate", gen(seed=1.5), JSON, 400, "seed"),
    C("generate-seed-string", "POST", "/generate", gen(seed="42"), JSON, 400, "seed"),
    C("generate-prompt-empty", "POST", "/generate", gen(prompt=""), JSON, 400, "must not be empty"),
    C("generate-prompt-number", "POST", "/generate", gen(prompt=42), JSON, 400, "prompt must be a string"),
    C("generate-prompt-outside-vocab", "POST", "/generate", gen(prompt="The \u2603\U0001F600"), JSON, 400,
      "outside the model vocabulary"),
    C("generate-prompt-2001-chars", "POST", "/generate", gen(prompt="e" * 2001), JSON, 400, "the limit is 2000"),
    C("generate-image-model", "POST", "/generate", gen(model="lenet5"), JSON, 400, "image_classifier model"),
    C("generate-unknown-model", "POST", "/generate", gen(model="gpt9"), JSON, 404, "unknown model 'gpt9'"),
    C("generate-model-number", "POST", "/generate", gen(model=5), JSON, 400, "model must be a string"),
    C("generate-get", "GET", "/generate", status=405, message="Method Not Allowed"),
    # KServe v2 REST: routes and models
    C("v2-unknown-model", "POST", "/v2/models/nope/infer", v2(fp32()), JSON, 404, "unknown model 'nope'"),
    C("v2-unknown-model-metadata", "GET", "/v2/models/nope", status=404, message="unknown model 'nope'"),
    C("v2-unknown-version", "POST", "/v2/models/lenet5/versions/0000/infer", v2(fp32()), JSON, 404,
      "no version '0000'"),
    C("v2-get-infer", "GET", "/v2/models/lenet5/infer", status=405, message="GET is not allowed"),
    C("v2-unknown-route", "GET", "/v2/no/such/route", status=404, message="no KServe v2 route"),
    # The management API with no NNSERVE_MANAGEMENT_TOKEN_FILE (the session's server): off, saying how to turn it on
    C("v2-repository-api-off", "POST", "/v2/repository/index", status=403, message="NNSERVE_MANAGEMENT_TOKEN_FILE"),
    C("v2-repository-load-off", "POST", "/v2/repository/models/lenet5/load",
      headers={"Authorization": "Bearer " + "x" * 20}, status=403, message="the management API is off"),
    C("unknown-route", "GET", "/v3/models", status=404, message="Not Found"),
    # KServe v2 REST: JSON shape
    C("v2-malformed-json", "POST", "/v2/models/lenet5/infer", b'{"inputs": [', JSON, 400, "not valid JSON"),
    C("v2-empty-body", "POST", "/v2/models/lenet5/infer", b"", JSON, 400, "empty request body"),
    C("v2-json-array", "POST", "/v2/models/lenet5/infer", js([fp32()]), JSON, 400, "JSON object with 'inputs'"),
    C("v2-no-inputs", "POST", "/v2/models/lenet5/infer", js({"outputs": []}), JSON, 400, "non-empty 'inputs'"),
    C("v2-inputs-not-a-list", "POST", "/v2/models/lenet5/infer", js({"inputs": fp32()}), JSON, 400,
      "non-empty 'inputs'"),
    C("v2-input-not-an-object", "POST", "/v2/models/lenet5/infer", js({"inputs": [[0.0]]}), JSON, 400, "inputs[0]"),
    C("v2-deeply-nested-json", "POST", "/v2/models/lenet5/infer",
      raw_json('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": '
               + "[" * 100_000 + "]" * 100_000 + "}]}"), JSON, 400, "too deeply"),
    C("v2-data-nested-past-64-dims", "POST", "/v2/models/lenet5/infer",
      raw_json('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": '
               + "[" * 500 + "0" + "]" * 500 + "}]}"), JSON, 400, "not a regular array"),
    C("v2-5000-digit-int", "POST", "/v2/models/lenet5/infer",
      raw_json('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1' + "0" * 5000 + ', 1, 32, 32]}]}'),
      JSON, 400, "4300 digits"),
    C("v2-id-not-a-string", "POST", "/v2/models/lenet5/infer", v2(fp32(), id={"a": 1}), JSON, 400,
      "'id' must be a string"),
    C("v2-id-nan", "POST", "/v2/models/lenet5/infer",
      raw_json('{"id": NaN, "inputs": [' + json.dumps(fp32()) + "]}"), JSON, 400, "'id' must be a string"),
    # KServe v2 REST: tensors
    C("v2-wrong-datatype", "POST", "/v2/models/lenet5/infer", v2(fp32() | {"datatype": "FP64"}), JSON, 400,
      "datatype 'FP64'"),
    C("v2-bytes-datatype", "POST", "/v2/models/lenet5/infer", v2(fp32() | {"datatype": "BYTES"}), JSON, 400,
      "datatype 'BYTES'"),
    C("v2-datatype-number", "POST", "/v2/models/lenet5/infer", v2(fp32() | {"datatype": 5}), JSON, 400,
      "datatype '5'"),
    C("v2-shape-data-mismatch", "POST", "/v2/models/lenet5/infer", v2(fp32(data=[0.5])), JSON, 400,
      "1 values, expected 1024"),
    C("v2-wrong-rank", "POST", "/v2/models/lenet5/infer", v2(fp32((32, 32))), JSON, 400, "integer dimensions"),
    C("v2-wrong-channels", "POST", "/v2/models/lenet5/infer", v2(fp32((1, 3, 32, 32))), JSON, 400,
      "shape [1, 3, 32, 32]"),
    C("v2-negative-dim", "POST", "/v2/models/lenet5/infer", v2(fp32() | {"shape": [-1, 1, 32, 32]}), JSON, 400,
      "any size >= 1"),
    C("v2-string-dim", "POST", "/v2/models/lenet5/infer", v2(fp32() | {"shape": ["1", 1, 32, 32]}), JSON, 400,
      "integer dimensions"),
    C("v2-bool-dim", "POST", "/v2/models/lenet5/infer", v2(fp32() | {"shape": [True, 1, 32, 32]}), JSON, 400,
      "integer dimensions"),
    C("v2-unknown-input", "POST", "/v2/models/lenet5/infer", v2(fp32() | {"name": "pixels"}), JSON, 400,
      "no input 'pixels'"),
    C("v2-duplicate-input", "POST", "/v2/models/lenet5/infer", v2(fp32(), fp32()), JSON, 400, "more than once"),
    C("v2-missing-input", "POST", "/v2/models/char_gru/infer", v2(text_inputs([1, 2], names=())[0]), JSON, 400,
      "needs inputs ['h']"),
    C("v2-batch-mismatch", "POST", "/v2/models/char_gru/infer", v2(*text_inputs([1, 2], batch=3, names=("h",))),
      JSON, 400, "needs them equal"),
    C("v2-nan", "POST", "/v2/models/lenet5/infer",
      raw_json('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [NaN,'
               + zeros_csv(1023) + "]}]}"), JSON, 400, "NaN or infinite"),
    C("v2-infinity", "POST", "/v2/models/lenet5/infer",
      raw_json('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [-Infinity,'
               + zeros_csv(1023) + "]}]}"), JSON, 400, "NaN or infinite"),
    C("v2-1e400", "POST", "/v2/models/lenet5/infer",
      raw_json('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [1e400,'
               + zeros_csv(1023) + "]}]}"), JSON, 400, "NaN or infinite"),
    C("v2-1e39-overflows-fp32", "POST", "/v2/models/lenet5/infer", v2(fp32(data=[1e39] + [0.0] * 1023)), JSON, 400,
      "outside the FP32 range"),
    C("v2-output-overflows", "POST", "/v2/models/lenet5/infer", v2(fp32(data=[3e38] * 1024)), JSON, 400,
      "JSON cannot carry"),
    C("v2-string-data", "POST", "/v2/models/lenet5/infer", v2(fp32(data=["0"] * 1024)), JSON, 400,
      "must be numbers"),
    C("v2-null-data", "POST", "/v2/models/lenet5/infer", v2(fp32(data=[None] * 1024)), JSON, 400, "must be numbers"),
    C("v2-bool-data-for-fp32", "POST", "/v2/models/lenet5/infer", v2(fp32(data=[True] * 1024)), JSON, 400,
      "not true/false"),
    C("v2-ragged-data", "POST", "/v2/models/lenet5/infer", v2(fp32(data=[[0.0] * 1000, [0.0] * 24])), JSON, 400,
      "not a regular array"),
    C("v2-float-tokens", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([1.5, 2.0])), JSON, 400,
      "not floats"),
    C("v2-token-2**63", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([2**63])), JSON, 400,
      "outside the INT64 range"),
    C("v2-token-2**63-and-negative", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([2**63, -1])), JSON, 400,
      "value 9223372036854775808 is outside the INT64 range"),
    C("v2-token-2**64", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([2**64])), JSON, 400,
      "outside the INT64 range"),
    C("v2-token-negative", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([-1])), JSON, 400,
      "model 'char_lstm': token ids must be in [0,"),
    C("v2-token-past-vocab", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([10_000])), JSON, 400,
      "model 'char_lstm': token ids must be in [0,"),
    C("v2-token-bool", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([True])), JSON, 400, "not true/false"),
    # KServe v2 REST: per-request limits (checked from the shapes, before any data is decoded)
    C("v2-100k-tokens", "POST", "/v2/models/char_lstm/infer", v2(*text_inputs([1] * 100_000)), JSON, 400,
      "sequence length 100000; the limit is 2000"),
    C("v2-tokens-per-request", "POST", "/v2/models/char_lstm/infer",
      v2(*text_inputs([0], shape=[10, 2000])), JSON, 400, "NNSERVE_MAX_REQUEST_TOKENS"),
    C("v2-items-per-request", "POST", "/v2/models/lenet5/infer", v2(fp32((16385, 1, 32, 32), data=[0.0])), JSON, 400,
      "NNSERVE_MAX_REQUEST_ITEMS"),
    # KServe v2 REST: parameters and outputs
    C("v2-parameters-not-object", "POST", "/v2/models/lenet5/infer", v2(fp32(parameters=[1])), JSON, 400,
      "'parameters' must be a JSON object"),
    C("v2-shared-memory", "POST", "/v2/models/lenet5/infer",
      v2(fp32(parameters={"shared_memory_region": "r0"})), JSON, 400, "shared memory is not supported"),
    C("v2-unknown-output", "POST", "/v2/models/lenet5/infer", v2(fp32(), outputs=[{"name": "probs"}]), JSON, 400,
      "no output 'probs'"),
    C("v2-outputs-not-a-list", "POST", "/v2/models/lenet5/infer", v2(fp32(), outputs={"name": "logits"}), JSON, 400,
      "'outputs' must be a list"),
    C("v2-classification-over-classes", "POST", "/v2/models/lenet5/infer",
      v2(fp32(), outputs=[{"name": "logits", "parameters": {"classification": 11}}]), JSON, 400,
      "11 classes but the output has 10"),
    C("v2-classification-string", "POST", "/v2/models/lenet5/infer",
      v2(fp32(), outputs=[{"name": "logits", "parameters": {"classification": "3"}}]), JSON, 400,
      "parameters.classification must be an integer"),
    C("v2-classification-negative", "POST", "/v2/models/lenet5/infer",
      v2(fp32(), outputs=[{"name": "logits", "parameters": {"classification": -1}}]), JSON, 400,
      "parameters.classification must be an integer"),
    C("v2-classification-of-text-logits", "POST", "/v2/models/char_lstm/infer",
      js({"inputs": text_inputs([1, 2]), "outputs": [{"name": "logits", "parameters": {"classification": 2}}]}),
      JSON, 400, "is not [batch, classes]"),
    C("v2-binary-data-output-string", "POST", "/v2/models/lenet5/infer",
      v2(fp32(), parameters={"binary_data_output": "yes"}), JSON, 400, "binary_data_output"),
    C("v2-output-binary-data-string", "POST", "/v2/models/lenet5/infer",
      v2(fp32(), outputs=[{"name": "logits", "parameters": {"binary_data": 1}}]), JSON, 400, "binary_data"),
    C("v2-no-data", "POST", "/v2/models/lenet5/infer", v2({"name": "input", "datatype": "FP32",
                                                           "shape": [1, 1, 32, 32]}), JSON, 400, "neither 'data'"),
    # KServe v2 REST: encoded images (BYTES "image") and prompts (BYTES "text_input")
    C("v2-image-bytes-not-an-image", "POST", "/v2/models/lenet5.image/infer", v2(image_bytes(["hello, world"])), JSON,
      400, "input 'image' row 0"),
    C("v2-image-bytes-second-row-bad", "POST", "/v2/models/vgg_fc7.image/infer",
      *binary([SECOND_ROW_BAD[0]], SECOND_ROW_BAD[1]),
      400, "input 'image' row 1"),
    C("v2-image-bytes-and-float-input", "POST", "/v2/models/lenet5.image/infer", v2(image_bytes(["x"]), fp32()), JSON,
      400, "the tensor 'input' goes to model 'lenet5'"),
    C("v2-image-bytes-to-the-model", "POST", "/v2/models/lenet5/infer", v2(image_bytes(["x"])), JSON, 400,
      "BYTES 'image' goes to model 'lenet5.image'"),
    C("v2-text-input-to-the-model", "POST", "/v2/models/char_lstm/infer",
      v2({"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["The "]}), JSON, 400,
      "BYTES 'text_input' goes to model 'char_lstm.text'"),
    C("v2-image-front-end-of-a-text-model", "POST", "/v2/models/char_lstm.image/infer", v2(image_bytes(["x"])), JSON,
      404, "its front end is char_lstm.text"),
    C("v2-image-bytes-2d-shape", "POST", "/v2/models/lenet5.image/infer", v2(image_bytes(["a", "b"], [1, 2])), JSON,
      400, "expected [N] or [N, 1]"),
    C("v2-image-bytes-count-mismatch", "POST", "/v2/models/lenet5.image/infer", v2(image_bytes(["a"], [2])), JSON, 400,
      "1 BYTES elements, expected 2"),
    C("v2-image-bytes-numbers", "POST", "/v2/models/lenet5.image/infer", v2(image_bytes([1.5])), JSON, 400,
      "data must be strings"),
    C("v2-image-bytes-length-past-end", "POST", "/v2/models/lenet5.image/infer",
      *binary([{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}],
              struct.pack("<I", 1000) + b"abcd"), 400, "claims 1000 bytes but only 4 follow"),
    C("v2-image-bytes-on-text-model", "POST", "/v2/models/char_lstm/infer", v2(image_bytes([""])), JSON, 400,
      "no input 'image'"),
    C("v2-text-input-two-prompts", "POST", "/v2/models/char_lstm.text/infer",
      v2({"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}), JSON, 400, "one prompt"),
    C("v2-text-input-unknown-parameter", "POST", "/v2/models/char_lstm.text/infer",
      v2({"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["The "]}, parameters={"beams": 2}),
      JSON, 400, "unknown sampling parameter(s) ['beams']"),
    C("v2-text-input-with-tokens", "POST", "/v2/models/char_lstm.text/infer",
      v2({"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["The "]}, *text_inputs([1])), JSON, 400,
      "the tensor 'tokens' goes to model 'char_lstm'"),
    # KServe v2 REST: the generate extension
    C("v2-generate-not-json", "POST", "/v2/models/char_lstm/generate", b"text_input=The", JSON, 400, "not valid JSON"),
    C("v2-generate-empty-body", "POST", "/v2/models/char_lstm/generate", b"", JSON, 400, "JSON object"),
    C("v2-generate-array", "POST", "/v2/models/char_lstm/generate", js(["The "]), JSON, 400, "JSON object"),
    C("v2-generate-no-text-input", "POST", "/v2/models/char_lstm/generate", js({"prompt": "The "}), JSON, 400,
      "needs 'text_input'"),
    C("v2-generate-text-input-number", "POST", "/v2/models/char_lstm/generate", js({"text_input": 5}), JSON, 400,
      "text_input must be a string"),
    C("v2-generate-text-input-empty", "POST", "/v2/models/char_lstm/generate", js({"text_input": ""}), JSON, 400,
      "text_input must not be empty"),
    C("v2-generate-text-input-2001-chars", "POST", "/v2/models/char_lstm/generate", js({"text_input": "e" * 2001}),
      JSON, 400, "text_input has 2001 characters"),
    C("v2-generate-outside-vocab", "POST", "/v2/models/char_lstm/generate", js({"text_input": "\u2603"}), JSON, 400,
      "outside the model vocabulary"),
    C("v2-generate-unknown-parameter", "POST", "/v2/models/char_lstm/generate",
      tgen(parameters={"presence_penalty": 1}), JSON, 400, "presence_penalty"),
    C("v2-generate-unknown-top-level", "POST", "/v2/models/char_lstm/generate", tgen(bad_words=""), JSON, 400,
      "bad_words"),
    C("v2-generate-parameters-not-object", "POST", "/v2/models/char_lstm/generate", tgen(parameters=[1]), JSON,
      400, "'parameters' must be a JSON object"),
    C("v2-generate-given-twice", "POST", "/v2/models/char_lstm/generate",
      tgen(max_tokens=5, parameters={"max_tokens": 6}), JSON, 400, "given both"),
    C("v2-generate-id-number", "POST", "/v2/models/char_lstm/generate", tgen(id=5), JSON, 400, "'id' must be"),
    C("v2-generate-max-tokens-0", "POST", "/v2/models/char_lstm/generate", tgen(parameters={"max_tokens": 0}),
      JSON, 400, "max_tokens must be an integer in [1, 2000]"),
    C("v2-generate-top-p-0", "POST", "/v2/models/char_lstm/generate", tgen(parameters={"top_p": 0}), JSON, 400,
      "top_p must be a number in (0, 1]"),
    C("v2-generate-top-p-1.5", "POST", "/v2/models/char_lstm/generate", tgen(parameters={"top_p": 1.5}), JSON, 400,
      "top_p"),
    C("v2-generate-top-p-string", "POST", "/v2/models/char_lstm/generate", tgen(parameters={"top_p": "0.9"}), JSON,
      400, "top_p"),
    C("v2-generate-top-p-nan", "POST", "/v2/models/char_lstm/generate",
      raw_json('{"text_input": "The ", "parameters": {"top_p": NaN}}'), JSON, 400, "top_p"),
    C("v2-generate-temperature-negative", "POST", "/v2/models/char_lstm/generate",
      tgen(parameters={"temperature": -0.5}), JSON, 400, "temperature"),
    C("v2-generate-seed-negative", "POST", "/v2/models/char_lstm/generate", tgen(seed=-1), JSON, 400, "seed"),
    C("v2-generate-stop-empty-string", "POST", "/v2/models/char_lstm/generate", tgen(stop=""), JSON, 400, "stop"),
    C("v2-generate-stop-5-strings", "POST", "/v2/models/char_lstm/generate", tgen(stop=list("abcde")), JSON, 400,
      "list of 1 to 4 strings"),
    C("v2-generate-stop-number", "POST", "/v2/models/char_lstm/generate", tgen(stop=5), JSON, 400, "stop"),
    C("v2-generate-image-model", "POST", "/v2/models/lenet5/generate", tgen(), JSON, 400, "image_classifier model"),
    C("v2-generate-unknown-model", "POST", "/v2/models/gpt9/generate", tgen(), JSON, 404, "unknown model 'gpt9'"),
    C("v2-generate-unknown-version", "POST", "/v2/models/char_lstm/versions/0000/generate", tgen(), JSON, 404,
      "no version '0000'"),
    C("v2-generate-get", "GET", "/v2/models/char_lstm/generate", status=405, message="GET is not allowed"),
    C("v2-generate-stream-unknown-parameter", "POST", "/v2/models/char_lstm/generate_stream",
      tgen(parameters={"best_of": 2}), JSON, 400, "['best_of']"),
    C("v2-generate-n-0", "POST", "/v2/models/char_lstm/generate", tgen(parameters={"n": 0}), JSON, 400,
      "n must be an integer in [1, 16], got 0"),
    C("v2-generate-n-string", "POST", "/v2/models/char_lstm/generate", tgen(n="3"), JSON, 400,
      "n must be an integer in [1, 16], got '3'"),
    C("v2-generate-n-times-max-tokens", "POST", "/v2/models/char_lstm/generate", tgen(n=2, max_tokens=1001), JSON,
      400, "n x max_tokens = 2 x 1001 = 2002 characters; the limit is 2000"),
    C("v2-generate-stream-n-17", "POST", "/v2/models/char_lstm/generate_stream", tgen(n=17), JSON, 400,
      "n must be an integer in [1, 16], got 17"),
    C("v2-generate-stream-n-times-max-tokens", "POST", "/v2/models/char_lstm/generate_stream",
      tgen(n=16, max_tokens=626), JSON, 400, "16 x 626 = 10016 characters; the limit is 10000"),
    C("v2-generate-stream-2001-chars", "POST", "/v2/models/char_lstm/generate_stream",
      js({"text_input": "e" * 2001}), JSON, 400, "text_input has 2001 characters"),
    C("v2-generate-stream-image-model", "POST", "/v2/models/vgg_fc7/generate_stream", tgen(), JSON, 400,
      "image_feature_extractor model"),
    # KServe v2 REST: the binary tensor extension
    C("v2-header-length-past-body", "POST", "/v2/models/lenet5/infer", *binary([fp32(data=None)], b"", "99999"), 400,
      "Inference-Header-Content-Length"),
    C("v2-header-length-negative", "POST", "/v2/models/lenet5/infer", *binary([fp32()], b"", "-1"), 400,
      "Inference-Header-Content-Length"),
    C("v2-header-length-not-integer", "POST", "/v2/models/lenet5/infer", *binary([fp32()], b"", "12.5"), 400,
      "Inference-Header-Content-Length"),
    C("v2-header-length-unicode-digit", "POST", "/v2/models/lenet5/infer", *binary([fp32()], b"", "\u00b2"), 400,
      "Inference-Header-Content-Length"),
    C("v2-binary-size-mismatch", "POST", "/v2/models/lenet5/infer",
      *binary([{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "parameters": {"binary_data_size": 8}}],
              bytes(8)), 400, "8 bytes of data, expected 4096"),
    C("v2-binary-size-past-body", "POST", "/v2/models/lenet5/infer",
      *binary([{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                "parameters": {"binary_data_size": 4096}}], bytes(100)), 400, "does not fit"),
    C("v2-binary-size-negative", "POST", "/v2/models/lenet5/infer",
      *binary([{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                "parameters": {"binary_data_size": -4096}}], IMAGE_RAW), 400, "does not fit"),
    C("v2-binary-size-string", "POST", "/v2/models/lenet5/infer",
      *binary([{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                "parameters": {"binary_data_size": "4096"}}], IMAGE_RAW), 400, "does not fit"),
    C("v2-binary-trailing-bytes", "POST", "/v2/models/lenet5/infer",
      *binary([{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                "parameters": {"binary_data_size": 4096}}], IMAGE_RAW + bytes(4)), 400, "belong to no input"),
    # KServe v2 REST: compression
    C("v2-content-encoding-br", "POST", "/v2/models/lenet5/infer", v2(fp32()), JSON | {"content-encoding": "br"},
      400, "unsupported Content-Encoding 'br'"),
    C("v2-bad-gzip", "POST", "/v2/models/lenet5/infer", v2(fp32()), JSON | {"content-encoding": "gzip"}, 400,
      "not valid gzip"),
    C("v2-truncated-gzip", "POST", "/v2/models/lenet5/infer", gzip.compress(v2(fp32()))[:60],
      JSON | {"content-encoding": "gzip"}, 400, "truncated gzip"),
    C("v2-bad-deflate", "POST", "/v2/models/lenet5/infer", b"\x00\x01\x02", JSON | {"content-encoding": "deflate"},
      400, "not valid deflate"),
    C("v2-gzip-bomb", "POST", "/v2/models/lenet5/infer", GZIP_BOMB, JSON | {"content-encoding": "gzip"}, 413,
      "decompressed request body is over"),
    # KServe v2 gRPC: the same mistakes
    C("grpc-unknown-model", "GRPC", "ModelInfer", grpc_request("nope", [LENET_RAW], [IMAGE_RAW]),
      status="NOT_FOUND", message="unknown model 'nope'"),
    C("grpc-unknown-version", "GRPC", "ModelInfer", grpc_request("lenet5", [LENET_RAW], [IMAGE_RAW], version="0000"),
      status="NOT_FOUND", message="no version '0000'"),
    C("grpc-no-inputs", "GRPC", "ModelInfer", grpc_request("lenet5"), status="INVALID_ARGUMENT", message="no inputs"),
    C("grpc-repository-api-off", "GRPC", "RepositoryIndex", pb.RepositoryIndexRequest(), status="PERMISSION_DENIED",
      message="NNSERVE_MANAGEMENT_TOKEN_FILE"),
    C("grpc-wrong-datatype", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("input", "FP64", [1, 1, 32, 32], None, None)], [bytes(8192)]),
      status="INVALID_ARGUMENT", message="datatype 'FP64'"),
    C("grpc-raw-size-mismatch", "GRPC", "ModelInfer", grpc_request("lenet5", [LENET_RAW], [bytes(8)]),
      status="INVALID_ARGUMENT", message="8 bytes of data, expected 4096"),
    C("grpc-typed-count-mismatch", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("input", "FP32", [1, 1, 32, 32], "fp32_contents", [0.0] * 10)]),
      status="INVALID_ARGUMENT", message="10 values, expected 1024"),
    C("grpc-raw-count-mismatch", "GRPC", "ModelInfer", grpc_request("lenet5", [LENET_RAW], [IMAGE_RAW, IMAGE_RAW]),
      status="INVALID_ARGUMENT", message="raw_input_contents has 2 entries"),
    C("grpc-nan", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("input", "FP32", [1, 1, 32, 32], "fp32_contents", [float("nan")] * 1024)]),
      status="INVALID_ARGUMENT", message="NaN or infinite"),
    C("grpc-raw-infinity", "GRPC", "ModelInfer",
      grpc_request("lenet5", [LENET_RAW], [np.full((1, 1, 32, 32), np.inf, np.float32).tobytes()]),
      status="INVALID_ARGUMENT", message="NaN or infinite"),
    C("grpc-wrong-rank", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("input", "FP32", [32, 32], None, None)], [IMAGE_RAW]),
      status="INVALID_ARGUMENT", message="integer dimensions"),
    C("grpc-negative-dim", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("input", "FP32", [-1, 1, 32, 32], None, None)], [IMAGE_RAW]),
      status="INVALID_ARGUMENT", message="any size >= 1"),
    C("grpc-unknown-input", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("pixels", "FP32", [1, 1, 32, 32], None, None)], [IMAGE_RAW]),
      status="INVALID_ARGUMENT", message="no input 'pixels'"),
    C("grpc-missing-input", "GRPC", "ModelInfer",
      grpc_request("char_gru", [("tokens", "INT64", [1, 2], "int64_contents", [1, 2])]),
      status="INVALID_ARGUMENT", message="needs inputs ['h']"),
    C("grpc-batch-mismatch", "GRPC", "ModelInfer", grpc_text([1, 2], batch=3), status="INVALID_ARGUMENT",
      message="needs them equal"),
    C("grpc-token-negative", "GRPC", "ModelInfer", grpc_text([-1]), status="INVALID_ARGUMENT",
      message="must be in [0,"),
    C("grpc-token-int64-max", "GRPC", "ModelInfer", grpc_text([2**63 - 1]), status="INVALID_ARGUMENT",
      message="must be in [0,"),
    C("grpc-100k-tokens", "GRPC", "ModelInfer", grpc_text([1] * 100_000), status="INVALID_ARGUMENT",
      message="sequence length 100000; the limit is 2000"),
    C("grpc-tokens-per-request", "GRPC", "ModelInfer",
      grpc_request("char_lstm", [("tokens", "INT64", [10, 2000], None, None), *[(n, "FP32", [LAYERS, 10, HIDDEN],
                                                                                 None, None) for n in ("h", "c")]]),
      status="INVALID_ARGUMENT", message="NNSERVE_MAX_REQUEST_TOKENS"),
    C("grpc-items-per-request", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("input", "FP32", [16385, 1, 32, 32], None, None)]),
      status="INVALID_ARGUMENT", message="NNSERVE_MAX_REQUEST_ITEMS"),
    C("grpc-unknown-output", "GRPC", "ModelInfer", grpc_request("lenet5", [LENET_RAW], [IMAGE_RAW], outputs=["probs"]),
      status="INVALID_ARGUMENT", message="no output 'probs'"),
    C("grpc-shared-memory", "GRPC", "ModelInfer",
      grpc_request("lenet5", [LENET_RAW], [IMAGE_RAW], parameters={"shared_memory_region": "r0"}),
      status="INVALID_ARGUMENT", message="shared memory is not supported"),
    C("grpc-model-metadata-unknown", "GRPC", "ModelMetadata", pb.ModelMetadataRequest(name="nope"),
      status="NOT_FOUND", message="unknown model 'nope'"),
    C("grpc-classification-over-classes", "GRPC", "ModelInfer",
      grpc_request("lenet5", [LENET_RAW], [IMAGE_RAW], outputs=["logits"], classification=11),
      status="INVALID_ARGUMENT", message="11 classes but the output has 10"),
    C("grpc-image-bytes-not-an-image", "GRPC", "ModelInfer",
      grpc_request("lenet5.image", [("image", "BYTES", [2], None, None)], [bytes_raw([PNG, b"not an image"])]),
      status="INVALID_ARGUMENT", message="input 'image' row 1"),
    C("grpc-image-bytes-typed-contents-not-image", "GRPC", "ModelInfer",
      grpc_request("vgg_fc7.image", [("image", "BYTES", [1, 1], "bytes_contents",
                                     [b"\x89PNG\r\n\x1a\n" + bytes(30)])]),
      status="INVALID_ARGUMENT", message="input 'image' row 0: corrupt PNG"),
    C("grpc-image-bytes-and-float", "GRPC", "ModelInfer",
      grpc_request("lenet5.image", [("image", "BYTES", [1], None, None), LENET_RAW], [bytes_raw([PNG]), IMAGE_RAW]),
      status="INVALID_ARGUMENT", message="the tensor 'input' goes to model 'lenet5'"),
    C("grpc-image-bytes-to-the-model", "GRPC", "ModelInfer",
      grpc_request("lenet5", [("image", "BYTES", [1], None, None)], [bytes_raw([PNG])]),
      status="INVALID_ARGUMENT", message="BYTES 'image' goes to model 'lenet5.image'"),
    C("grpc-image-bytes-truncated-length", "GRPC", "ModelInfer",
      grpc_request("lenet5.image", [("image", "BYTES", [1], None, None)], [b"\x05\x00"]),
      status="INVALID_ARGUMENT", message="ends inside the length"),
    C("grpc-text-input-not-utf8", "GRPC", "ModelInfer",
      grpc_request("char_lstm.text", [("text_input", "BYTES", [1], None, None)], [bytes_raw([b"\xff\xfe"])]),
      status="INVALID_ARGUMENT", message="not UTF-8"),
    # gRPC ModelStreamInfer: a bad request is answered in the stream (error_message), the stream goes on
    C("stream-unknown-parameter", "GRPC_STREAM", "ModelStreamInfer", stream_request(beam_width=4),
      status="in-stream", message="unknown sampling parameter(s) ['beam_width']"),
    C("stream-top-p-2", "GRPC_STREAM", "ModelStreamInfer", stream_request(top_p=2.0), status="in-stream",
      message="top_p must be a number in (0, 1]"),
    C("stream-max-tokens-huge", "GRPC_STREAM", "ModelStreamInfer", stream_request(max_tokens=10**12),
      status="in-stream", message="max_tokens must be an integer in [1, 10000]"),
    C("stream-n-0", "GRPC_STREAM", "ModelStreamInfer", stream_request(n=0), status="in-stream",
      message="n must be an integer in [1, 16], got 0"),
    C("stream-n-string", "GRPC_STREAM", "ModelStreamInfer", stream_request(n="3"), status="in-stream",
      message="n must be an integer in [1, 16], got '3'"),
    C("stream-n-times-max-tokens", "GRPC_STREAM", "ModelStreamInfer", stream_request(n=8, max_tokens=1251),
      status="in-stream", message="n x max_tokens = 8 x 1251 = 10008 characters; the limit is 10000"),
    C("grpc-infer-n-17", "GRPC", "ModelInfer", stream_request(n=17), status="INVALID_ARGUMENT",
      message="n must be an integer in [1, 16], got 17"),
    C("grpc-infer-n-times-max-tokens", "GRPC", "ModelInfer", stream_request(n=2, max_tokens=1001),
      status="INVALID_ARGUMENT", message="the limit is 2000 per request (10000 when streamed)"),
    C("stream-temperature-string", "GRPC_STREAM", "ModelStreamInfer", stream_request(temperature="hot"),
      status="in-stream", message="temperature"),
    C("stream-prompt-over-limit", "GRPC_STREAM", "ModelStreamInfer", stream_request("e" * 2001),
      status="in-stream", message="text_input has 2001 characters; the limit is 2000"),
    C("stream-text-input-on-image-model", "GRPC_STREAM", "ModelStreamInfer",
      stream_request(model="lenet5"), status="in-stream", message="no input 'text_input'"),
    C("stream-text-input-to-the-model", "GRPC_STREAM", "ModelStreamInfer",
      stream_request(model="char_lstm"), status="in-stream", message="goes to model 'char_lstm.text'"),
    C("stream-unknown-model", "GRPC_STREAM", "ModelStreamInfer", stream_request(model="nope"), status="in-stream",
      message="unknown model 'nope'"),
]


def test_the_corpus_is_large_and_distinct():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 80
    assert {c.method for c in CASES} >= {"GET", "POST", "GRPC"}
    for case in CASES:  # never a 5xx expected: the corpus is client mistakes only
        assert case.message and (case.method in ("GRPC", "GRPC_STREAM") or 400 <= case.status < 500), case.id


def every_worker_ready(url: str, timeout_s: float = 120.0) -> None:
    """/readyz answers from one worker; the others may still be loading (a 503 "still loading" then). Requests
    spread over the workers: 16 ready answers in a row say every worker has every model."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 16:
        assert time.monotonic() < deadline, "the server's workers did not all become ready"
        ready = requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        streak = streak + 1 if ready else 0
        if not ready:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(live_server):
    every_worker_ready(live_server.http_url)
    return live_server


@pytest.fixture(scope="module")
def log_offset(server) -> int:
    """Where the server log stood before the corpus: the corpus's own lines are what follows."""
    return server.log_path.stat().st_size


@pytest.fixture(scope="module")
def grpc_stub(server):
    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 64 << 20)])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_gets_4xx_naming_the_problem(server, grpc_stub, log_offset, case: Case):
    if case.method == "GRPC_STREAM":  # Triton answers a stream's bad request in the stream, which goes on
        call = grpc_stub.ModelStreamInfer(iter([case.body]), timeout=60)
        first = next(call)
        call.cancel()
        assert case.message in first.error_message, first
        return
    if case.method == "GRPC":
        with pytest.raises(grpc.RpcError) as e:
            getattr(grpc_stub, case.path)(case.body, timeout=60)
        assert e.value.code().name == case.status, e.value.details()
        assert case.message in e.value.details(), e.value.details()
        return
    response = requests.request(case.method, server.http_url + case.path, data=case.body, headers=case.headers,
                                timeout=60)
    assert response.status_code == case.status, response.text[:500]
    if response.headers.get("content-type", "").startswith("application/json"):
        message = response.json()["error"]
    else:  # Starlette's own 404 / 405 for routes that do not exist or methods they do not take
        assert response.status_code in (404, 405), response.text[:500]
        message = response.text
    assert case.message in message, message


def test_an_image_url_is_never_fetched(server):
    """The image field sent as a URL text value pointing at a socket we hold: refused, and nothing connects."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/digit.png"
        response = requests.post(server.http_url + "/classify", files={"image": (None, url)}, timeout=60)
        assert response.status_code == 415 and "never fetches URLs" in response.json()["error"]
        with pytest.raises(TimeoutError):  # accept() times out: the server never opened a connection
            listener.accept()


def reference_logits(tag: str, x: np.ndarray) -> np.ndarray:
    model = bentoml.models.get(tag)
    session = ort.InferenceSession(model.path_of(model.info.metadata["onnx_file"]), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def test_after_the_corpus_the_server_answers_correctly_and_logged_no_error(server, log_offset, tiny_store):
    """Runs after the corpus (file order): normal requests on every front end give the right answers, and the
    server log since the corpus began has no ERROR line or traceback (client mistakes log one DEBUG line)."""
    url = server.http_url
    digit = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, "PNG")
    spec = bentoml.models.get(tiny_store["lenet5"]).info.metadata["preprocessing"]
    x = standardize(to_unit(digit[None], spec), spec).astype(np.float32)
    want = reference_logits(tiny_store["lenet5"], x)[0]

    response = requests.post(f"{url}/v2/models/lenet5/infer", data=v2(fp32(x.shape, x.ravel().tolist())),
                             headers=JSON, timeout=60)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["outputs"][0]["data"], want, rtol=1e-4, atol=1e-5)

    response = requests.post(f"{url}/classify", files={"image": ("d.png", buffer.getvalue(), "image/png")},
                             data={"top_k": "10"}, timeout=60)
    assert response.status_code == 200, response.text
    probabilities = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
    got = {p["label"]: p["probability"] for p in response.json()["predictions"]}
    np.testing.assert_allclose([got[str(i)] for i in range(10)], probabilities, rtol=1e-4, atol=1e-6)

    texts = []
    for _ in range(2):  # same seed, same text; a top_k far past the vocabulary (once a 500) means all of it
        response = requests.post(f"{url}/generate", data=gen(seed=7, max_new_chars=20, top_k=10**40), headers=JSON,
                                 timeout=60)
        assert response.status_code == 200, response.text
        texts.append(response.json()["text"])
    assert texts[0] == texts[1] and len(texts[0]) == 20

    with grpc.insecure_channel(server.grpc_url) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            grpc_request("lenet5", [LENET_RAW], [x.tobytes()]), timeout=60)
    np.testing.assert_allclose(np.frombuffer(reply.raw_output_contents[0], np.float32), want, rtol=1e-4, atol=1e-5)

    with open(server.log_path, "rb") as log:
        log.seek(log_offset)
        since = log.read().decode(errors="replace")
    noisy = [line for line in since.splitlines() if "ERROR" in line or "Traceback" in line or "WARNING" in line]
    assert not noisy, "\n".join(noisy[:20])
