"""KServe tensor decoding without a server: the datatype table agrees with Triton's own converters, and
data that does not fit its declared datatype/shape is refused with a message naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from service import kserve
from service.errors import ClientError
from service.kserve import RequestTensor


@pytest.mark.parametrize("datatype", sorted(kserve.DATATYPES))
def test_datatype_table_matches_tritonclient(datatype):
    dtype, field = kserve.DATATYPES[datatype]
    assert np.dtype(triton_to_np_dtype(datatype)) == dtype
    assert np_to_triton_dtype(dtype) == datatype
    assert kserve.kserve_datatype(dtype.name) == datatype
    if field is not None:  # a real InferTensorContents field that holds this datatype
        contents = pb.InferTensorContents()
        getattr(contents, field).extend([True] if datatype == "BOOL" else [1])


def test_bytes_datatype_is_refused():
    with pytest.raises(ClientError, match="unsupported datatype 'BYTES'"):
        kserve.numpy_dtype("BYTES")


def test_array_from_bytes_round_trip_and_size_check():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = kserve.array_from_bytes(RequestTensor("x", "FP32", [2, 3]), x.tobytes())
    np.testing.assert_array_equal(got, x)
    with pytest.raises(ClientError, match="20 bytes of data, expected 24"):
        kserve.array_from_bytes(RequestTensor("x", "FP32", [2, 3]), x.tobytes()[:20])


@pytest.mark.parametrize("values", [[[0, 1, 2], [3, 4, 5]], [0, 1, 2, 3, 4, 5]], ids=["nested", "flat"])
def test_array_from_values_flat_or_nested(values):
    got = kserve.array_from_values(RequestTensor("t", "INT64", [2, 3]), values)
    assert got.dtype == np.int64 and got.shape == (2, 3)
    np.testing.assert_array_equal(got.ravel(), np.arange(6))


@pytest.mark.parametrize("datatype, values, message", [
    ("INT64", [1.5, 2.0], "must be integers"),
    ("INT8", [1, 300], "outside the INT8 range"),
    ("FP32", ["a", "b"], "must be numbers"),
    ("FP32", [1.0, 2.0, 3.0], "3 values, expected 2"),
    ("FP32", [[1.0], [2.0, 3.0]], "not a regular array"),
    ("BOOL", [1, 0], "true/false"),
])
def test_array_from_values_refuses(datatype, values, message):
    with pytest.raises(ClientError, match=message):
        kserve.array_from_values(RequestTensor("t", datatype, [1, 2]), values)
