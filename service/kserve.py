"""Open Inference Protocol (KServe v2) pieces shared by the REST (kserve_http) and gRPC (kserve_grpc) front-ends.

One datatype table, one place that checks a request's tensors against the model's specs, one model
metadata builder. Everything a client got wrong raises ``ClientError`` (400) or ``NotFound`` (404) with a
message naming the problem, before anything reaches ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from models.kinds.base import RequestError
from service import images, metrics
from service.errors import ClientError, NotFound, PayloadTooLarge, Unavailable
from service.generation import MAX_PROMPT_CHARS, Generation, GenerationRequest
from service.runtime import ModelRuntime
from service.settings import Settings

if TYPE_CHECKING:
    from service.repository import Repository

SERVER_NAME = "nnserve"
PLATFORM = "onnxruntime_onnx"  # what Triton reports for ONNX models
# Triton's names: the binary tensor extension, top-k classes as "score:index:label" strings, and the text
# generate extension (REST /generate, /generate_stream; over gRPC, ModelStreamInfer streams the same).
EXTENSIONS = ["binary_tensor_data", "classification", "generate"]
BYTES = "BYTES"  # strings and encoded files: 4-byte little-endian length + bytes per element on the wire

# KServe datatype -> (numpy dtype, gRPC InferTensorContents field). Hand-written rather than using
# tritonclient.utils' two converters because this one table also says which typed gRPC field holds the data
# (None: only raw contents can carry it). BYTES is left out: no graph takes strings; the kinds' protocol
# inputs (encoded images, prompts) and outputs (classes, text) are BYTES, handled apart (below).
DATATYPES: dict[str, tuple[np.dtype, str | None]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype(np.uint8), "uint_contents"),
    "UINT16": (np.dtype(np.uint16), "uint_contents"),
    "UINT32": (np.dtype(np.uint32), "uint_contents"),
    "UINT64": (np.dtype(np.uint64), "uint64_contents"),
    "INT8": (np.dtype(np.int8), "int_contents"),
    "INT16": (np.dtype(np.int16), "int_contents"),
    "INT32": (np.dtype(np.int32), "int_contents"),
    "INT64": (np.dtype(np.int64), "int64_contents"),
    "FP16": (np.dtype(np.float16), None),
    "FP32": (np.dtype(np.float32), "fp32_contents"),
    "FP64": (np.dtype(np.float64), "fp64_contents"),
}
DATATYPE_OF_NUMPY = {dtype: name for name, (dtype, _) in DATATYPES.items()}

# Per-request limits on the work one inference request can ask for (docs/service.md, "Limits"). Items: the
# batch axis of every input, NNSERVE_MAX_REQUEST_ITEMS. Text models also bound the sequence axis of
# ``tokens``: per item as a /generate prompt (a [B, T] call is exactly a prefill), and per request in tokens
# (items x sequence length, NNSERVE_MAX_REQUEST_TOKENS), since their cost grows with every token.
MAX_SEQUENCE_LENGTH = MAX_PROMPT_CHARS


def kserve_datatype(dtype: str | np.dtype) -> str:
    """KServe datatype name of a numpy dtype (or dtype name such as ``"float32"``); object arrays (of bytes)
    are BYTES."""
    return BYTES if np.dtype(dtype) == np.dtype(object) else DATATYPE_OF_NUMPY[np.dtype(dtype)]


def numpy_dtype(datatype: str) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ClientError(f"unsupported datatype {str(datatype)[:50]!r}; expected one of {sorted(DATATYPES)}")
    return DATATYPES[datatype][0]


def server_version() -> str:
    try:
        return package_metadata.version(SERVER_NAME)
    except package_metadata.PackageNotFoundError:
        return "0+unknown"


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def get_model(repository: Repository, name: str, version: str = "") -> ModelRuntime:
    """The served model ``name``; an empty version means the one being served. Raises NotFound."""
    runtime = repository.get(name)
    if version and version != runtime.version:
        raise NotFound(f"model {name!r} has no version {version!r}; serving version {runtime.version!r}")
    return runtime


def model_metadata(runtime: ModelRuntime) -> dict:
    """KServe model metadata: names, datatypes and shapes (-1 = dynamic) straight from the store metadata,
    then the kind's BYTES protocol inputs and outputs. ``parameters`` (REST only: gRPC's message has no such
    field) says what those take: sampling parameters, which outputs answer the classification extension."""
    def tensors(specs):
        return [{"name": s.name, "datatype": kserve_datatype(s.dtype), "shape": list(s.shape)} for s in specs]

    kind, meta = runtime.kind_module, runtime.metadata
    extra_in = [{k: p[k] for k in ("name", "datatype", "shape")} for p in kind.protocol_inputs(meta)]
    extra_out = [{k: p[k] for k in ("name", "datatype", "shape")} for p in kind.protocol_outputs(meta)]
    parameters: dict = {}
    if kind.generates:
        parameters["sampling"] = {"max_tokens": "integer", "temperature": "number > 0", "top_k": "integer >= 1",
                                  "top_p": "number in (0, 1]", "seed": "integer >= 0",
                                  "stop": "string (REST: or a list of strings)"}
    classes = [s.name for s in runtime.outputs if kind.output_labels(meta, s.name)]
    if classes:
        parameters["classification"] = classes
    for p in kind.protocol_inputs(meta):
        if p["role"] == "image":
            parameters["image"] = (f"encoded image files (PNG, JPEG, ...) instead of {meta['roles']['image']!r}, "
                                   "one per batch row, shape [N] or [N, 1]")
    return {"name": runtime.name, "versions": [runtime.version], "platform": PLATFORM,
            "inputs": tensors(runtime.inputs) + extra_in, "outputs": tensors(runtime.outputs) + extra_out,
            **({"parameters": parameters} if parameters else {})}


# Failures that are not a server fault: the client's mistake, a model loading, a full queue.
EXPECTED_FAILURES = (ClientError,)


def http_status(exc: Exception) -> int:
    """HTTP status for a failure; 500 means a server fault."""
    return exc.status if isinstance(exc, ClientError) else 500


@dataclass(frozen=True)
class RequestLimits:
    max_sequence_length: int
    max_request_tokens: int


@dataclass
class RequestTensor:
    """One input tensor as the client described it; ``array`` is filled once its data is decoded."""

    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None = None
    rows: list[bytes] | None = None  # a BYTES protocol input's elements, once decoded
    role: str | None = None  # a protocol input's role ("image", "prompt"); None for the graph's tensors


def protocol_role(runtime: ModelRuntime, t: RequestTensor) -> str | None:
    """The role of a BYTES input the model's kind takes besides its graph (models/kinds/base.py)."""
    if t.datatype != BYTES:
        return None
    return next((p["role"] for p in runtime.kind_module.protocol_inputs(runtime.metadata) if p["name"] == t.name),
                None)


