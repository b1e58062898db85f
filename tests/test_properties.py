"""Property-based tests (hypothesis) of the request parsers and tensor validation, in process (no server):
whatever a client sends, each parser either returns a value or raises ClientError (a 4xx); anything else
would be a 500. Plus round trips: a valid tensor or form encoded, then parsed, gives what was encoded.

The KServe checks run against real ModelRuntimes over two small ONNX graphs with the served kinds' tensor
names, shapes and symbolic dimensions (an image classifier, and a char model with RNN state)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from models.runtime import ModelRuntime, RuntimeOptions
from models.vocab import Vocabulary
from service import images, kserve, kserve_http, uploads
from service.errors import ClientError
from service.generation import GenerationRequest
from service.kserve import RequestTensor
from service.settings import Settings

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = "abcdefgh \n"
LAYERS, HIDDEN = 2, 4


def image_graph(path: Path) -> dict:
    """input [batch, 1, 4, 4] -> logits [batch, 3]."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [16, 3], [0.1] * 48)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "image", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return {"nnserve_format": 2, "kind": "image_classifier", "labels": ["a", "b", "c"],
            "roles": {"image": "input", "scores": "logits"},
            "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 1, 4, 4]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 3]}]}


def text_graph(path: Path) -> dict:
    """tokens [batch, seq] + h, c [layers, batch, hidden] -> logits [batch, seq, vocab], h_out, c_out."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [len(VOCAB), len(VOCAB)], [0.0] * len(VOCAB) ** 2)
    nodes = [helper.make_node("Gather", ["table", "tokens"], ["logits"]),
             helper.make_node("Identity", ["h"], ["h_out"]), helper.make_node("Identity", ["c"], ["c_out"])]
    state = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [LAYERS, "batch", HIDDEN]) for n in ("h", "c")]
    graph = helper.make_graph(
        nodes, "text", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]), *state],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", len(VOCAB)]),
         *[helper.make_tensor_value_info(n, TensorProto.FLOAT, [LAYERS, "batch", HIDDEN]) for n in ("h_out", "c_out")]],
        [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    spec = [{"name": n, "dtype": "float32", "shape": [LAYERS, -1, HIDDEN]} for n in ("h", "c")]
    return {"nnserve_format": 2, "kind": "sequence_lm", "vocab": VOCAB,
            "roles": {"tokens": "tokens", "scores": "logits", "state": [["h", "h_out"], ["c", "c_out"]]},
            "inputs": [{"name": "tokens", "dtype": "int64", "shape": [-1, -1]}, *spec],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, -1, len(VOCAB)]},
                        *[{**s, "name": s["name"] + "_out"} for s in spec]]}


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory) -> dict[str, ModelRuntime]:
    folder = tmp_path_factory.mktemp("graphs")
    quiet = RuntimeOptions(intra_op_threads=1)
    out = {}
    for name, build in (("image", image_graph), ("text", text_graph)):
        metadata = build(folder / f"{name}.onnx")
        out[name] = ModelRuntime(name, "1", str(folder / f"{name}.onnx"), metadata, quiet)
    return out


# -- strategies -------------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30)
datatypes = st.sampled_from(sorted(kserve.DATATYPES)) | st.text(max_size=6)
shapes = st.lists(st.integers(-3, 10**20) | st.booleans() | st.text(max_size=2), max_size=5)
numeric = st.sampled_from(["FP32", "FP64", "INT8", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "FP16"])


def raises_only_client_error(call, *args) -> None:
    try:
        call(*args)
    except ClientError as e:
        assert str(e), "a ClientError must name the problem"


# -- multipart ---------------------------------------------------------------------------------------------

content_types = st.sampled_from(["multipart/form-data; boundary=b", "multipart/form-data", "text/plain", "",
                                 "multipart/form-data; boundary=\"\"", "multipart/form-data; boundary=" + "x" * 80]) \
    | st.text(max_size=60)


@SETTINGS
@given(body=st.binary(max_size=400), content_type=content_types)
def test_multipart_parser_raises_only_client_errors(body, content_type):
    raises_only_client_error(uploads.parse_multipart, body, content_type)


@SETTINGS
@given(body=st.binary(max_size=200))
def test_multipart_framing_around_arbitrary_bytes(body):
    """Well-formed start, arbitrary middle: the framing errors python-multipart raises all become ClientError."""
    framed = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n' + body + b"\r\n--b--\r\n"
    raises_only_client_error(uploads.parse_multipart, framed, "multipart/form-data; boundary=b")


field_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters='"\\;'),
                      min_size=1, max_size=10)


@SETTINGS
@given(fields=st.dictionaries(field_names, st.binary(max_size=50), min_size=1, max_size=uploads.MAX_PARTS))
def test_multipart_round_trip(fields):
    """A form written the way curl -F writes it parses back to the same fields and bytes."""
    body = b"".join(b'--bnd\r\nContent-Disposition: form-data; name="' + name.encode() + b'"; filename="f"\r\n'
                    b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n" for name, data in fields.items())
    parts = uploads.parse_multipart(body + b"--bnd--\r\n", "multipart/form-data; boundary=bnd")
    assert {name: part.data for name, part in parts.items()} == fields
    assert all(part.filename == "f" for part in parts.values())


@SETTINGS
@given(value=st.binary(max_size=30))
def test_form_field_readers_raise_only_client_errors(value):
    parts = {"f": uploads.Part("f", value, None)}
    raises_only_client_error(uploads.int_field, parts, "f", 5, 1)
    raises_only_client_error(uploads.bool_field, parts, "f", False)
    raises_only_client_error(uploads.choice_field, parts, "f", ("json", "npy"))


@SETTINGS
@given(value=st.integers(1, 10**17))
def test_int_field_round_trip(value):
    assert uploads.int_field({"top_k": uploads.Part("top_k", str(value).encode(), None)}, "top_k", 5, 1) == value


@SETTINGS
@given(data=st.binary(max_size=300))
def test_image_decoding_raises_only_client_errors(data):
    raises_only_client_error(images.decode_image, data)


@SETTINGS
@given(tail=st.binary(max_size=200), cut=st.integers(0, 200))
def test_damaged_png_raises_only_client_errors(tail, cut):
    good = images.blank_png(16)
    raises_only_client_error(images.decode_image, good[:cut] + tail)


# -- KServe tensors ----------------------------------------------------------------------------------------


@SETTINGS
@given(datatype=numeric, values=json_like, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_array_from_values_raises_only_client_errors(datatype, values, shape):
    raises_only_client_error(kserve.array_from_values, RequestTensor("t", datatype, shape), values)


@SETTINGS
@given(datatype=numeric, raw=st.binary(max_size=64), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_array_from_bytes_raises_only_client_errors(datatype, raw, shape):
    raises_only_client_error(kserve.array_from_bytes, RequestTensor("t", datatype, shape), raw)


arrays = numeric.flatmap(lambda datatype: st.tuples(st.just(datatype), hnp.arrays(
    kserve.DATATYPES[datatype][0], hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))))


@SETTINGS
@given(case=arrays)
def test_tensor_round_trips_json_and_binary(case):
    """An array sent as JSON data (nested lists, as tritonclient writes) or as raw bytes decodes to itself."""
    datatype, array = case
    tensor = RequestTensor("t", datatype, list(array.shape))
    np.testing.assert_array_equal(kserve.array_from_bytes(tensor, array.tobytes()), array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return  # JSON cannot carry NaN / Infinity (refused later by check_values, tested in the corpus)
    values = json.loads(json.dumps(array.tolist()))  # floats print exactly: their dtype gets them back
    decoded = kserve.array_from_values(tensor, values)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


requested = st.lists(st.builds(RequestTensor, st.sampled_from(["input", "tokens", "h", "c", "x"]) | st.text(max_size=4),
                               datatypes | st.integers(), shapes | st.integers()), min_size=1, max_size=4)


@SETTINGS
@given(tensors=requested, which=st.sampled_from(["image", "text"]))
def test_check_header_raises_only_client_errors(runtimes, tensors, which):
    raises_only_client_error(kserve.check_header, kserve.V2Model(which, runtimes[which]), tensors, Settings())


@SETTINGS
@given(batch=st.integers(1, 3000), seq=st.integers(1, 5000))
def test_text_request_limits_hold_exactly(runtimes, batch, seq):
    """A [batch, seq] text request passes the header check iff it is within every per-request limit."""
    limits = Settings()
    tensors = [RequestTensor("tokens", "INT64", [batch, seq]),
               *[RequestTensor(n, "FP32", [LAYERS, batch, HIDDEN]) for n in ("h", "c")]]
    within = (batch <= limits.max_request_items and seq <= kserve.MAX_SEQUENCE_LENGTH
              and batch * seq <= limits.max_request_tokens)
    try:
        kserve.check_header(kserve.V2Model("text", runtimes["text"]), tensors, limits)
        assert within
    except ClientError as e:
        assert not within and "limit" in str(e)


latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=12)


@SETTINGS
@given(body=st.binary(max_size=200) | json_like.map(lambda v: json.dumps(v).encode()), length=st.none() | latin1)
def test_binary_header_split_raises_only_client_errors(body, length):
    headers = {} if length is None else {kserve_http.HEADER_LENGTH: length}
    raises_only_client_error(kserve_http.split_body, headers.get(kserve_http.HEADER_LENGTH), body)


@SETTINGS
@given(header=st.dictionaries(st.sampled_from(["inputs", "outputs", "parameters", "id"]), json_like, max_size=4),
       inputs=st.lists(st.fixed_dictionaries({"name": st.sampled_from(["input", "tokens", "h", "c"])}, optional={
           "datatype": datatypes, "shape": shapes, "data": json_like, "parameters": json_like}), max_size=4),
       binary=st.binary(max_size=64), which=st.sampled_from(["image", "text"]))
def test_inference_request_parsing_raises_only_client_errors(runtimes, header, inputs, binary, which):
    if inputs:
        header = {**header, "inputs": inputs}

    target = kserve.V2Model(which, runtimes[which])

    def parse():
        kserve_http.parse_inputs(target, header, binary, Settings())
        kserve_http.parse_outputs(target, header)

    raises_only_client_error(parse)


@SETTINGS
@given(tokens=st.lists(st.integers(-2**70, 2**70), min_size=1, max_size=6))
def test_token_ids_checked_against_the_vocabulary(runtimes, tokens):
    """Any integer token list: accepted iff every id is in [0, vocab), else a ClientError naming the range."""
    runtime = runtimes["text"]
    tensors = [RequestTensor("tokens", "INT64", [1, len(tokens)]),
               *[RequestTensor(n, "FP32", [LAYERS, 1, HIDDEN]) for n in ("h", "c")]]
    try:
        arrays = {tensors[0].name: kserve.array_from_values(tensors[0], tokens)}
        for t in tensors[1:]:
            arrays[t.name] = np.zeros(t.shape, np.float32)
        kserve.check_values(runtime, arrays)
        assert all(0 <= t < len(VOCAB) for t in tokens)
    except ClientError as e:
        assert not all(0 <= t < len(VOCAB) for t in tokens)
        assert "range" in str(e) or "must be in [0" in str(e), str(e)


# -- /generate ---------------------------------------------------------------------------------------------

generation_bodies = st.dictionaries(
    st.sampled_from(["prompt", "max_new_chars", "temperature", "top_k", "seed", "model", "stream", "n", "extra"])
    | st.text(max_size=5) | st.integers(), json_like | st.integers() | st.floats(), max_size=7)


@SETTINGS
@given(body=generation_bodies | json_like)
def test_generation_request_raises_only_client_errors(body):
    def build_and_validate():
        GenerationRequest.from_dict(body).validate(Vocabulary(VOCAB))

    raises_only_client_error(build_and_validate)


@SETTINGS
@given(prompt=st.text(VOCAB, min_size=1, max_size=50), max_new_chars=st.integers(1, 2000),
       temperature=st.floats(1e-3, 1e3), top_k=st.none() | st.integers(1, 10**30), seed=st.none() | st.integers(0))
def test_valid_generation_requests_pass(prompt, max_new_chars, temperature, top_k, seed):
    request = GenerationRequest.from_dict({"prompt": prompt, "max_new_chars": max_new_chars,
                                           "temperature": temperature, "top_k": top_k, "seed": seed})
    request.validate(Vocabulary(VOCAB))
    assert request.top_k is None or 1 <= request.top_k <= len(VOCAB)  # fits the step loop's int64 array
    assert math.isfinite(request.temperature)
