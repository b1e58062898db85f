"""KServe v2 (Open Inference Protocol) against the real server, with Triton's official clients.

Every inference is compared with a direct ONNX Runtime run of the very store model the server reports
(same name and version), so a wrong byte order, dtype, shape or output mix-up fails here.
"""

from __future__ import annotations

import json
import queue
import re
import urllib.error
import urllib.request
from email.message import Message

import bentoml
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

pytestmark = pytest.mark.integration

MODELS = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def http(server) -> httpclient.InferenceServerClient:
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server) -> grpcclient.InferenceServerClient:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def store_model(http: httpclient.InferenceServerClient, name: str) -> bentoml.Model:
    """The store entry the server says it serves under ``name`` (its reported version)."""
    version = http.get_model_metadata(name)["versions"][0]
    return bentoml.models.get(f"{name}:{version}")


def example_feeds(model: bentoml.Model, batch: int = 2, seq_len: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs shaped by the store metadata: the first dynamic dim is the batch, any later one the
    sequence; token ids stay inside the vocabulary."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.info.metadata["inputs"]:
        dims, dynamic = [], iter([batch, seq_len])
        for d in spec["shape"]:
            dims.append(d if d >= 0 else next(dynamic))
        if spec["dtype"] == "int64":
            feeds[spec["name"]] = rng.integers(0, len(model.info.metadata["vocab"]), dims, dtype=np.int64)
        else:
            feeds[spec["name"]] = rng.standard_normal(dims).astype(spec["dtype"])
    return feeds


def reference(model: bentoml.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.path_of(model.info.metadata["onnx_file"]),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_allclose(got[name], array, rtol=1e-4, atol=1e-5, err_msg=name)


def http_inputs(feeds: dict[str, np.ndarray], binary: bool) -> list[httpclient.InferInput]:
    inputs = []
    for name, array in feeds.items():
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def grpc_inputs(feeds: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in feeds.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def post(server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(server.http_url + path, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# --- server and model metadata --------------------------------------------------------------------------------

def test_http_server_live_ready_metadata(http):
    assert http.is_server_live()
    assert http.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "nnserve"
    assert "binary_tensor_data" in meta["extensions"]


def test_grpc_server_live_ready_metadata(grpc_client):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    meta = grpc_client.get_server_metadata()
    assert meta.name == "nnserve"
    assert "binary_tensor_data" in meta.extensions


@pytest.mark.parametrize("name", MODELS)
def test_model_metadata_comes_from_the_store(http, grpc_client, name):
    """A model's metadata lists its network's tensors and nothing else: what a client must send (its kind's
    BYTES front end is a model of its own, tests/test_triton_examples.py)."""
    model = store_model(http, name)
    datatypes = {"float32": "FP32", "int64": "INT64"}

    def expected(key):
        return [{"name": t["name"], "datatype": datatypes[t["dtype"]], "shape": t["shape"]}
                for t in model.info.metadata[key]]

    meta = http.get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == [model.tag.version]
    assert meta["inputs"] == expected("inputs") and meta["outputs"] == expected("outputs")
    assert meta["parameters"]["front_end"] == name + (".text" if "vocab" in model.info.metadata else ".image")
    assert http.is_model_ready(name)
    assert http.is_model_ready(name, model_version=model.tag.version)

    meta = grpc_client.get_model_metadata(name, as_json=True)
    assert meta["name"] == name and meta["versions"] == [model.tag.version]
    # as_json renders int64 shapes as strings (protobuf JSON mapping)
    assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in meta["inputs"]] == expected("inputs")
    assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in meta["outputs"]] == expected("outputs")
    assert grpc_client.is_model_ready(name)


# --- inference ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", MODELS)
def test_http_infer_matches_onnxruntime(http, name, binary):
    model = store_model(http, name)
    feeds = example_feeds(model)
    out_names = [t["name"] for t in model.info.metadata["outputs"]]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in out_names]
    result = http.infer(name, http_inputs(feeds, binary), outputs=outputs)
    response = result.get_response()
    assert response["model_name"] == name and response["model_version"] == model.tag.version
    for out in response["outputs"]:  # the layout asked for: raw bytes after the header, or JSON data
        assert ("binary_data_size" in out.get("parameters", {})) == binary
        assert ("data" in out) == (not binary)
    assert_matches({n: result.as_numpy(n) for n in out_names}, reference(model, feeds))


@pytest.mark.parametrize("name", MODELS)
def test_grpc_infer_matches_onnxruntime(http, grpc_client, name):
    model = store_model(http, name)
    feeds = example_feeds(model, batch=3, seq_len=4, seed=1)
    result = grpc_client.infer(name, grpc_inputs(feeds), request_id="r-1")
    response = result.get_response()
    assert response.id == "r-1" and response.model_version == model.tag.version
    assert len(response.raw_output_contents) == len(response.outputs)  # replies raw, like Triton
    out_names = [t["name"] for t in model.info.metadata["outputs"]]
    assert_matches({n: result.as_numpy(n) for n in out_names}, reference(model, feeds))


def test_http_selected_output_only(http):
    model = store_model(http, "vgg_fc7")
    feeds = example_feeds(model)
    result = http.infer("vgg_fc7", http_inputs(feeds, True), outputs=[httpclient.InferRequestedOutput("fc7")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["fc7"]
    np.testing.assert_allclose(result.as_numpy("fc7"), reference(model, feeds)["fc7"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(http, grpc_client, algorithm):
    model = store_model(http, "lenet5")
    feeds = example_feeds(model)
    want = reference(model, feeds)["logits"]
    result = http.infer("lenet5", http_inputs(feeds, True), request_compression_algorithm=algorithm,
                        response_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-5)
    result = grpc_client.infer("lenet5", grpc_inputs(feeds), compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-5)


def test_http_plain_json_nested_data_and_binary_data_output(server, http):
    """What a curl user sends: nested JSON data, no binary extension; then binary_data_output asks for raw."""
    model = store_model(http, "lenet5")
    x = example_feeds(model, batch=1)["input"]
    want = reference(model, {"input": x})["logits"]
    request = {"id": "q", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                      "data": x.tolist()}]}
    status, headers, body = post(server, "/v2/models/lenet5/infer", json.dumps(request).encode(),
                                 {"Content-Type": "application/json"})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["id"] == "q" and reply["outputs"][0]["shape"] == [1, 10]
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"], np.float32).reshape(1, 10), want,
                               rtol=1e-4, atol=1e-5)

    request["parameters"] = {"binary_data_output": True}
    status, headers, body = post(server, "/v2/models/lenet5/infer", json.dumps(request).encode())
    assert status == 200, body
    header_length = int(headers["Inference-Header-Content-Length"])
    result = httpclient.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-5)


def test_grpc_typed_contents(http, server):
    """Typed ``contents`` (fp32_contents / int64_contents) instead of raw_input_contents, via the raw stub."""
    model = store_model(http, "char_gru")
    feeds = example_feeds(model, batch=1, seq_len=3)
    request = pb.ModelInferRequest(model_name="char_gru")
    for name, array in feeds.items():
        tensor = request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        field = "int64_contents" if array.dtype == np.int64 else "fp32_contents"
        getattr(tensor.contents, field).extend(array.ravel().tolist())
    with grpc.insecure_channel(server.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    got = {o.name: np.frombuffer(raw, np.float32).reshape(list(o.shape))
           for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)}
    assert_matches(got, reference(model, feeds))


def test_grpc_stream_infer_answers_each_request(http, grpc_client):
    model = store_model(http, "lenet5")
    feeds = example_feeds(model, batch=1)
    results: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        grpc_client.async_stream_infer("lenet5", grpc_inputs(feeds))
        grpc_client.async_stream_infer("no_such_model", grpc_inputs(feeds))
        answers = [results.get(timeout=60) for _ in range(2)]
    finally:
        grpc_client.stop_stream()
    good = [r for r, e in answers if e is None]
    errors = [e for r, e in answers if e is not None]
    assert len(good) == 1 and len(errors) == 1
    np.testing.assert_allclose(good[0].as_numpy("logits"), reference(model, feeds)["logits"], rtol=1e-4, atol=1e-5)
    assert "no_such_model" in errors[0].message()


# --- client mistakes: 4xx / INVALID_ARGUMENT / NOT_FOUND naming the problem, and the server keeps serving -------

def test_unknown_model(http, grpc_client):
    feeds = {"input": np.zeros((1, 1, 32, 32), np.float32)}
    with pytest.raises(InferenceServerException, match="no_such_model") as e:
        http.infer("no_such_model", http_inputs(feeds, True))
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no_such_model") as e:
        http.get_model_metadata("no_such_model")
    assert e.value.status() == "404"
    assert not http.is_model_ready("no_such_model")
    with pytest.raises(InferenceServerException, match="no_such_model") as e:
        grpc_client.infer("no_such_model", grpc_inputs(feeds))
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="no_such_model") as e:
        grpc_client.get_model_metadata("no_such_model")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_unknown_version(http):
    with pytest.raises(InferenceServerException, match="no version '0000'") as e:
        http.get_model_metadata("lenet5", model_version="0000")
    assert e.value.status() == "404"


WRONG_INPUTS = {  # model, feeds, what the message must name
    "wrong_shape": ("lenet5", {"input": np.zeros((1, 3, 32, 32), np.float32)}, r"shape \[1, 3, 32, 32\]"),
    "wrong_rank": ("lenet5", {"input": np.zeros((32, 32), np.float32)}, "shape"),
    "wrong_dtype": ("lenet5", {"input": np.zeros((1, 1, 32, 32), np.float64)}, "FP64"),
    "unknown_input": ("lenet5", {"pixels": np.zeros((1, 1, 32, 32), np.float32)}, "pixels"),
    "missing_input": ("char_gru", {"tokens": np.zeros((1, 3), np.int64)}, r"\['h'\]"),
    "batch_mismatch": ("char_gru", {"tokens": np.zeros((2, 3), np.int64), "h": None}, "dim"),
}


def wrong_feeds(http, case: str) -> tuple[str, dict[str, np.ndarray], str]:
    name, feeds, pattern = WRONG_INPUTS[case]
    if case == "batch_mismatch":  # state for batch 3 with tokens for batch 2
        layers, _, hidden = next(t["shape"] for t in store_model(http, name).info.metadata["inputs"]
                                 if t["name"] == "h")
        feeds = {**feeds, "h": np.zeros((layers, 3, hidden), np.float32)}
    return name, feeds, pattern


@pytest.mark.parametrize("case", WRONG_INPUTS)
def test_http_wrong_input_is_400_naming_it(http, case):
    name, feeds, pattern = wrong_feeds(http, case)
    with pytest.raises(InferenceServerException, match=pattern) as e:
        http.infer(name, http_inputs(feeds, True))
    assert e.value.status() == "400"
    assert http.is_server_live() and http.is_model_ready(name)


@pytest.mark.parametrize("case", WRONG_INPUTS)
def test_grpc_wrong_input_is_invalid_argument_naming_it(http, grpc_client, case):
    name, feeds, pattern = wrong_feeds(http, case)
    with pytest.raises(InferenceServerException, match=pattern) as e:
        grpc_client.infer(name, grpc_inputs(feeds))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc_client.is_server_live()


BINARY_HEADER = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                                         "parameters": {"binary_data_size": 8}}]}).encode()
MALFORMED_BODIES = {  # body, extra headers, what the error must name
    "empty": (b"", {}, "empty request body"),
    "not_json": (b"{not json", {}, "not valid JSON"),
    "no_inputs": (b'{"outputs": []}', {}, "inputs"),
    "header_length_past_body": (b"{}", {"Inference-Header-Content-Length": "999"}, "Inference-Header-Content-Length"),
    "binary_size_mismatch": (BINARY_HEADER + bytes(8), {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
                             "8 bytes of data, expected 4096"),
    "bad_gzip": (b"{}", {"Content-Encoding": "gzip"}, "gzip"),
    "float_data_for_fp32_shape": (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], '
                                  b'"data": [0.5]}]}', {}, "1 values, expected 1024"),
}


@pytest.mark.parametrize("case", MALFORMED_BODIES)
def test_http_malformed_request_is_400_json(server, http, case):
    body, headers, pattern = MALFORMED_BODIES[case]
    status, _, reply = post(server, "/v2/models/lenet5/infer", body, headers)
    assert status == 400, reply
    assert re.search(pattern, json.loads(reply)["error"]), reply
    assert http.is_server_live()


def test_http_float_data_for_int64_input_is_400(server, http):
    model = store_model(http, "char_gru")
    feeds = example_feeds(model, batch=1, seq_len=2)
    inputs = [{"name": n, "datatype": np_to_triton_dtype(a.dtype), "shape": list(a.shape), "data": a.ravel().tolist()}
              for n, a in feeds.items()]
    next(t for t in inputs if t["name"] == "tokens")["data"] = [1.5] * feeds["tokens"].size
    status, _, reply = post(server, "/v2/models/char_gru/infer", json.dumps({"inputs": inputs}).encode())
    assert status == 400, reply
    assert "must be integers" in json.loads(reply)["error"]


def test_grpc_unserved_rpc_is_unimplemented(grpc_client):
    with pytest.raises(InferenceServerException, match="not implemented") as e:
        grpc_client.get_log_settings()
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