def check_header(runtime: ModelRuntime, tensors: list[RequestTensor], settings: Settings | None = None) -> None:
    """Names, datatypes and shapes against the model's input specs (or its kind's protocol inputs), and the
    per-request limits of ``settings`` (defaults when None): all before any data is decoded."""
    settings = settings or Settings()
    specs = {s.name: s for s in runtime.inputs}
    for t in tensors:
        t.role = protocol_role(runtime, t)
    encoded = [t for t in tensors if t.role]
    if encoded:
        check_protocol_input(runtime, encoded, [t for t in tensors if not t.role], settings)
        return
    seen = set()
    for t in tensors:
        if t.name not in specs:
            extra = [p["name"] for p in runtime.kind_module.protocol_inputs(runtime.metadata)]
            raise ClientError(f"model {runtime.name!r} has no input {str(t.name)[:100]!r}; inputs are {sorted(specs)}"
                              + (f" (or BYTES {extra})" if extra else ""))
        if t.name in seen:
            raise ClientError(f"input {t.name!r} is given more than once")
        seen.add(t.name)
        spec = specs[t.name]
        expected = kserve_datatype(spec.dtype)
        if t.datatype != expected:
            raise ClientError(f"input {t.name!r} of model {runtime.name!r} has datatype {str(t.datatype)[:50]!r}, "
                              f"expected {expected!r}")
        if (not isinstance(t.shape, list | tuple) or len(t.shape) != len(spec.shape)
                or any(isinstance(d, bool) or not isinstance(d, int) for d in t.shape)):
            raise ClientError(f"input {t.name!r} of model {runtime.name!r} has shape {str(t.shape)[:100]}, "
                              f"expected {len(spec.shape)} integer dimensions like {spec.shape} (-1 = any)")
        if any(d < 1 for d in t.shape) or any(e >= 0 and d != e for d, e in zip(t.shape, spec.shape, strict=True)):
            raise ClientError(f"input {t.name!r} of model {runtime.name!r} has shape {str(list(t.shape))[:100]}, "
                              f"expected {spec.shape} (-1 = any size >= 1)")
    missing = sorted(set(specs) - seen)
    if missing:
        raise ClientError(f"model {runtime.name!r} needs inputs {missing} that the request does not give")
    check_shared_dims(runtime, tensors)
    check_limits(runtime, tensors, settings)


