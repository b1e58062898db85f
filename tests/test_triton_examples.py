"""What Triton's canonical example clients check, in our own code, against the real server: ``image_client.py``
and ``grpc_image_client.py`` from triton-inference-server/client (src/python/examples), which nnserve serves
unmodified (docs/kserve.md, "Triton's example clients", shows the command lines and their output).

The examples read one model's metadata and config and refuse anything but an image classifier they can
drive blind: one input and one output in the metadata, one input in the config, an FP32 output that is a
vector past the batch, an input of 3 dimensions past the batch whose config ``format`` is FORMAT_NCHW or
FORMAT_NHWC. They lay the pixels out as that format says, send batches (``-b 4``) and ask the
classification extension for the top classes (``-c 3``), synchronously, asynchronously and (gRPC) over
ModelStreamInfer, and print ``score (index) = label`` from the BYTES ``"score:index:label"`` strings.

Served here: lenet5 (NCHW, from this repository), a user's classifier exported from an ONNX file made
elsewhere (docs/your-model.md (b): its own tensor names, 3 labels) and a channels-last (NHWC) RGB one, plus
vgg_fc7 and char_lstm so that every kind's front end is listed. Beyond the examples: every model the
server publishes (its repository index) has metadata and config that list the same tensors, and a request
that sends every listed input succeeds.
"""

from __future__ import annotations

import io
import os
import queue
import struct

import bentoml
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "triton-examples-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CLASSIFIERS = ("lenet5", "elsewhere_cnn", "keras_like")
BATCH, CLASSES = 4, 3  # the examples' -b 4 -c 3
KSERVE_TO_CONFIG = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}


@pytest.fixture(scope="module")
def server(own_server, tiny_store, session_dir):
    """A real server with the classifiers above, vgg_fc7 and char_lstm; the management API on (the index)."""
    from export.pipeline import Options, export_artifact
    from tests.user_models import make

    root = session_dir / "triton-examples"
    opts = Options(bench_runs=3, report_dir=root / "exported")
    tags = {name: tiny_store[name] for name in ("lenet5", "vgg_fc7", "char_lstm")}
    tags["elsewhere_cnn"] = export_artifact(make.elsewhere_cnn(root / "elsewhere_cnn")[0], opts).tags["fp32"]
    tags["keras_like"] = export_artifact(make.keras_like(root / "keras_like"), opts).tags["fp32"]
    config = root / "models.yaml"
    config.write_text(yaml.safe_dump({"models": {name: {"tag": tag} for name, tag in tags.items()}}))
    token = root / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o600)
    env = {"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_MANAGEMENT_TOKEN_FILE": str(token),
           "NNSERVE_WORKERS": "1", "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    with own_server("triton-examples", env) as live:
        yield live


@pytest.fixture(scope="module")
def clients(server):
    http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), concurrency=4)
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    yield {"http": http, "grpc": grpc_client}
    http.close()
    grpc_client.close()


def digit_images(count: int = 3) -> list[Image.Image]:
    from harness.data import held_out_digits

    return [Image.fromarray(digit) for digit in held_out_digits()[0][:count]]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def metadata_and_config(clients, protocol: str, name: str) -> tuple[dict, dict]:
    """Both as JSON-like dicts whatever the protocol (gRPC's int64 fields come back as strings)."""
    if protocol == "http":
        return clients["http"].get_model_metadata(name), clients["http"].get_model_config(name)
    meta = clients["grpc"].get_model_metadata(name, as_json=True)
    config = clients["grpc"].get_model_config(name, as_json=True)["config"]
    for tensor in [*meta.get("inputs", []), *meta.get("outputs", [])]:
        tensor["shape"] = [int(d) for d in tensor["shape"]]
    for tensor in [*config.get("input", []), *config.get("output", [])]:
        tensor["dims"] = [int(d) for d in tensor["dims"]]
    config["max_batch_size"] = int(config.get("max_batch_size", 0))  # proto3 JSON leaves zeros out
    return meta, config


