"""Triton's protocol extras against the real server, with unmodified tritonclient (HTTP and gRPC): the kinds'
front ends as models of their own (``char_lstm.text``, ``lenet5.image``), streamed generation over gRPC
ModelStreamInfer, the generate extension over REST, the classification extension, encoded images as BYTES
inputs, and the client mistakes around them (docs/kserve.md).

Answers are checked against something independent of the route under test: a direct ONNX Runtime run of the
store model, or the REST endpoint that already has its own tests (/generate, /classify), same seed same text.
"""

from __future__ import annotations

import io
import json
import queue
import struct
import time

import bentoml
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.images import preprocess_upload

pytestmark = pytest.mark.integration

PROMPT = "The "
TEXT = "char_lstm.text"  # char_lstm's text front end: text_input in, text_output out


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def png(seed: int, size: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def store_model(http, name: str) -> bentoml.Model:
    return bentoml.models.get(f"{name}:{http.get_model_metadata(name)['versions'][0]}")


def reference(model: bentoml.Model, pngs: list[bytes]) -> dict[str, np.ndarray]:
    """ONNX Runtime on the images as /classify preprocesses them."""
    meta = model.info.metadata
    x = np.stack([preprocess_upload(data, meta["preprocessing"]) for data in pngs])
    session = ort.InferenceSession(model.path_of(meta["onnx_file"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {meta["roles"]["image"]: x}), strict=True))


def rest_generate(server, **fields) -> dict:
    response = requests.post(f"{server.http_url}/generate", json={"prompt": PROMPT, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def text_input(prompt: str = PROMPT, cls=grpcclient.InferInput):
    tensor = cls("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    return tensor


def stream_generate(client, parameters: dict, empty_final: bool = False, timeout: float = 120) -> list:
    """Every response of one streamed generation (InferResult), up to the one flagged final."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(TEXT, [text_input()], request_id="g-1", parameters=parameters,
                                  enable_empty_final_response=empty_final)
        responses = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses
    finally:
        client.stop_stream()


def scrape(url: str) -> dict:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def slots(url: str, state: str) -> float:
    return sum(v for (n, labels), v in scrape(url).items()
               if n == "nnserve_generation_slots" and ("state", state) in labels and ("model", "char_lstm") in labels)


def wait_for_free_slots(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (slots(url, "active"), slots(url, "waiting")) != (0, 0):
        assert time.monotonic() < deadline, f"slots still held: {slots(url, 'active')} active, " \
                                            f"{slots(url, 'waiting')} waiting"
        time.sleep(0.2)


# --- metadata ---------------------------------------------------------------------------------------------

def test_server_metadata_lists_the_extensions(http, grpc_client):
    for extensions in (http.get_server_metadata()["extensions"], grpc_client.get_server_metadata().extensions):
        assert {"binary_tensor_data", "classification", "generate"} <= set(extensions)


def test_front_ends_are_models_of_their_own(http, grpc_client):
    """A kind's BYTES front end is a model with one input (and its config lists the same tensors); the model
    itself lists its network's tensors only (tests/test_kserve.py)."""
    image = http.get_model_metadata("lenet5.image")
    assert image["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert image["outputs"] == http.get_model_metadata("lenet5")["outputs"]  # the network's
    assert image["platform"] == "ensemble" and image["parameters"]["model"] == "lenet5"
    assert image["parameters"]["classification"] == ["logits"]
    text = http.get_model_metadata(TEXT)
    assert text["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    assert text["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]  # [n]: one per sample
    assert set(text["parameters"]["sampling"]) == {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "n"}
    vocabulary = http.get_model_metadata("char_lstm")["parameters"]["vocabulary"]  # token id i = tokens[i]
    logits = next(o for o in http.get_model_metadata("char_lstm")["outputs"] if o["name"] == "logits")
    assert vocabulary["type"] == "characters" and len(vocabulary["tokens"]) == vocabulary["size"] == \
        logits["shape"][-1]
    grpc_meta = grpc_client.get_model_metadata(TEXT, as_json=True)
    assert grpc_meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": ["1"]}]
    config = grpc_client.get_model_config(TEXT, as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True and config.get("max_batch_size", 0) == 0
    assert [(t["name"], t["data_type"]) for t in config["input"]] == [("text_input", "TYPE_STRING")]
    assert grpc_client.is_model_ready(TEXT) and http.is_model_ready("lenet5.image")
    for missing in ("char_lstm.image", "lenet5.text"):  # a kind's one front end, not another's
        with pytest.raises(InferenceServerException, match="front end is") as e:
            http.get_model_metadata(missing)
        assert e.value.status() == "404"
        assert not grpc_client.is_model_ready(missing)


def test_old_clients_sending_bytes_to_the_model_are_told_the_front_end(http, grpc_client):
    """What clients sent before front ends had names: a 400 naming the model to use."""
    for module, client, status in ((httpclient, http, "400"), (grpcclient, grpc_client, "StatusCode.INVALID_ARGUMENT")):
        image = module.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([png(1)], dtype=object))
        with pytest.raises(InferenceServerException, match="'image' goes to model 'lenet5.image'") as e:
            client.infer("lenet5", [image])
        assert e.value.status() == status
        with pytest.raises(InferenceServerException, match="'text_input' goes to model 'char_lstm.text'") as e:
            client.infer("char_lstm", [text_input(cls=module.InferInput)])
        assert e.value.status() == status
    results: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        grpc_client.async_stream_infer("char_lstm", [text_input()])
        _, error = results.get(timeout=60)
    finally:
        grpc_client.stop_stream()
    assert "goes to model 'char_lstm.text'" in error.message()


# --- streamed generation over gRPC ------------------------------------------------------------------------

@pytest.mark.parametrize("empty_final", [False, True], ids=["flag-on-last-chunk", "empty-final-response"])
def test_grpc_stream_generation_matches_rest_generate(server, grpc_client, empty_final):
    options = {"max_tokens": 120, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 11}
    responses = stream_generate(grpc_client, options, empty_final)
    want = rest_generate(server, max_new_chars=120, temperature=0.8, top_k=20, top_p=0.9, seed=11)["text"]
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert finals == [False] * (len(finals) - 1) + [True]
    assert all(r.get_response().id == "g-1" for r in responses)
    if empty_final:  # Triton's empty final response: the flag and no outputs
        assert not responses[-1].get_response().outputs
        responses = responses[:-1]
    chunks = [r.as_numpy("text_output") for r in responses]
    assert all(c.shape == (1,) and c.dtype == object for c in chunks)
    assert "".join(c[0].decode() for c in chunks) == want and len(want) == 120


def test_grpc_stream_stop_string_ends_the_text(server, grpc_client):
    full = rest_generate(server, max_new_chars=80, seed=3)["text"]
    stop = full[30:32]
    responses = stream_generate(grpc_client, {"max_tokens": 80, "seed": 3, "stop": stop})
    text = "".join(r.as_numpy("text_output")[0].decode() for r in responses if r.get_response().outputs)
    assert text == full[:full.index(stop)]


def test_grpc_stream_bad_requests_answer_in_the_stream(grpc_client):
    cases = [({"max_tokens": 5, "beam_width": 4}, "beam_width"), ({"top_p": 2.0}, "top_p"),
             ({"max_tokens": 0}, "max_tokens"), ({"temperature": "hot"}, "temperature")]
    for parameters, named in cases:
        with pytest.raises(InferenceServerException, match=named):
            stream_generate(grpc_client, parameters)
    results: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        grpc_client.async_stream_infer(TEXT, [text_input("e" * 2001)])
        _, error = results.get(timeout=60)
    finally:
        grpc_client.stop_stream()
    assert "text_input has 2001 characters; the limit is 2000" in error.message()


def test_grpc_stream_cancelled_mid_generation_frees_the_slot(server, grpc_client):
    results: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: results.put((result, error)))
    grpc_client.async_stream_infer(TEXT, [text_input()], parameters={"max_tokens": 2000, "seed": 1})
    result, error = results.get(timeout=60)
    assert error is None and not result.get_response().parameters["triton_final_response"].bool_param
    grpc_client.stop_stream(cancel_requests=True)  # mid-generation: 2000 characters take far longer
    wait_for_free_slots(server.http_url)


def test_many_streams_opened_and_dropped_give_their_slots_back(server):
    """200 streams each start a 2000-character generation, read one chunk and hang up (raw gRPC stub)."""
    request = pb.ModelInferRequest(model_name=TEXT)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(PROMPT)) + PROMPT.encode())  # Triton's BYTES layout
    request.parameters["max_tokens"].int64_param = 2000
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(200):
            call = stub.ModelStreamInfer(iter([request]), timeout=60)
            first = next(call)
            assert not first.error_message and first.infer_response.parameters["triton_final_response"].bool_param \
                is False
            call.cancel()
    wait_for_free_slots(server.http_url)
    assert rest_generate(server, max_new_chars=5, seed=1)["finish_reason"] == "length"  # still serving


# --- the generate extension over REST ----------------------------------------------------------------------

def test_http_generate_extension(server):
    want = rest_generate(server, max_new_chars=50, seed=5, temperature=0.7)
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 50, "seed": 5, "temperature": 0.7}, "id": "x"}
    response = requests.post(f"{server.http_url}/v2/models/{TEXT}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["model_name"] == TEXT and reply["model_version"] and reply["id"] == "x"
    assert reply["text_output"] == want["text"] and reply["finish_reason"] == "length"
    # An LLM-client-style body: options at the top level (Triton maps them to inputs), versioned route, on
    # the model's own name (as before front ends had names: still served, docs/kserve.md).
    version = reply["model_version"]
    response = requests.post(f"{server.http_url}/v2/models/char_lstm/versions/{version}/generate",
                             json={"text_input": PROMPT, "max_tokens": 50, "seed": 5, "temperature": 0.7},
                             timeout=120)
    assert response.status_code == 200 and response.json()["text_output"] == want["text"]


def test_http_generate_stream_is_sse(server):
    want = rest_generate(server, max_new_chars=100, seed=8)["text"]
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 100, "seed": 8}}
    with requests.post(f"{server.http_url}/v2/models/{TEXT}/generate_stream", json=body, stream=True,
                       timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines(decode_unicode=True)
                  if line]
    assert "".join(e["text_output"] for e in events) == want
    assert all(e["model_name"] == TEXT for e in events)
    assert events[-1]["finish_reason"] == "length" and all("finish_reason" not in e for e in events[:-1])


