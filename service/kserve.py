"""Open Inference Protocol (KServe v2) pieces shared by the REST (kserve_http) and gRPC (kserve_grpc) front-ends.

One datatype table, one place that checks a request's tensors against the model's specs, one model
metadata builder. Everything a client got wrong raises ``ClientError`` (400) or ``NotFound`` (404) with a
message naming the problem, before anything reaches ONNX Runtime.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from service.errors import ClientError, NotFound, Unavailable
from service.generation import MAX_PROMPT_CHARS
from service.runtime import ModelRuntime
from service.settings import Settings

if TYPE_CHECKING:
    from service.repository import Repository

SERVER_NAME = "nnserve"
PLATFORM = "onnxruntime_onnx"  # what Triton reports for ONNX models
EXTENSIONS = ["binary_tensor_data"]

# KServe datatype -> (numpy dtype, gRPC InferTensorContents field). Hand-written rather than using
# tritonclient.utils' two converters because this one table also says which typed gRPC field holds the data
# (None: only raw contents can carry it). BYTES is left out: no served model takes strings.
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
    """KServe datatype name of a numpy dtype (or dtype name such as ``"float32"``)."""
    return DATATYPE_OF_NUMPY[np.dtype(dtype)]


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
    """KServe model metadata: names, datatypes and shapes (-1 = dynamic) straight from the store metadata."""
    def tensors(specs):
        return [{"name": s.name, "datatype": kserve_datatype(s.dtype), "shape": list(s.shape)} for s in specs]

    return {"name": runtime.name, "versions": [runtime.version], "platform": PLATFORM,
            "inputs": tensors(runtime.inputs), "outputs": tensors(runtime.outputs)}


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


def check_header(runtime: ModelRuntime, tensors: list[RequestTensor], settings: Settings | None = None) -> None:
    """Names, datatypes and shapes against the model's input specs, and the per-request limits of
    ``settings`` (defaults when None): all before any data is decoded."""
    specs = {s.name: s for s in runtime.inputs}
    seen = set()
    for t in tensors:
        if t.name not in specs:
            raise ClientError(f"model {runtime.name!r} has no input {str(t.name)[:100]!r}; inputs are {sorted(specs)}")
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
    check_limits(runtime, tensors, settings or Settings())


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


def select_outputs(runtime: ModelRuntime, requested: list[str]) -> list[str]:
    """Requested output names (all outputs when none are requested), checked against the model."""
    names = [s.name for s in runtime.outputs]
    for name in requested:
        if name not in names:
            raise ClientError(f"model {runtime.name!r} has no output {name!r}; outputs are {names}")
    return list(requested) or names


def check_values(runtime: ModelRuntime, tensors: list[RequestTensor]) -> None:
    """What the shapes cannot say: float inputs are finite (a NaN would come back as invalid JSON) and
    token ids are inside the vocabulary (ONNX Gather would wrap negative ids silently)."""
    for t in tensors:
        if t.array.dtype.kind == "f" and not np.isfinite(t.array).all():
            raise ClientError(f"input {t.name!r} contains NaN or infinite values; send finite numbers")
    problem = runtime.kind_module.check_request_values(runtime.metadata, {t.name: t.array for t in tensors})
    if problem:
        raise ClientError(f"model {runtime.name!r}: {problem}")


async def infer(repository: Repository, runtime: ModelRuntime, tensors: list[RequestTensor],
                output_names: list[str]) -> dict[str, np.ndarray]:
    """Run checked inputs through the repository (which batches and records metrics)."""
    if not repository.is_ready(runtime.name):
        raise Unavailable(f"model {runtime.name!r} is not ready yet", retry_after=1)
    check_values(runtime, tensors)
    feeds = {t.name: t.array for t in tensors}
    try:
        outputs = await repository.infer(runtime.name, feeds)
    except InvalidArgument as e:  # ONNX Runtime rejected the input: a client mistake the checks above missed
        raise ClientError(f"model {runtime.name!r} rejected the input: {e}") from e
    return {name: outputs[name] for name in output_names}