def parse_model(meta: dict, config: dict) -> dict:
    """image_client.py's parse_model, in our words: what it requires of a model, and what it reads off it."""
    assert len(meta["inputs"]) == 1 and len(meta["outputs"]) == 1 and len(config["input"]) == 1
    (tensor,), (output,) = meta["inputs"], meta["outputs"]
    assert output["datatype"] == "FP32"
    batched = config["max_batch_size"] > 0
    assert sum(d > 1 for d in output["shape"][1 if batched else 0:]) <= 1, "the output is not a vector"
    assert len(tensor["shape"]) == 3 + batched
    layout = config["input"][0]["format"]
    assert layout in ("FORMAT_NCHW", "FORMAT_NHWC")
    chw = tensor["shape"][1 if batched else 0:]
    c, h, w = chw if layout == "FORMAT_NCHW" else (chw[2], chw[0], chw[1])
    return {"max_batch_size": config["max_batch_size"], "input": tensor["name"], "output": output["name"],
            "c": c, "h": h, "w": w, "format": layout, "datatype": tensor["datatype"]}


def preprocess(image: Image.Image, model: dict) -> np.ndarray:
    """image_client.py's preprocess with its default scaling (NONE): raw pixel values, laid out as the config's
    format says."""
    pixels = np.array(image.convert("L" if model["c"] == 1 else "RGB").resize((model["w"], model["h"]),
                                                                              Image.BILINEAR))
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = pixels.astype(np.float32)
    return np.transpose(pixels, (2, 0, 1)) if model["format"] == "FORMAT_NCHW" else pixels


def store_model(clients, name: str) -> bentoml.Model:
    return bentoml.models.get(f"{name}:{clients['http'].get_model_metadata(name)['versions'][0]}")