def test_stop_and_top_p_in_rest_generate(server):
    full = rest_generate(server, max_new_chars=80, seed=3)
    stop = full["text"][40:43]
    stopped = rest_generate(server, max_new_chars=80, seed=3, stop=[stop, "\u2603"])
    assert stopped["text"] == full["text"][:full["text"].index(stop)] and stopped["finish_reason"] == "stop"
    # A nucleus this small is the likeliest character alone: greedy, as top_k=1.
    assert rest_generate(server, max_new_chars=40, seed=1, top_p=1e-9)["text"] == \
        rest_generate(server, max_new_chars=40, seed=2, top_k=1)["text"]


@pytest.mark.parametrize(("path", "body", "status", "named"), [
    ("char_lstm/generate", {"text_input": PROMPT, "parameters": {"beam_width": 2}}, 400, "beam_width"),
    ("char_lstm/generate", {"text_input": PROMPT, "parameters": {"top_p": 0}}, 400, "top_p"),
    ("char_lstm/generate", {"text_input": PROMPT, "parameters": {"stop": [""]}}, 400, "stop"),
    ("char_lstm/generate", {"text_input": "e" * 2001}, 400, "text_input has 2001 characters"),
    ("char_lstm/generate", {"prompt": PROMPT}, 400, "text_input"),
    ("char_lstm/generate_stream", {"text_input": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
    ("lenet5/generate", {"text_input": PROMPT}, 400, "image_classifier"),
    ("lenet5.image/generate", {"text_input": PROMPT}, 400, "image_classifier"),
    ("char_lstm.text/generate", {"text_input": PROMPT, "parameters": {"top_k": 0}}, 400, "top_k"),
    ("nope/generate_stream", {"text_input": PROMPT}, 404, "unknown model 'nope'"),
])
def test_http_generate_errors_are_triton_shaped(server, path, body, status, named):
    response = requests.post(f"{server.http_url}/v2/models/{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert named in response.json()["error"]


# --- n samples of one prompt ---------------------------------------------------------------------------------

def rest_choices(server, n: int, **fields) -> list[dict]:
    return rest_generate(server, n=n, **fields)["choices"]


def test_n_samples_in_the_generate_extension(server):
    want = rest_choices(server, 3, max_new_chars=50, seed=12)
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 50, "seed": 12, "n": 3}}
    response = requests.post(f"{server.http_url}/v2/models/char_lstm/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    reply = response.json()  # a multi-element output is a JSON array, as Triton answers it
    assert reply["text_output"] == [c["text"] for c in want] and reply["finish_reason"] == ["length"] * 3
    with requests.post(f"{server.http_url}/v2/models/char_lstm/generate_stream", json=body, stream=True,
                       timeout=120) as response:
        assert response.status_code == 200, response.text
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines(decode_unicode=True)
                  if line]
    texts, reasons = ["", "", ""], [None, None, None]
    for event in events:
        assert reasons[event["sequence_index"]] is None, "an event after its sample's last one"
        texts[event["sequence_index"]] += event["text_output"]
        reasons[event["sequence_index"]] = event.get("finish_reason")
    assert texts == [c["text"] for c in want] and reasons == ["length"] * 3


@pytest.mark.parametrize("empty_final", [False, True], ids=["flag-on-last-chunk", "empty-final-response"])
def test_n_samples_over_grpc_stream_carry_their_sequence_index(server, grpc_client, empty_final):
    want = rest_choices(server, 4, max_new_chars=80, seed=31, top_k=10)
    responses = stream_generate(grpc_client, {"max_tokens": 80, "seed": 31, "top_k": 10, "n": 4}, empty_final)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert finals == [False] * (len(finals) - 1) + [True]  # the request's last response, not each sample's
    texts, reasons = [""] * 4, [None] * 4
    for result in responses:
        parameters = result.get_response().parameters
        if not result.get_response().outputs:  # Triton's empty final response
            assert empty_final and result is responses[-1]
            continue
        index = parameters["sequence_index"].int64_param
        assert reasons[index] is None, "a response after its sample's last one"
        texts[index] += result.as_numpy("text_output")[0].decode()
        if "finish_reason" in parameters:
            reasons[index] = parameters["finish_reason"].string_param
    assert texts == [c["text"] for c in want] and reasons == ["length"] * 4


def test_n_samples_through_infer_are_text_output_n(server, http, grpc_client):
    want = [c["text"].encode() for c in rest_choices(server, 2, max_new_chars=40, seed=3)]
    parameters = {"max_tokens": 40, "seed": 3, "n": 2}
    for client, cls in ((http, httpclient.InferInput), (grpc_client, grpcclient.InferInput)):
        result = client.infer(TEXT, [text_input(cls=cls)], parameters=parameters)
        assert result.as_numpy("text_output").tolist() == want


def test_a_10000_character_grpc_stream_arrives_whole(server, grpc_client):
    responses = stream_generate(grpc_client, {"max_tokens": 10_000, "seed": 6})
    text = "".join(r.as_numpy("text_output")[0].decode() for r in responses)
    assert len(text) == 10_000
    assert responses[-1].get_response().parameters["finish_reason"].string_param == "length"
    with requests.post(f"{server.http_url}/generate", json={"prompt": PROMPT, "max_new_chars": 10_000, "seed": 6,
                                                            "stream": True}, stream=True, timeout=120) as response:
        assert response.content.decode() == text
    with pytest.raises(InferenceServerException, match=r"max_tokens must be an integer in \[1, 2000\]"):
        grpc_client.infer(TEXT, [text_input()], parameters={"max_tokens": 10_000})  # not streamed


@pytest.mark.parametrize(("parameters", "named"), [
    ({"n": 0}, "n must be an integer in [1, 16], got 0"),
    ({"n": "3"}, "n must be an integer in [1, 16], got '3'"),
    ({"n": 1.5}, "n must be an integer in [1, 16], got 1.5"),
    ({"n": 17}, "n must be an integer in [1, 16], got 17"),
    ({"n": 4, "max_tokens": 600}, "n x max_tokens = 4 x 600 = 2400 characters; the limit is 2000"),
])
def test_bad_n_is_named_everywhere(server, grpc_client, parameters, named):
    body = {"text_input": PROMPT, "parameters": parameters}
    response = requests.post(f"{server.http_url}/v2/models/char_lstm/generate", json=body, timeout=60)
    assert response.status_code == 400 and named in response.json()["error"], response.text
    if "max_tokens" not in parameters:  # a stream allows 10,000 characters in all
        response = requests.post(f"{server.http_url}/v2/models/char_lstm/generate_stream", json=body, timeout=60)
        assert response.status_code == 400 and named in response.json()["error"], response.text
        with pytest.raises(InferenceServerException) as error:
            stream_generate(grpc_client, parameters)
        assert named in error.value.message()


# --- the classification extension ----------------------------------------------------------------------------

def expected_classes(scores: np.ndarray, labels: list[str], k: int) -> list[list[str]]:
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[f"{float(row[i]):f}:{i}:{labels[i]}" for i in idx] for row, idx in zip(scores, best, strict=True)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_classification(http, binary):
    model = store_model(http, "lenet5")
    pngs = [png(1), png(2)]
    logits = reference(model, pngs)["logits"]
    x = np.stack([preprocess_upload(p, model.info.metadata["preprocessing"]) for p in pngs])
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = http.infer("lenet5", [tensor],
                        outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)])
    got = result.as_numpy("logits")
    assert got.shape == (2, 3)
    assert [[v.decode() if isinstance(v, bytes) else v for v in row] for row in got] == \
        expected_classes(logits, model.info.metadata["labels"], 3)


