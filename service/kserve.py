"""Open Inference Protocol (KServe v2) pieces shared by the REST (kserve_http) and gRPC (kserve_grpc) front-ends.

One datatype table, one place that checks a request's tensors against the model's specs, one model
metadata builder. Everything a client got wrong raises ``ClientError`` (400) or ``NotFound`` (404) with a
message naming the problem, before anything reaches ONNX Runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from service.errors import ClientError, NotFound, Unavailable
from service.runtime import ModelRuntime

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


def kserve_datatype(dtype: str | np.dtype) -> str:
    """KServe datatype name of a numpy dtype (or dtype name such as ``"float32"``)."""
    return DATATYPE_OF_NUMPY[np.dtype(dtype)]


def numpy_dtype(datatype: str) -> np.dtype:
    if datatype not in DATATYPES:
        raise ClientError(f"unsupported datatype {datatype!r}; expected one of {sorted(DATATYPES)}")
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


@dataclass
class RequestTensor:
    """One input tensor as the client described it; ``array`` is filled once its data is decoded."""

    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None = None


def check_header(runtime: ModelRuntime, tensors: list[RequestTensor]) -> None:
    """Names, datatypes and shapes against the model's input specs (before any data is decoded)."""
    specs = {s.name: s for s in runtime.inputs}
    seen = set()
    for t in tensors:
        if t.name not in specs:
            raise ClientError(f"model {runtime.name!r} has no input {t.name!r}; inputs are {sorted(specs)}")
        if t.name in seen:
            raise ClientError(f"input {t.name!r} is given more than once")
        seen.add(t.name)
        spec = specs[t.name]
        expected = kserve_datatype(spec.dtype)
        if t.datatype != expected:
            raise ClientError(f"input {t.name!r} of model {runtime.name!r} has datatype {t.datatype!r}, "
                              f"expected {expected!r}")
        if (not isinstance(t.shape, list | tuple) or len(t.shape) != len(spec.shape)
                or any(isinstance(d, bool) or not isinstance(d, int) for d in t.shape)):
            raise ClientError(f"input {t.name!r} of model {runtime.name!r} has shape {t.shape}, "
                              f"expected {len(spec.shape)} integer dimensions like {spec.shape} (-1 = any)")
        if any(d < 1 for d in t.shape) or any(e >= 0 and d != e for d, e in zip(t.shape, spec.shape, strict=True)):
            raise ClientError(f"input {t.name!r} of model {runtime.name!r} has shape {list(t.shape)}, "
                              f"expected {spec.shape} (-1 = any size >= 1)")
    missing = sorted(set(specs) - seen)
    if missing:
        raise ClientError(f"model {runtime.name!r} needs inputs {missing} that the request does not give")
    check_shared_dims(runtime, tensors)


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
    except ValueError as e:  # ragged nested lists
        raise ClientError(f"input {t.name!r}: data is not a regular array ({e})") from e
    if loose.size != element_count(t.shape):
        raise ClientError(f"input {t.name!r} has {loose.size} values, expected {element_count(t.shape)} "
                          f"for shape {list(t.shape)}")
    if loose.size and loose.dtype.kind not in "biuf":
        raise ClientError(f"input {t.name!r}: data must be numbers, got {loose.dtype.kind!r}-kind values")
    if dtype.kind in "biu" and loose.dtype.kind == "f":
        raise ClientError(f"input {t.name!r} is {t.datatype}: data must be integers, not floats")
    if dtype.kind == "b" and loose.size and loose.dtype.kind != "b":
        raise ClientError(f"input {t.name!r} is BOOL: data must be true/false")
    if dtype.kind in "iu" and loose.size and (loose.min() < np.iinfo(dtype).min or loose.max() > np.iinfo(dtype).max):
        raise ClientError(f"input {t.name!r}: values outside the {t.datatype} range")
    return loose.astype(dtype).reshape(t.shape)


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
    if runtime.kind == "char_lm":
        tokens = next(t.array for t in tensors if t.name == "tokens")
        vocab_size = len(runtime.metadata["vocab"])
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ClientError(f"token ids of model {runtime.name!r} must be in [0, {vocab_size}), "
                              f"got values from {tokens.min()} to {tokens.max()}")


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