def reference_scores(clients, name: str, x: np.ndarray) -> np.ndarray:
    model = store_model(clients, name)
    session = ort.InferenceSession(model.path_of(model.info.metadata["onnx_file"]),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check_classes(strings: np.ndarray, scores: np.ndarray, labels: list[str]) -> None:
    """BYTES [batch, CLASSES] "score:index:label" (what the examples split and print): the top classes of the
    reference scores, highest first, labelled from the store metadata."""
    assert strings.shape == (len(scores), CLASSES)
    for row, want in zip(strings, scores, strict=True):
        parts = [(v.decode() if isinstance(v, bytes) else v).split(":") for v in row]
        assert [int(p[1]) for p in parts] == list(np.argsort(-want, kind="stable")[:CLASSES])
        assert [p[2] for p in parts] == [labels[int(p[1])] for p in parts]
        np.testing.assert_allclose([float(p[0]) for p in parts], want[[int(p[1]) for p in parts]],
                                   rtol=1e-4, atol=1e-4)


# --- image_client.py: tritonclient over HTTP and gRPC, sync / async / streaming ----------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_the_model_is_what_image_client_requires(clients, protocol, name):
    from models.preprocess import input_hw

    meta, config = metadata_and_config(clients, protocol, name)
    model = parse_model(meta, config)
    card = store_model(clients, name).info.metadata
    spec = card["preprocessing"]
    assert model["format"] == f"FORMAT_{spec.get('layout', 'NCHW')}"  # from the card's preprocessing
    assert (model["c"], model["h"], model["w"]) == (spec["channels"], *input_hw(spec))
    assert model["max_batch_size"] >= BATCH
    output = config["output"][0]
    assert output["label_filename"] and config["parameters"]["labels"]["string_value"]  # where labels are


@pytest.mark.parametrize("mode", ["http-sync", "http-async", "grpc-sync", "grpc-async", "grpc-streaming"])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_image_client_runs(clients, name, mode):
    """image_client.py -m NAME -b 4 -c 3 [-i grpc] [-a | --streaming] on a folder of digits: one request of 4
    images (3 files, the first again), answered with the top 3 classes of each."""
    protocol = mode.split("-")[0]
    model = parse_model(*metadata_and_config(clients, protocol, name))
    images = digit_images()
    batch = np.stack([preprocess(images[i % len(images)], model) for i in range(BATCH)])
    module = httpclient if protocol == "http" else grpcclient
    inputs = [module.InferInput(model["input"], list(batch.shape), model["datatype"])]
    inputs[0].set_data_from_numpy(batch)
    outputs = [module.InferRequestedOutput(model["output"], class_count=CLASSES)]
    client = clients[protocol]
    if mode.endswith("sync") and not mode.endswith("async"):
        result = client.infer(name, inputs, request_id="1", outputs=outputs)
    elif mode == "http-async":
        result = client.async_infer(name, inputs, request_id="1", outputs=outputs).get_result()
    else:
        done: queue.Queue = queue.Queue()
        if mode == "grpc-async":
            client.async_infer(name, inputs, lambda result, error: done.put((result, error)), request_id="1",
                               outputs=outputs)
        else:
            client.start_stream(lambda result, error: done.put((result, error)))
            try:
                client.async_stream_infer(name, inputs, request_id="1", outputs=outputs)
            finally:
                client.stop_stream()  # waits for the stream's responses
        result, error = done.get(timeout=60)
        assert error is None, error
    response = result.get_response()
    assert (response["id"] if protocol == "http" else response.id) == "1"
    labels = store_model(clients, name).info.metadata["labels"]
    check_classes(result.as_numpy(model["output"]), reference_scores(clients, name, batch), labels)


# --- grpc_image_client.py: the raw protobuf stub -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "async", "streaming"])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_grpc_image_client_runs(server, clients, name, mode):
    """grpc_image_client.py: ModelInfer (or .future, or ModelStreamInfer) with raw_input_contents and the
    ``classification`` output parameter; the answer is one output with one raw_output_contents entry."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name)).config
        assert len(meta.inputs) == len(meta.outputs) == len(config.input) == 1
        assert config.input[0].format in (1, 2)  # model_config_pb2.ModelInput.FORMAT_NHWC, FORMAT_NCHW
        model = parse_model(*metadata_and_config(clients, "grpc", name))
        images = digit_images()
        batch = np.stack([preprocess(images[i % len(images)], model) for i in range(BATCH)])
        request = pb.ModelInferRequest(model_name=name)
        output = request.outputs.add(name=model["output"])
        output.parameters["classification"].int64_param = CLASSES
        request.inputs.add(name=model["input"], datatype=model["datatype"], shape=list(batch.shape))
        request.raw_input_contents.append(batch.tobytes())
        if mode == "sync":
            response = stub.ModelInfer(request, timeout=60)
        elif mode == "async":
            response = stub.ModelInfer.future(request, timeout=60).result()
        else:
            (streamed,) = list(stub.ModelStreamInfer(iter([request]), timeout=60))
            assert streamed.error_message == ""
            response = streamed.infer_response
    assert len(response.outputs) == len(response.raw_output_contents) == 1
    raw, strings, offset = response.raw_output_contents[0], [], 0
    while offset < len(raw):  # the example's deserialize_bytes_tensor
        (length,) = struct.unpack_from("<I", raw, offset)
        strings.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    contents = np.array(strings, dtype=object).reshape(list(response.outputs[0].shape))
    labels = store_model(clients, name).info.metadata["labels"]
    check_classes(contents, reference_scores(clients, name, batch), labels)


# --- every published model: metadata == config, and sending every listed input works ---------------------------------

def published(server) -> list[str]:
    answer = requests.post(f"{server.http_url}/v2/repository/index", json={"ready": True}, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    return [entry["name"] for entry in answer.json()]


def test_the_index_lists_each_model_and_its_front_end(server):
    assert sorted(published(server)) == sorted(
        ["lenet5", "lenet5.image", "vgg_fc7", "vgg_fc7.image", "char_lstm", "char_lstm.text",
         "elsewhere_cnn", "elsewhere_cnn.image", "keras_like", "keras_like.image"])


def example_value(tensor: dict, images: list[Image.Image]) -> np.ndarray:
    """Data for a listed input, every -1 taken as 1: a PNG for an image front end, a prompt for a text one,
    token 0 for token ids, zeros for the rest."""
    shape = [1 if d < 0 else d for d in tensor["shape"]]
    if tensor["datatype"] == "BYTES":
        value = png(images[0]) if tensor["name"] == "image" else b"The "
        return np.full(shape, value, dtype=object)
    return np.zeros(shape, dtype=np.float32 if tensor["datatype"] == "FP32" else np.int64)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_published_model_takes_what_its_metadata_lists(server, clients, protocol):
    images = digit_images(1)
    module = httpclient if protocol == "http" else grpcclient
    for name in published(server):
        meta, config = metadata_and_config(clients, protocol, name)
        batched = config["max_batch_size"] > 0
        for key, config_key in (("inputs", "input"), ("outputs", "output")):
            listed = [(t["name"], KSERVE_TO_CONFIG[t["datatype"]], t["shape"][1:] if batched else t["shape"])
                      for t in meta[key]]
            assert listed == [(t["name"], t["data_type"], t["dims"]) for t in config[config_key]], (name, key)
            if batched:
                assert all(t["shape"][0] == -1 for t in meta[key]), (name, key)
        inputs = []
        for tensor in meta["inputs"]:
            value = example_value(tensor, images)
            inputs.append(module.InferInput(tensor["name"], list(value.shape), tensor["datatype"]))
            inputs[-1].set_data_from_numpy(value)
        parameters = {"max_tokens": 5} if name.endswith(".text") else None  # the default of 200 would do too
        result = clients[protocol].infer(name, inputs, parameters=parameters)
        response = result.get_response()
        answered = response["outputs"] if protocol == "http" else [
            {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in response.outputs]
        assert [(o["name"], o["datatype"]) for o in answered] == [(t["name"], t["datatype"]) for t in meta["outputs"]]
        for got, listed in zip(answered, meta["outputs"], strict=True):
            assert len(got["shape"]) == len(listed["shape"]) and all(
                want in (-1, size) for size, want in zip(got["shape"], listed["shape"], strict=True)), (name, got)


def test_statistics_count_a_front_end_apart(server, clients):
    image = httpclient.InferInput("image", [2, 1], "BYTES")
    image.set_data_from_numpy(np.array([[png(i)] for i in digit_images(2)], dtype=object))
    before = clients["http"].get_inference_statistics("lenet5.image")["model_stats"]
    clients["http"].infer("lenet5.image", [image])
    (stats,) = clients["http"].get_inference_statistics("lenet5.image")["model_stats"]
    assert stats["name"] == "lenet5.image"
    success = stats["inference_stats"]["success"]["count"]
    assert success == (before[0]["inference_stats"]["success"]["count"] if before else 0) + 1
    assert stats["inference_stats"]["compute_input"]["count"] >= 1  # the image decode
    names = {s["name"] for s in clients["http"].get_inference_statistics()["model_stats"]}
    assert set(published(server)) == names


def test_front_end_names_are_not_models_to_load(server):
    answer = requests.post(f"{server.http_url}/v2/repository/models/lenet5.image/load", json={}, headers=AUTH,
                           timeout=30)
    assert answer.status_code == 400 and "front end of model 'lenet5'" in answer.json()["error"]


def test_a_served_name_may_not_end_like_a_front_end():
    from service.settings import SettingsError, read_models_document

    with pytest.raises(SettingsError, match="names ending in '.image', '.text'"):
        read_models_document({"models": {"digits.image": {"tag": "lenet5:latest"}}}, "models.yaml")
    assert read_models_document({"models": {"digits.images": {}}}, "models.yaml")  # only the exact suffixes