def test_grpc_classification_of_image_bytes(http, grpc_client):
    model = store_model(http, "lenet5")
    pngs = [png(3), png(4), png(5)]
    logits = reference(model, pngs)["logits"]
    tensor = grpcclient.InferInput("image", [3, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[p] for p in pngs], dtype=object))
    result = grpc_client.infer("lenet5.image", [tensor],
                               outputs=[grpcclient.InferRequestedOutput("logits", class_count=10)])
    assert [[v.decode() for v in row] for row in result.as_numpy("logits")] == \
        expected_classes(logits, model.info.metadata["labels"], 10)


def test_classification_over_the_classes_is_an_error(http, grpc_client):
    x = np.zeros((1, 1, 32, 32), np.float32)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="11 classes but the output has 10") as e:
        http.infer("lenet5", [tensor], outputs=[httpclient.InferRequestedOutput("logits", class_count=11)])
    assert e.value.status() == "400"
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="11 classes but the output has 10") as e:
        grpc_client.infer("lenet5", [tensor], outputs=[grpcclient.InferRequestedOutput("logits", class_count=11)])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


# --- encoded images as BYTES inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet5", "vgg_fc7"])
def test_image_bytes_match_the_float_input(http, grpc_client, name):
    model = store_model(http, name)
    pngs = [png(6), png(7, size=40)]
    want = reference(model, pngs)
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=object))
    result = http.infer(f"{name}.image", [tensor])
    for out, array in want.items():  # feature extractors answer their embedding too (vgg_fc7: fc7)
        np.testing.assert_allclose(result.as_numpy(out), array, rtol=1e-4, atol=1e-5, err_msg=out)
    tensor = grpcclient.InferInput("image", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[p] for p in pngs], dtype=object))
    result = grpc_client.infer(f"{name}.image", [tensor])
    for out, array in want.items():
        np.testing.assert_allclose(result.as_numpy(out), array, rtol=1e-4, atol=1e-5, err_msg=out)


def test_image_bytes_that_are_not_an_image_name_the_row(http, grpc_client):
    rows = np.array([png(1), b"hello, world"], dtype=object)
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(rows)
    with pytest.raises(InferenceServerException, match="input 'image' row 1: .*not an image") as e:
        http.infer("lenet5.image", [tensor])
    assert e.value.status() == "400"
    tensor = grpcclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(rows)
    with pytest.raises(InferenceServerException, match="input 'image' row 1") as e:
        grpc_client.infer("lenet5.image", [tensor])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_the_image_front_end_takes_image_bytes_only(http, grpc_client):
    x = np.zeros((1, 1, 32, 32), np.float32)
    for module, client, status in ((httpclient, http, "400"), (grpcclient, grpc_client, "StatusCode.INVALID_ARGUMENT")):
        image = module.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([png(1)], dtype=object))
        floats = module.InferInput("input", list(x.shape), "FP32")
        floats.set_data_from_numpy(x)
        for inputs in ([image, floats], [floats]):
            with pytest.raises(InferenceServerException, match="the tensor 'input' goes to model 'lenet5'") as e:
                client.infer("lenet5.image", inputs)
            assert e.value.status() == status
