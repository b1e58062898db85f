"""The REST side of the real server (`bentoml serve service.service:NNServe`, started once per session by
the ``live_server`` fixture) with the tiny exported models: /classify, /features, /generate (plain and
streamed), /models, health, OpenAPI, adaptive batching, metrics, and the client errors.

Numbers are checked against a direct ONNX Runtime run of the very store entry the server names in its
response, fed with the training preprocessing: so a wrong preprocessing, output or label fails here.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
import time
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.preprocess import standardize, to_unit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def url(live_server) -> str:
    return live_server.http_url


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from models.data import load_mnist

    split = load_mnist(seed=0, limit=300)
    return split.x_test[:8], split.y_test[:8]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def store_entry(tag: str) -> bentoml.Model:
    return bentoml.models.get(tag)


def reference(tag: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = store_entry(tag)
    session = ort.InferenceSession(model.path_of(model.info.metadata["onnx_file"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def training_input(tag: str, digit: np.ndarray) -> np.ndarray:
    spec = store_entry(tag).info.metadata["preprocessing"]
    return standardize(to_unit(digit[None], spec), spec)


def classify(url: str, data: bytes, **fields) -> requests.Response:
    return requests.post(f"{url}/classify", files={"image": ("digit.png", data, "image/png")},
                         data={k: str(v) for k, v in fields.items()}, timeout=60)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted label items): value}."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, items), v in samples.items() if n == name and labels.items() <= dict(items).items())


# -- health, discovery ---------------------------------------------------------------------------


def test_health_endpoints(url, tiny_store):
    assert requests.get(f"{url}/livez", timeout=10).status_code == 200
    ready = requests.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True and "reason" not in ready.json()
    assert {name: m["state"] for name, m in ready.json()["models"].items()} == dict.fromkeys(tiny_store, "ready")
    # /readyz answered from one worker; the gauge is the minimum over every live worker, and the session's
    # server starts with /readyz from one of them: the others may still be loading for a few seconds.
    deadline = time.monotonic() + 60
    while 'nnserve_model_ready{model="lenet5"} 1.0' not in (text := requests.get(f"{url}/metrics", timeout=10).text):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.5)


def test_models_lists_every_model_with_its_provider(url, tiny_store):
    models = {m["name"]: m for m in requests.get(f"{url}/models", timeout=10).json()["models"]}
    assert set(models) == {"lenet5", "vgg_fc7", "char_lstm", "char_gru"}
    for name, model in models.items():
        assert f"{name}:{model['version']}" == tiny_store[name]
        assert model["provider"] in ort.get_available_providers()
        assert model["providers"][-1] == "CPUExecutionProvider"
    assert models["lenet5"]["labels"] == [str(i) for i in range(10)]
    assert models["char_gru"]["vocab_size"] == len(store_entry(tiny_store["char_gru"]).info.metadata["vocab"])
    # The batcher's configuration, as the settings make it (defaults; live_server sets the queue timeout).
    assert models["lenet5"]["batching"] == {"max_batch_size": 32, "max_queue_delay_ms": 0.0,
                                            "preferred_batch_sizes": [], "max_queue_size": 128,
                                            "queue_timeout_ms": 60000.0}


def test_openapi_documents_the_endpoints(url):
    spec = requests.get(f"{url}/docs.json", timeout=10).json()
    for path in ("/classify", "/features", "/generate"):
        assert "post" in spec["paths"][path], path
    generate = str(spec["paths"]["/generate"])
    assert all(field in generate for field in ("max_new_chars", "temperature", "top_p", "stop", "finish_reason"))


# -- /classify, /features ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["lenet5", "vgg_fc7"])
def test_classify_equals_training_preprocessing_plus_model(url, digits, model):
    images, _ = digits
    for digit in images[:3]:
        response = classify(url, png(digit), model=model, top_k=10)
        assert response.status_code == 200, response.text
        body = response.json()
        name, version = body["model"].split(":")
        assert name == model
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
        logits = reference(body["model"], {"input": training_input(body["model"], digit)})["logits"][0]
        want = np.exp(logits - logits.max())
        want /= want.sum()
        labels = store_entry(body["model"]).info.metadata["labels"]
        got = {p["label"]: p["probability"] for p in body["predictions"]}
        for i, label in enumerate(labels):
            assert got[label] == pytest.approx(float(want[i]), abs=1e-5)
        assert set(body["timings_ms"]) >= {"preprocess", "batch_wait", "inference", "total"}
        assert body["batch_size"] >= 1


def test_classify_defaults_to_lenet5_top5(url, digits):
    body = classify(url, png(digits[0][0])).json()
    assert body["model"].startswith("lenet5:") and len(body["predictions"]) == 5


def test_classify_top_k_larger_than_the_labels_returns_them_all(url, digits):
    body = classify(url, png(digits[0][0]), top_k=1000).json()
    assert len(body["predictions"]) == 10


def test_features_json_and_npy(url, digits, tiny_store):
    digit = digits[0][1]
    response = requests.post(f"{url}/features", files={"image": ("d.png", png(digit))}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == tiny_store["vgg_fc7"]
    fc7 = reference(body["model"], {"input": training_input(body["model"], digit)})["fc7"][0]
    assert body["dim"] == len(body["features"]) == fc7.size
    np.testing.assert_allclose(body["features"], fc7, rtol=1e-5, atol=1e-6)

    response = requests.post(f"{url}/features", files={"image": ("d.png", png(digit))},
                             data={"format": "npy", "normalize": "true"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npy"
    assert response.headers["x-model"] == tiny_store["vgg_fc7"]
    vector = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert vector.dtype == np.float32 and vector.shape == (fc7.size,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, fc7 / np.linalg.norm(fc7), rtol=1e-5, atol=1e-6)


# -- dynamic batching --------------------------------------------------------------------------------


def test_concurrent_classify_requests_are_merged_into_batches(url, digits):
    """Many concurrent uploads: some must share an ONNX Runtime call (response batch_size and the batch
    size histogram both say > 1). Up to three rounds, as merging depends on arrival timing."""
    data = png(digits[0][2])
    before = scrape(url)
    seen = []
    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
            responses = list(pool.map(lambda _: classify(url, data), range(48)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        seen = [r.json()["batch_size"] for r in responses]
        if max(seen) > 1:
            break
    assert max(seen) > 1, f"no request was batched with another: {seen}"
    after = scrape(url)
    merged = (metric(after, "nnserve_batch_size_count", model="lenet5", batcher="dynamic")
              - metric(after, "nnserve_batch_size_bucket", model="lenet5", batcher="dynamic", le="1.0"))
    merged_before = (metric(before, "nnserve_batch_size_count", model="lenet5", batcher="dynamic")
                     - metric(before, "nnserve_batch_size_bucket", model="lenet5", batcher="dynamic", le="1.0"))
    assert merged > merged_before, "the batch-size histogram recorded no batch larger than 1"


# -- /generate ---------------------------------------------------------------------------------------


def generate(url: str, timeout: float = 120, **body) -> requests.Response:
    return requests.post(f"{url}/generate", json=body, timeout=timeout)


@pytest.mark.parametrize("model", ["char_lstm", "char_gru"])
def test_generate_same_seed_same_text(url, tiny_store, model):
    vocab = store_entry(tiny_store[model]).info.metadata["vocab"]
    prompt = vocab[:5]
    first = generate(url, prompt=prompt, max_new_chars=60, seed=7, temperature=0.8, top_k=10, model=model)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model"] == tiny_store[model] and body["seed"] == 7
    assert len(body["text"]) == 60 and set(body["text"]) <= set(vocab)
    again = generate(url, prompt=prompt, max_new_chars=60, seed=7, temperature=0.8, top_k=10, model=model).json()
    assert again["text"] == body["text"]
    other = generate(url, prompt=prompt, max_new_chars=60, seed=8, temperature=0.8, top_k=10, model=model).json()
    assert other["text"] != body["text"]


def test_generate_without_seed_reports_the_seed_it_drew(url, tiny_store):
    body = generate(url, prompt="T", max_new_chars=30).json()
    assert body["model"] == tiny_store["char_lstm"]  # the default model
    again = generate(url, prompt="T", max_new_chars=30, seed=body["seed"]).json()
    assert again["text"] == body["text"]


def test_streamed_generation_equals_the_plain_response(url):
    plain = generate(url, prompt="The ", max_new_chars=200, seed=3).json()
    with requests.post(f"{url}/generate", json={"prompt": "The ", "max_new_chars": 200, "seed": 3, "stream": True},
                       stream=True, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.headers.get("transfer-encoding") == "chunked" and "content-length" not in response.headers
        assert response.headers["x-seed"] == "3" and response.headers["x-model"] == plain["model"]
        chunks = [chunk for chunk in response.iter_content(chunk_size=None, decode_unicode=True)]
    assert "".join(chunks) == plain["text"]


def test_concurrent_generations_equal_their_solo_results(url):
    """Continuous batching end to end: requests decoded side by side give what each gives alone."""
    jobs = [dict(prompt="The ", max_new_chars=n, seed=s, temperature=t, model=m)
            for n, s, t, m in [(80, 1, 1.0, "char_lstm"), (30, 2, 0.5, "char_lstm"), (120, 3, 1.5, "char_lstm"),
                               (50, 4, 1.0, "char_gru"), (90, 5, 0.7, "char_gru")]]
    solo = [generate(url, **job).json()["text"] for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs) * 2) as pool:
        together = list(pool.map(lambda job: generate(url, **job).json()["text"], jobs * 2))
    assert together == solo * 2


def sse_events(body: str) -> list[tuple[str | None, str]]:
    """(event name, data) per Server-Sent Event of a whole body: data lines joined with newlines (the spec)."""
    events, name, data = [], None, []
    for line in body.split("\n"):
        if not line:
            if data or name:
                events.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        else:
            raise AssertionError(f"not an SSE line: {line!r}")
    assert not data and name is None, "the stream ended inside an event"
    return events


def sse_generate(url: str, **body) -> list[tuple[str | None, str]]:
    with requests.post(f"{url}/generate", json={**body, "stream": True}, headers={"Accept": "text/event-stream"},
                       stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.content.decode())


def test_generate_n_samples_each_is_the_one_sample_text_of_seed_plus_i(url):
    one = generate(url, prompt="The ", max_new_chars=60, seed=5, temperature=1.2).json()
    # n = 1 keeps its shape (text, finish_reason) and adds the same answer as a one-element choices list.
    assert one["choices"] == [{"index": 0, "text": one["text"], "finish_reason": "length"}]
    response = generate(url, prompt="The ", max_new_chars=60, seed=5, temperature=1.2, n=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == 5 and body["n"] == 3 and "text" not in body and "finish_reason" not in body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 3
    solo = [generate(url, prompt="The ", max_new_chars=60, seed=5 + i, temperature=1.2).json()["text"]
            for i in range(3)]
    assert [c["text"] for c in body["choices"]] == solo and solo[0] == one["text"]
    assert len(set(solo)) == 3
    # Without a seed: the one drawn is reported and reproduces every sample.
    drawn = generate(url, prompt="The ", max_new_chars=30, n=2).json()
    again = generate(url, prompt="The ", max_new_chars=30, n=2, seed=drawn["seed"]).json()
    assert again["choices"] == drawn["choices"]


def test_generate_n_samples_streamed_as_server_sent_events(url):
    want = generate(url, prompt="The ", max_new_chars=150, seed=21, n=3).json()["choices"]
    events = sse_generate(url, prompt="The ", max_new_chars=150, seed=21, n=3)
    assert [name for name, _ in events[:-1]] == ["choice"] * (len(events) - 1) and events[-1][0] == "end"
    choices = [json.loads(data) for _, data in events[:-1]]
    texts, reasons = ["", "", ""], [None, None, None]
    for event in choices:
        assert reasons[event["index"]] is None, "an event after its sample's last one"
        texts[event["index"]] += event["text"]
        reasons[event["index"]] = event.get("finish_reason")
    assert [{"index": i, "text": t, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))] == want
    end = json.loads(events[-1][1])
    assert end["seed"] == 21 and end["n"] == 3 and end["chars"] == 450
    assert end["choices"] == [{"index": i, "chars": 150, "finish_reason": "length"} for i in range(3)]
    # Chunked text/plain cannot say which sample a chunk is: refused, naming n.
    response = requests.post(f"{url}/generate", json={"prompt": "The ", "n": 2, "stream": True}, timeout=60)
    assert response.status_code == 400 and "n is 2 with stream: true" in response.json()["error"]


def test_a_10000_character_stream_arrives_whole(url):
    """The longest stream allowed, over real HTTP: every character arrives, as text/plain and as SSE (same
    seed, same text), and the JSON answer keeps its lower limit."""
    with requests.post(f"{url}/generate", json={"prompt": "The ", "max_new_chars": 10_000, "seed": 4,
                                                "stream": True}, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        text = response.content.decode()
    assert len(text) == 10_000
    events = sse_generate(url, prompt="The ", max_new_chars=10_000, seed=4)
    assert "".join(data for name, data in events if name is None) == text
    end = json.loads(events[-1][1])
    assert events[-1][0] == "end" and (end["seed"], end["chars"], end["finish_reason"]) == (4, 10_000, "length")
    response = generate(url, prompt="The ", max_new_chars=10_000)
    assert response.status_code == 400 and "[1, 2000] (10000 when streamed)" in response.json()["error"]


# -- client errors -----------------------------------------------------------------------------------


def test_image_client_errors_name_the_problem(url, digits):
    good = png(digits[0][0])
    huge = io.BytesIO()
    Image.new("L", (5000, 5000)).save(huge, format="PNG")  # 25 M pixels > the 16.7 M limit
    cases = [
        (dict(files={"image": ("a.txt", b"just some text")}), 415, "not an image"),
        (dict(files={"image": ("d.png", good[:len(good) // 2])}), 400, "truncated or corrupt"),
        (dict(files={"image": ("d.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)}), 400, "corrupt PNG"),
        (dict(files={"image": ("d.png", b"")}), 400, "empty"),
        (dict(files={"image": ("big.png", huge.getvalue())}), 413, "pixels"),
        (dict(files={"image": ("d.png", good)}, data={"model": "resnet9000"}), 404, "unknown model 'resnet9000'"),
        (dict(files={"image": ("d.png", good)}, data={"model": "char_lstm"}), 400, "sequence_lm model"),
        (dict(files={"image": ("d.png", good)}, data={"top_k": "0"}), 400, "top_k"),
        (dict(files={"image": ("d.png", good)}, data={"top_k": "many"}), 400, "top_k"),
        (dict(), 400, "image"),  # empty body
        (dict(data={"model": "lenet5"}), 415, "image"),  # a url-encoded form: no file
        (dict(files={"model": (None, "lenet5")}), 400, "missing form field 'image'"),
        (dict(files={"image": ("d.png", good)}, data={"colour": "red"}), 400, "unknown form field"),
        (dict(files={"image": (None, "http://169.254.169.254/latest")}), 415, "never fetches URLs"),
    ]
    for kwargs, status, words in cases:
        response = requests.post(f"{url}/classify", timeout=60, **kwargs)
        assert response.status_code == status, (kwargs.get("data"), response.text)
        assert words in response.text, response.text
        assert "error" in response.json()
    too_big = requests.post(f"{url}/classify", files={"image": ("big.png", b"\0" * (11 << 20))}, timeout=60)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    response = requests.post(f"{url}/features", files={"image": ("d.png", good)}, data={"model": "lenet5"}, timeout=60)
    assert response.status_code == 400 and "image_classifier" in response.json()["error"]
    response = requests.post(f"{url}/features", files={"image": ("d.png", good)}, data={"format": "xml"}, timeout=60)
    assert response.status_code == 400 and "format" in response.text
    # ... and the server keeps serving.
    assert classify(url, good).status_code == 200


def test_generate_client_errors_name_the_problem(url, tiny_store):
    vocab = store_entry(tiny_store["char_lstm"]).info.metadata["vocab"]
    outside = next(ch for ch in "€☃ß¿Ω" if ch not in vocab)
    cases = [
        (dict(prompt=f"ab{outside}c"), f"U+{ord(outside):04X}"),
        (dict(prompt=""), "prompt"),
        (dict(prompt="a" * 5000), "prompt"),
        (dict(prompt="The", max_new_chars=0), "max_new_chars"),
        (dict(prompt="The", max_new_chars=100000), "max_new_chars"),
        (dict(prompt="The", temperature=-1.5), "temperature"),
        (dict(prompt="The", top_k=0), "top_k"),
        (dict(prompt="The", n=0), "n must be an integer in [1, 16]"),
        (dict(prompt="The", n=1.5), "n must be an integer"),
        (dict(prompt="The", n="3"), "n must be an integer"),
        (dict(prompt="The", n=17), "n must be an integer in [1, 16], got 17"),
        (dict(prompt="The", n=16, max_new_chars=200), "n x max_new_chars = 16 x 200 = 3200"),
        (dict(prompt="The", seed=-1), "seed"),
        (dict(prompt="The", model="gpt-5"), "unknown model 'gpt-5'"),
        (dict(prompt="The", model="lenet5"), "image_classifier"),
        (dict(prompt="The", max_new_chars="lots"), "max_new_chars"),
        (dict(max_new_chars=5), "prompt"),
        (dict(prompt="The", stream=True, top_k=-3), "top_k"),  # a stream that cannot start: plain 4xx
    ]
    for body, words in cases:
        response = generate(url, **body)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        assert words in response.json()["error"], (body, response.text)
    response = requests.post(f"{url}/generate", data=b"{not json", headers={"content-type": "application/json"},
                             timeout=30)
    assert response.status_code == 400 and "error" in response.json()
    assert generate(url, prompt="The", max_new_chars=5).status_code == 200


# -- metrics -----------------------------------------------------------------------------------------


def test_metrics_cover_requests_latency_batches_and_generation(url, digits, tiny_store, live_server):
    before = scrape(url)
    data = png(digits[0][3])
    assert classify(url, data).status_code == 200
    assert classify(url, b"not an image").status_code == 415
    text = generate(url, prompt="The", max_new_chars=25, seed=1).json()["text"]
    assert requests.get(f"{url}/", timeout=10).status_code == 200  # a route BentoML serves itself: its histogram
    after = scrape(url)
    lenet5 = dict(model="lenet5", version=tiny_store["lenet5"].split(":")[1])
    lstm = dict(model="char_lstm", version=tiny_store["char_lstm"].split(":")[1])

    def grew(name, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("nnserve_requests_total", endpoint="classify", outcome="ok", **lenet5) == 1
    assert grew("nnserve_requests_total", endpoint="classify", outcome="client_error", **lenet5) == 1
    assert grew("nnserve_requests_total", endpoint="generate", outcome="ok", **lstm) == 1
    assert grew("nnserve_generated_characters_total", **lstm) == len(text) == 25
    for name in ("nnserve_preprocess_duration_seconds_count", "nnserve_batch_wait_duration_seconds_count"):
        assert grew(name, **lenet5) == 1, name  # the bad upload fails inside preprocessing
    assert grew("nnserve_request_duration_seconds_count", endpoint="classify", **lenet5) == 2
    assert grew("nnserve_inference_duration_seconds_count", batcher="dynamic", **lenet5) >= 1
    assert grew("nnserve_inference_duration_seconds_count", batcher="continuous", **lstm) >= 24  # decode steps
    assert grew("nnserve_batch_size_count", batcher="continuous", **lstm) >= 24
    # Present with their labels even when idle: gauges of in-flight requests and active streams.
    assert metric(after, "nnserve_in_flight_requests", endpoint="classify", **lenet5) == 0
    assert metric(after, "nnserve_generation_streams_active", **lstm) == 0
    # Microsecond buckets (BentoML's default starts at 5 ms), on ours and on BentoML's request histogram.
    assert ("nnserve_inference_duration_seconds_bucket",
            tuple(sorted({"batcher": "dynamic", "le": "5e-05", **lenet5}.items()))) in after
    assert any(n == "bentoml_service_request_duration_seconds_bucket" and dict(items).get("le") == "5e-05"
               for n, items in after), live_server.log()


def test_a_second_server_on_the_same_home_leaves_the_metrics_alone(url, digits, tiny_store, own_server):
    """Two servers on one BENTOML_HOME (replicas on a host): starting the second must not wipe the first's
    Prometheus files (BentoML empties one shared directory per home; service/bentoml_fixes.py)."""
    lenet5 = dict(endpoint="classify", outcome="ok", model="lenet5", version=tiny_store["lenet5"].split(":")[1])
    assert classify(url, png(digits[0][4])).status_code == 200
    before = metric(scrape(url), "nnserve_requests_total", **lenet5)
    assert before >= 1
    with own_server("second-on-home", {"NNSERVE_WORKERS": "1"}) as second:
        assert classify(second.http_url, png(digits[0][4])).status_code == 200
        assert metric(scrape(second.http_url), "nnserve_requests_total", **lenet5) == 1
        assert metric(scrape(url), "nnserve_requests_total", **lenet5) == before
    assert classify(url, png(digits[0][4])).status_code == 200
    assert metric(scrape(url), "nnserve_requests_total", **lenet5) == before + 1


def test_grpc_inference_shares_the_batcher_and_the_metrics(url, live_server, tiny_store):
    """A KServe v2 gRPC call on an image model goes through the model's dynamic batcher and is counted
    per model under its own endpoint label, "grpc" (KServe v2 REST: "v2"), like the REST front ends."""
    import tritonclient.grpc as grpcclient

    before = scrape(url)
    client = grpcclient.InferenceServerClient(live_server.grpc_url)
    x = np.zeros((3, 1, 32, 32), dtype=np.float32)
    request = grpcclient.InferInput("input", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    logits = client.infer("lenet5", [request]).as_numpy("logits")
    client.close()
    np.testing.assert_allclose(logits, reference(tiny_store["lenet5"], {"input": x})["logits"], rtol=1e-5, atol=1e-5)
    after = scrape(url)
    version = tiny_store["lenet5"].split(":")[1]
    ok = dict(endpoint="grpc", model="lenet5", version=version, outcome="ok")
    assert metric(after, "nnserve_requests_total", **ok) - metric(before, "nnserve_requests_total", **ok) == 1
    sizes = dict(model="lenet5", version=version, batcher="dynamic")
    assert metric(after, "nnserve_batch_size_sum", **sizes) - metric(before, "nnserve_batch_size_sum", **sizes) >= 3


def test_dashboard_and_docs_use_the_metrics_the_server_exports(url):
    """docs/grafana-dashboard.json queries only metrics the server exports, and docs/metrics.md documents
    every nnserve metric it exports."""
    root = Path(__file__).resolve().parent.parent
    exported = {name for name, _ in scrape(url)}
    dashboard = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = set(re.findall(r"\bnnserve_\w+", " ".join(queries)))
    assert len(used) >= 8 and used <= exported, used - exported
    documented = set(re.findall(r"`(nnserve_\w+)`", (root / "docs" / "metrics.md").read_text()))
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported if name.startswith("nnserve_")}
    assert families <= documented, families - documented


def test_a_client_leaving_a_stream_frees_it(url, tiny_store):
    """Close a streamed generation after its first characters: the server counts it as a client error,
    the active-streams gauge returns to 0 (its batch slot is free) and the server keeps serving."""
    lstm = dict(model="char_lstm", version=tiny_store["char_lstm"].split(":")[1])
    left = dict(endpoint="generate", outcome="client_error", **lstm)
    before = metric(scrape(url), "nnserve_requests_total", **left)
    with requests.post(f"{url}/generate", json={"prompt": "The ", "max_new_chars": 2000, "stream": True},
                       stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert next(response.iter_content(chunk_size=1))
    deadline = time.monotonic() + 60  # a generous bound on a busy box; usually well under a second
    while time.monotonic() < deadline:
        after = scrape(url)
        if metric(after, "nnserve_requests_total", **left) > before:
            break
        time.sleep(0.2)
    assert metric(after, "nnserve_requests_total", **left) == before + 1, "the abandoned stream was not counted"
    assert metric(after, "nnserve_generation_streams_active", **lstm) == 0
    assert generate(url, prompt="The", max_new_chars=5).status_code == 200


def test_a_client_leaving_an_n_sample_stream_frees_every_slot(url, tiny_store):
    """Hang up on a 4-sample SSE stream after its first event: the abandoned request is counted (499) only
    after its generations were closed, and at that point no slot of the batcher is held."""
    lstm = dict(model="char_lstm", version=tiny_store["char_lstm"].split(":")[1])
    left = dict(endpoint="generate", outcome="client_error", **lstm)
    before = metric(scrape(url), "nnserve_requests_total", **left)
    with requests.post(f"{url}/generate", json={"prompt": "The ", "max_new_chars": 2500, "n": 4, "stream": True},
                       headers={"Accept": "text/event-stream"}, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert next(response.iter_content(chunk_size=1))
    deadline = time.monotonic() + 60  # a generous bound on a busy box; usually well under a second
    while time.monotonic() < deadline:
        after = scrape(url)
        if metric(after, "nnserve_requests_total", **left) > before:
            break
        time.sleep(0.2)
    assert metric(after, "nnserve_requests_total", **left) == before + 1, "the abandoned stream was not counted"
    assert metric(after, "nnserve_generation_slots", state="active", **lstm) == 0
    assert metric(after, "nnserve_generation_streams_active", **lstm) == 0
    assert generate(url, prompt="The", max_new_chars=5, n=2).status_code == 200


def test_a_stop_string_at_the_very_start_gives_an_empty_text(url):
    """The first character sampled is a stop string: an empty text with finish_reason "stop" (JSON, stream,
    SSE), not a server error."""
    first = generate(url, prompt="The ", max_new_chars=1, seed=13).json()["text"]
    body = generate(url, prompt="The ", max_new_chars=50, seed=13, stop=first).json()
    assert (body["text"], body["finish_reason"]) == ("", "stop")
    with requests.post(f"{url}/generate", json={"prompt": "The ", "max_new_chars": 50, "seed": 13, "stop": first,
                                                "stream": True}, stream=True, timeout=60) as response:
        assert response.status_code == 200 and response.content == b""
    events = sse_generate(url, prompt="The ", max_new_chars=50, seed=13, stop=first)
    assert [name for name, _ in events] == ["end"] and json.loads(events[0][1])["finish_reason"] == "stop"
    choices = generate(url, prompt="The ", max_new_chars=50, seed=13, stop=first, n=2).json()["choices"]
    assert choices[0] == {"index": 0, "text": "", "finish_reason": "stop"}