def check_protocol_input(runtime: ModelRuntime, encoded: list[RequestTensor], others: list[RequestTensor],
                         settings: Settings) -> None:
    """A BYTES protocol input is the whole request: one of them, no graph tensor beside it, shape [N] or
    [N, 1] (one element per batch row), and one prompt per generation request."""
    t = encoded[0]
    if len(encoded) > 1:
        raise ClientError(f"input {t.name!r} is given more than once")
    if others:
        replaced = runtime.roles.get("image") if t.role == "image" else None
        raise ClientError(f"input {t.name!r} (BYTES) and input {others[0].name!r} are alternatives: send "
                          + (f"encoded images as {t.name!r} or the float tensor {replaced!r}, not both"
                             if replaced else f"{t.name!r} alone"))
    if (not isinstance(t.shape, list | tuple) or len(t.shape) not in (1, 2)
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in t.shape)
            or (len(t.shape) == 2 and t.shape[1] != 1)):
        raise ClientError(f"input {t.name!r} has shape {str(t.shape)[:100]}; expected [N] or [N, 1]: one element "
                          "per batch row")
    if t.role == "prompt" and t.shape[0] != 1:
        raise ClientError(f"input {t.name!r} has {t.shape[0]} elements; a generation request takes one prompt")
    if t.shape[0] > settings.max_request_items:
        raise ClientError(f"input {t.name!r} of model {runtime.name!r} has {t.shape[0]} items; the limit is "
                          f"{settings.max_request_items} per request (NNSERVE_MAX_REQUEST_ITEMS)")


def check_limits(runtime: ModelRuntime, tensors: list[RequestTensor], settings: Settings) -> None:
    """The per-request limits (see MAX_SEQUENCE_LENGTH) on shapes already checked against the model."""
    for t in tensors:
        axis = runtime.batch_axis(t.name)
        if t.shape[axis] > settings.max_request_items:
            raise ClientError(f"input {t.name!r} of model {runtime.name!r} has {t.shape[axis]} items (dim {axis}); "
                              f"the limit is {settings.max_request_items} per request (NNSERVE_MAX_REQUEST_ITEMS): "
                              "split it into several requests")
    problem = runtime.kind_module.check_request_shapes(
        runtime.metadata, {t.name: list(t.shape) for t in tensors},
        RequestLimits(MAX_SEQUENCE_LENGTH, settings.max_request_tokens))
    if problem:
        raise ClientError(f"model {runtime.name!r}: {problem}")


def check_shared_dims(runtime: ModelRuntime, tensors: list[RequestTensor]) -> None:
    """Dynamic dimensions the ONNX graph names alike (e.g. the batch of ``tokens`` and of ``h``) must agree.

    The store metadata only says -1; the graph's own symbolic dimension names say which ones are shared.
    """
    graph_shapes = {i.name: i.shape for i in runtime.session.get_inputs()}
    sizes: dict[str, tuple[str, int, int]] = {}
    for t in tensors:
        for axis, (size, symbol) in enumerate(zip(t.shape, graph_shapes.get(t.name, []), strict=False)):
            if not isinstance(symbol, str) or not symbol:
                continue
            if symbol in sizes and sizes[symbol][2] != size:
                other, other_axis, other_size = sizes[symbol]
                raise ClientError(f"input {t.name!r} dim {axis} is {size} but input {other!r} dim {other_axis} "
                                  f"is {other_size}; the model needs them equal (both are {symbol!r})")
            sizes.setdefault(symbol, (t.name, axis, size))


def element_count(shape: list[int]) -> int:
    return math.prod(shape)


def array_from_bytes(t: RequestTensor, raw: bytes) -> np.ndarray:
    """Decode raw little-endian tensor bytes (binary extension / gRPC raw_input_contents)."""
    dtype = numpy_dtype(t.datatype)
    expected = element_count(t.shape) * dtype.itemsize
    if len(raw) != expected:
        raise ClientError(f"input {t.name!r} has {len(raw)} bytes of data, expected {expected} "
                          f"({t.datatype} x shape {list(t.shape)})")
    return np.frombuffer(raw, dtype=dtype).reshape(t.shape)


def array_from_values(t: RequestTensor, values) -> np.ndarray:
    """Decode a list of values (REST JSON ``data``, flat or nested; gRPC typed contents)."""
    dtype = numpy_dtype(t.datatype)
    try:
        loose = np.asarray(values)
    except (ValueError, RecursionError) as e:  # ragged nested lists, or nested past numpy's 64 dimensions
        raise ClientError(f"input {t.name!r}: data is not a regular array ({str(e)[:200]})") from e
    if loose.size != element_count(t.shape):
        raise ClientError(f"input {t.name!r} has {loose.size} values, expected {element_count(t.shape)} "
                          f"for shape {str(list(t.shape))[:100]}")
    if dtype.kind == "b":
        if loose.dtype.kind != "b":
            raise ClientError(f"input {t.name!r} is BOOL: data must be true/false")
        return loose.reshape(t.shape)
    # numpy's own promotion hides what was wrong (2**63 next to -1 becomes float64, 2**64 an object array):
    # any kind but plain ints for an integer type, or but numbers for a float type, is named value by value.
    wanted = "iu" if dtype.kind in "iu" else "iuf"
    if loose.dtype.kind not in wanted:
        problem = _first_bad_value(values, dtype, t.datatype)
        if problem:
            raise ClientError(f"input {t.name!r} is {t.datatype}: {problem}")
        # Every value fits: numpy only promoted them ([2**63, 0] is float64 to it). Decode at the declared type.
        loose = np.array(values, dtype=dtype)
    if dtype.kind in "iu" and (loose.min() < np.iinfo(dtype).min or loose.max() > np.iinfo(dtype).max):
        raise ClientError(f"input {t.name!r} is {t.datatype}: values from {loose.min()} to {loose.max()} are outside "
                          f"the {t.datatype} range [{np.iinfo(dtype).min}, {np.iinfo(dtype).max}]")
    with np.errstate(over="ignore"):
        array = loose.astype(dtype).reshape(t.shape)
    if dtype.kind == "f" and np.isfinite(loose).all() and not np.isfinite(array).all():
        raise ClientError(f"input {t.name!r} is {t.datatype}: values outside the {t.datatype} range (largest finite "
                          f"{float(np.finfo(dtype).max):g})")
    return array


def _leaves(values) -> Iterator:
    """The scalars of nested lists, depth-first, without recursion (the nesting depth is the client's)."""
    stack = [values]
    while stack:
        value = stack.pop()
        if isinstance(value, list | tuple):
            stack.extend(reversed(value))
        else:
            yield value


def _first_bad_value(values, dtype: np.dtype, datatype: str) -> str | None:
    """What is wrong with the first value that does not fit ``dtype``; None if every value fits (only called
    when numpy's own inference did not give a fitting kind)."""
    for value in _leaves(values):
        if isinstance(value, bool):
            return "data must be numbers, not true/false"
        if isinstance(value, int):
            if dtype.kind in "iu" and not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
                shown = str(value) if abs(value) < 10 ** 40 else f"an integer of {value.bit_length()} bits"
                return (f"value {shown} is outside the {datatype} range "
                        f"[{np.iinfo(dtype).min}, {np.iinfo(dtype).max}]")
            if dtype.kind == "f" and not _fits_float(value):
                return "an integer value is too large for a float"
            continue
        if isinstance(value, float | np.floating) and dtype.kind == "f":
            continue
        if isinstance(value, float | np.floating):
            return f"data must be integers, not floats (got {value!r})"
        return f"data must be numbers, got {type(value).__name__} {repr(value)[:50]}"
    return None


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def select_outputs(runtime: ModelRuntime, requested: list[str], tensors: list[RequestTensor] | None = None
                   ) -> list[str]:
    """Requested output names (all outputs when none are requested), checked against the model: a prompt
    answers the kind's text outputs, anything else the graph's."""
    if any(t.role == "prompt" for t in tensors or []):
        names = [p["name"] for p in runtime.kind_module.protocol_outputs(runtime.metadata)]
    else:
        names = [s.name for s in runtime.outputs]
    for name in requested:
        if name not in names:
            raise ClientError(f"model {runtime.name!r} has no output {name!r} for this request; outputs are {names}")
    return list(requested) or names


def check_classification(runtime: ModelRuntime, name: str, count: object) -> int:
    """A ``classification`` output parameter (Triton's extension): the number of classes, checked against
    the output's width; 0 = not asked."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ClientError(f"output {name!r}: parameters.classification must be an integer >= 1 (the number of "
                          f"classes), got {str(count)[:50]}")
    if count == 0:
        return 0
    spec = next((s for s in runtime.outputs if s.name == name), None)
    if spec is None or len(spec.shape) != 2:
        raise ClientError(f"output {name!r} of model {runtime.name!r} is not [batch, classes]: the classification "
                          "extension takes class scores")
    classes = spec.shape[1]
    if classes >= 0 and count > classes:
        raise ClientError(f"output {name!r}: classification asks for {count} classes but the output has "
                          f"{classes}")
    return count


def classify(runtime: ModelRuntime, name: str, scores: np.ndarray, count: int) -> np.ndarray:
    """Triton's classification answer: BYTES [batch, count] of ``"<value>:<index>[:<label>]"``, highest value
    first, where value is the output's own value (logits stay logits, as Triton does: no softmax) printed as
    C++'s std::to_string does (6 decimals), and label the store metadata's label for that index."""
    labels = runtime.kind_module.output_labels(runtime.metadata, name)
    if count > scores.shape[1]:
        raise ClientError(f"output {name!r}: classification asks for {count} classes but the output has "
                          f"{scores.shape[1]}")
    best = np.argsort(-scores, axis=1, kind="stable")[:, :count]
    out = np.empty(best.shape, dtype=object)
    for row, indices in enumerate(best):
        for j, index in enumerate(indices):
            label = f":{labels[index]}" if labels else ""
            out[row, j] = f"{float(scores[row, index]):f}:{index}{label}".encode()
    return out


def split_bytes(t: RequestTensor, raw: bytes) -> list[bytes]:
    """BYTES elements from raw contents: each a 4-byte little-endian length and that many bytes."""
    rows, offset, count = [], 0, element_count(t.shape)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ClientError(f"input {t.name!r}: BYTES data ends inside the length of element {len(rows)}")
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            raise ClientError(f"input {t.name!r}: BYTES element {len(rows)} claims {length} bytes but only "
                              f"{len(raw) - offset - 4} follow")
        rows.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    if len(rows) != count:
        raise ClientError(f"input {t.name!r} has {len(rows)} BYTES elements, expected {count} for shape "
                          f"{list(t.shape)}")
    return rows


def bytes_from_values(t: RequestTensor, values: object) -> list[bytes]:
    """BYTES elements from JSON strings (flat or nested lists) or gRPC bytes_contents."""
    rows = [v.encode() if isinstance(v, str) else v for v in _leaves(values)]
    if not all(isinstance(v, bytes) for v in rows):
        raise ClientError(f"input {t.name!r} is BYTES: data must be strings")
    if len(rows) != element_count(t.shape):
        raise ClientError(f"input {t.name!r} has {len(rows)} BYTES elements, expected {element_count(t.shape)} "
                          f"for shape {list(t.shape)}")
    return rows


def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor's raw contents (row-major), as Triton writes them."""
    return b"".join(struct.pack("<I", len(v)) + v for v in array.ravel())


def check_values(runtime: ModelRuntime, tensors: list[RequestTensor]) -> None:
    """What the shapes cannot say: float inputs are finite (a NaN would come back as invalid JSON) and
    token ids are inside the vocabulary (ONNX Gather would wrap negative ids silently)."""
    for t in tensors:
        if t.array.dtype.kind == "f" and not np.isfinite(t.array).all():
            raise ClientError(f"input {t.name!r} contains NaN or infinite values; send finite numbers")
    problem = runtime.kind_module.check_request_values(runtime.metadata, {t.name: t.array for t in tensors})
    if problem:
        raise ClientError(f"model {runtime.name!r}: {problem}")


async def decode_images(runtime: ModelRuntime, t: RequestTensor, settings: Settings) -> RequestTensor:
    """Encoded image rows -> the graph's float image input, through /classify's decode and preprocessing
    (service/images.py) in a worker thread. A row that is not an image is a 400 naming it."""
    spec = runtime.metadata["preprocessing"]

    def decode() -> np.ndarray:
        arrays = []
        for i, data in enumerate(t.rows):
            try:
                arrays.append(images.preprocess_upload(data, spec, settings.max_upload_bytes,
                                                       settings.max_image_pixels))
            except PayloadTooLarge as e:
                raise PayloadTooLarge(f"input {t.name!r} row {i}: {e}") from e
            except ClientError as e:  # not an image, corrupt, ...: 400 (415 is for a request's media type)
                raise ClientError(f"input {t.name!r} row {i}: {e}") from e
        return np.stack(arrays)

    x = await asyncio.to_thread(decode)
    name = runtime.roles["image"]
    return RequestTensor(name, kserve_datatype(x.dtype), list(x.shape), x)


async def infer(repository: Repository, runtime: ModelRuntime, tensors: list[RequestTensor],
                output_names: list[str], classes: dict[str, int] | None = None,
                parameters: dict | None = None) -> dict[str, np.ndarray]:
    """Run checked inputs through the repository (which batches and records metrics). Encoded images are
    decoded first and join the same dynamic batches; a prompt is generated through the continuous batcher
    (the whole text, sampled as ``parameters`` say); ``classes``: output -> class count of the classification
    extension."""
    if not repository.is_ready(runtime.name):
        raise Unavailable(f"model {runtime.name!r} is not ready yet", retry_after=1)
    if tensors and tensors[0].role == "prompt":
        text, _ = await generate_text(repository, runtime, tensors[0].rows[0], parameters or {})
        return {output_names[0]: np.array([text.encode()], dtype=object)}
    if tensors and tensors[0].role == "image":
        tensors = [await decode_images(runtime, tensors[0], repository.settings)]
    check_values(runtime, tensors)
    feeds = {t.name: t.array for t in tensors}
    try:
        outputs = await repository.infer(runtime.name, feeds)
    except InvalidArgument as e:  # ONNX Runtime rejected the input: a client mistake the checks above missed
        raise ClientError(f"model {runtime.name!r} rejected the input: {e}") from e
    return {name: classify(runtime, name, outputs[name], classes[name]) if (classes or {}).get(name)
            else outputs[name] for name in output_names}


# ---- text generation (Triton's generate extension and ModelStreamInfer) ---------------------------------------

def generation_request(runtime: ModelRuntime, prompt: bytes | str, parameters: dict) -> tuple[GenerationRequest,
                                                                                               dict]:
    """A GenerationRequest from a Triton prompt and request parameters (named as the kind names them), and
    field -> parameter names for error messages."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode()
        except UnicodeDecodeError as e:
            raise ClientError(f"text_input is not UTF-8 text ({e})") from e
    try:
        options, names = runtime.kind_module.sampling_options(parameters)
    except RequestError as e:
        raise ClientError(f"model {runtime.name!r}: {e}") from e
    return GenerationRequest(prompt=prompt, model=runtime.name, **options), names


def start_generation(repository: Repository, runtime: ModelRuntime, prompt: bytes | str, parameters: dict,
                     stream: bool) -> tuple[GenerationRequest, Generation]:
    """Validate and queue a generation on the model's continuous batcher (the one /generate uses)."""
    if not runtime.kind_module.generates:
        raise ClientError(f"model {runtime.name!r} is a {runtime.kind} model; it does not generate text")
    if not repository.is_ready(runtime.name):
        raise Unavailable(f"model {runtime.name!r} is not ready yet", retry_after=1)
    job, names = generation_request(runtime, prompt, parameters)
    flush = repository.settings.stream_flush_ms / 1e3 if stream else None
    return job, repository.generators[runtime.name].submit(job, flush, names)


async def chunks(runtime: ModelRuntime, generation: Generation) -> AsyncIterator[tuple[str, str | None]]:
    """(text, finish_reason) per chunk, counted in the stream metrics: finish_reason is None but on the last
    chunk ("length" or "stop"); a last ("", reason) when the text ended without a chunk known to be the last
    (a stop string right at a chunk's start). Use with contextlib.aclosing: closing it frees the batch slot
    at once."""
    stream_metrics = metrics.StreamMetrics(runtime).start()
    try:
        reason = None
        async for text in generation:
            stream_metrics.chars(len(text))
            reason = generation.finish_reason
            yield text, reason
        if reason is None:
            yield "", generation.finish_reason or "length"
    finally:
        stream_metrics.stop()
        await generation.aclose()


async def generate_text(repository: Repository, runtime: ModelRuntime, prompt: bytes | str, parameters: dict
                        ) -> tuple[str, Generation]:
    """The whole text of one generation, and its Generation (finish_reason)."""
    _, generation = start_generation(repository, runtime, prompt, parameters, stream=False)
    async with contextlib.aclosing(chunks(runtime, generation)) as parts:
        text = "".join([part async for part, _ in parts])
    return text, generation
