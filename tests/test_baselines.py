"""The bench's baseline servers (loadtest/baselines) and its wrk script, against the tiny test models.

Each baseline must serve the same model with the same preprocessing as nnserve, or the bench compares
nothing: its answer for a real digit must be the in-process ONNX Runtime answer. The wrk check sends
post.lua's multipart body for a second: a malformed body would be answered 4xx and counted.
Seconds per server; nothing is timed.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

import numpy as np
import pytest

# The baselines' frameworks are the `bench` extra (`make bench` installs it; `make setup` does not).
pytest.importorskip("litserve", reason="the bench extra is not installed: pip install -e '.[bench]'")
pytest.importorskip("fastapi", reason="the bench extra is not installed: pip install -e '.[bench]'")

from harness.data import held_out_digits, png_bytes  # noqa: E402
from loadtest.baselines.common import StoreModel  # noqa: E402
from loadtest.baselines.launch import MLSERVER_VENV, Config, grid, running_baseline  # noqa: E402
from loadtest.bench.compare import LIMIT, Unit, pick_best, round_order, units  # noqa: E402
from loadtest.bench.stacks import top_label  # noqa: E402
from loadtest.bench.wrk import multipart_body, run_wrk  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def baseline_env(tiny_store) -> dict[str, str]:
    return {"BENTOML_HOME": os.environ["BENTOML_HOME"], "BASELINE_LENET5_TAG": tiny_store["lenet5"],
            "BASELINE_VGG_FC7_TAG": tiny_store["vgg_fc7"], "BASELINE_ORT_THREADS": "1"}


def post_digit(url: str, png: bytes, fields: dict[str, str] | None = None) -> tuple[int, bytes]:
    body, content_type = multipart_body(png, fields)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()


PEERS = ("bentoml", "fastapi", "litserve")  # every one serves /features (vgg_fc7) too


@pytest.mark.parametrize("name", PEERS)
def test_baseline_answers_like_onnx_runtime_in_process(name, baseline_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BASELINE_LENET5_TAG", baseline_env["BASELINE_LENET5_TAG"])
    model = StoreModel.load("lenet5", threads=1)
    digits, _ = held_out_digits()
    pngs = [png_bytes(d) for d in digits[:3]]
    expected = [model.top_k(model.run(model.decode(p)[None], output="logits")[0]) for p in pngs]
    with running_baseline(name, tmp_path / f"{name}.log", baseline_env) as server:
        for png, want in zip(pngs, expected, strict=True):
            status, body = post_digit(server.http_url + "/classify", png)
            assert status == 200, server.log(3000)
            answer = json.loads(body)
            assert top_label(answer) == want["predictions"][0]["label"], (answer, want)
            predictions = (answer[0] if isinstance(answer, list) else answer)["predictions"]
            assert len(predictions) == 5
            assert np.isclose(predictions[0]["probability"], want["predictions"][0]["probability"], rtol=1e-4)
        status, body = post_digit(server.http_url + "/features", pngs[0], {"format": "json"})
        answer = json.loads(body)
        answer = answer[0] if isinstance(answer, list) else answer
        assert status == 200 and answer["dim"] == len(answer["features"]) > 0
        if name != "bentoml":  # BentoML answers JSON only (bentoml_book.py)
            status, body = post_digit(server.http_url + "/features", pngs[0], {"format": "npy"})
            assert status == 200 and body.startswith(b"\x93NUMPY")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")
def test_wrk_script_sends_requests_the_server_accepts(baseline_env, tmp_path):
    digits, _ = held_out_digits()
    png = tmp_path / "digit.png"
    png.write_bytes(png_bytes(digits[0]))
    with running_baseline("fastapi", tmp_path / "fastapi.log", baseline_env) as server:
        result = run_wrk(server.http_url + "/classify", ["multipart", str(png), "top_k=2"], connections=2, seconds=1)
        assert result.requests > 0
        assert result.errors == 0, server.log(3000)
        bad = run_wrk(server.http_url + "/classify", ["multipart", str(png), "top_k=zero"], connections=1, seconds=1)
        assert bad.requests > 0 and bad.status_errors == bad.requests  # a 422 for every request: counted



# ---- the grid each peer is swept over, and how the rounds are planned (no server) -------------------------

def test_each_peer_is_swept_over_workers_and_its_batching_knobs():
    cores = 2
    # FastAPI: workers 1/2 x ORT threads 1/2, no batching (it has none)
    assert {(c.workers, c.threads) for c in grid("fastapi", cores)} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(c.max_batch == 0 for c in grid("fastapi", cores))
    assert Config("fastapi", 2, threads=2).env()["BASELINE_ORT_THREADS"] == "2"
    # Triton: instances 1/2 x dynamic batching off or max_queue_delay 0, 1, 5 ms
    assert {(c.workers, c.max_batch, c.wait_ms) for c in grid("triton", cores)} == {
        (w, b, wait) for w in (1, 2) for b, wait in ((0, 0.0), (32, 0.0), (32, 1.0), (32, 5.0))}
    assert Config("triton", 2, 32, 1.0).describe() == "instances=2, dynamic batching <= 32, max_queue_delay 1 ms"
    for peer in ("litserve", "mlserver"):
        assert {(c.workers, c.max_batch, c.wait_ms) for c in grid(peer, cores)} == {
            (w, b, wait) for w in (1, 2) for b, wait in ((0, 0.0), (32, 1.0), (32, 5.0))}
    assert {(c.workers, c.max_batch) for c in grid("bentoml", cores)} == {(1, 0), (1, 32), (2, 0), (2, 32)}
    # ORT threads never oversubscribe: cores / workers, as nnserve's sessions
    assert Config("fastapi", 2).env()["BASELINE_ORT_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert Config("litserve", 1, 32, 5.0).describe() == "workers_per_device=1, batch <= 32, wait 5 ms"


def test_the_best_configuration_is_picked_per_row_and_errors_disqualify():
    from loadtest.bench.stacks import CLASSIFY, StackRun
    from loadtest.bench.wrk import WrkResult

    def row(config: str, c: int, rps: float, errors: int = 0) -> StackRun:
        return StackRun("litserve", CLASSIFY, WrkResult(c, int(rps * 3), 3.0, rps, 1, 2, 3, 4, errors, 0),
                        config=config)

    sweep = [row("a", 1, 500), row("b", 1, 400), row("a", 32, 900, errors=3), row("b", 32, 800)]
    assert pick_best(sweep) == {("litserve", CLASSIFY, 1): "a", ("litserve", CLASSIFY, 32): "b"}
    plan = units(["litserve"], [1, 32], type("C", (), {"best": {("litserve", CLASSIFY, 1):
                                                                 Config("litserve", 1).describe()}})())
    assert [u.server for u in plan] == ["nnserve", LIMIT, "litserve"]
    assert plan[2].rows == ((CLASSIFY, 1),) and plan[2].config == Config("litserve", 1)


def test_every_round_runs_every_server_in_a_new_order():
    plan = [Unit(name, None, ()) for name in ("nnserve", "limit", "fastapi", "litserve", "bentoml")]
    orders, previous = [], None
    for round_no in (1, 2, 3):
        previous = round_order(plan, round_no, previous)
        orders.append([u.server for u in previous])
    assert all(sorted(o) == sorted(u.server for u in plan) for o in orders)
    assert orders[0] != orders[1] != orders[2]


# ---- the limit (bare HTTP stack) and configured peers, live -----------------------------------------------

def test_limit_server_reads_the_body_and_answers_a_fixed_json(baseline_env, tmp_path):
    digits, _ = held_out_digits()
    with running_baseline(LIMIT, tmp_path / "limit.log", baseline_env) as server:
        status, body = post_digit(server.http_url + "/classify", png_bytes(digits[0]))
        again = post_digit(server.http_url + "/classify", png_bytes(digits[1]))
    assert status == 200 and again == (200, body)  # the same answer whatever the image: no model behind it
    assert len(json.loads(body)["predictions"]) == 5


@pytest.mark.parametrize("config", [Config("litserve", 1, 32, 1.0), Config("bentoml", 1, 32)],
                         ids=["litserve-batching", "bentoml-batching"])
def test_peer_with_its_batching_on_answers_like_onnx_runtime(config, baseline_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BASELINE_LENET5_TAG", baseline_env["BASELINE_LENET5_TAG"])
    model = StoreModel.load("lenet5", threads=1)
    png = png_bytes(held_out_digits()[0][0])
    want = model.top_k(model.run(model.decode(png)[None], output="logits")[0])["predictions"][0]["label"]
    with running_baseline(config, tmp_path / "peer.log", baseline_env) as server:
        status, body = post_digit(server.http_url + "/classify", png)
        assert status == 200, server.log(3000)
    assert top_label(json.loads(body)) == want


@pytest.mark.skipif(not (MLSERVER_VENV / "bin" / "mlserver").exists(),
                    reason="MLServer's venv (.venv-mlserver) not created: the bench makes it (launch.ensure_mlserver)")
def test_mlserver_with_adaptive_batching_answers_like_onnx_runtime(baseline_env, monkeypatch, tmp_path):
    from loadtest.bench.wrk import v2_json_body

    monkeypatch.setenv("BASELINE_LENET5_TAG", baseline_env["BASELINE_LENET5_TAG"])
    model = StoreModel.load("lenet5", threads=1)
    x = model.decode(png_bytes(held_out_digits()[0][0]))[None]
    want = model.run(x, output="logits")[0]
    with running_baseline(Config("mlserver", 2, 32, 1.0), tmp_path / "mlserver.log", baseline_env) as server:
        request = urllib.request.Request(server.http_url + "/v2/models/lenet5/infer",
                                         data=v2_json_body(x, model.input_name),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    assert np.allclose(answer["outputs"][0]["data"], want, rtol=1e-4, atol=1e-5)


# ---- Triton Inference Server itself (the nvidia-pytriton wheel, from .venv-triton) -------------------------

@pytest.fixture(scope="module")
def triton_ready() -> None:
    from loadtest.baselines.triton_server import ensure_triton

    why = ensure_triton()  # creates .venv-triton (pip) when missing: minutes, once
    if why:
        pytest.skip(f"Triton cannot run here: {why}")


@pytest.mark.parametrize("config", [Config("triton", 1, 32, 1.0), Config("triton", 2, 0)],
                         ids=["dynamic-batching", "2-instances-no-batching"])
def test_triton_answers_tritonclient_http_binary_and_grpc_like_onnx_runtime(config, triton_ready, baseline_env,
                                                                          monkeypatch, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    monkeypatch.setenv("BASELINE_LENET5_TAG", baseline_env["BASELINE_LENET5_TAG"])
    monkeypatch.setenv("BASELINE_VGG_FC7_TAG", baseline_env["BASELINE_VGG_FC7_TAG"])
    lenet5, vgg = StoreModel.load("lenet5", threads=1), StoreModel.load("vgg_fc7", threads=1)
    digits, _ = held_out_digits()
    x = np.stack([lenet5.decode(png_bytes(d)) for d in digits[:3]])
    env = {**baseline_env, "BASELINE_TRITON_MODELS": "lenet5,vgg_fc7"}
    with running_baseline(config, tmp_path / "triton.log", env) as server:
        http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        tensor = httpclient.InferInput(lenet5.input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)  # the binary tensor extension, tritonclient's default
        answer = http.infer("lenet5", [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
        assert np.allclose(answer.as_numpy("logits"), lenet5.run(x, output="logits"), rtol=1e-4, atol=1e-5)
        features = http.infer("vgg_fc7", [tensor], outputs=[httpclient.InferRequestedOutput("fc7")]).as_numpy("fc7")
        assert np.allclose(features, vgg.run(x, output="fc7"), rtol=1e-4, atol=1e-5)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        one = grpcclient.InferInput(lenet5.input_name, [1, *x.shape[1:]], "FP32")
        one.set_data_from_numpy(x[:1])
        logits = grpc.infer("lenet5", [one]).as_numpy("logits")
        assert np.allclose(logits, lenet5.run(x[:1], output="logits"), rtol=1e-4, atol=1e-5)
        config_text = (tmp_path / "triton.triton" / "models" / "lenet5" / "config.pbtxt").read_text()
        assert f"count: {config.workers}, kind: KIND_CPU" in config_text
        assert ("dynamic_batching" in config_text) == bool(config.max_batch), config_text


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")
def test_bench_binary_v2_rows_are_accepted_by_triton_and_nnserve(triton_ready, baseline_env, live_server, tmp_path):
    from loadtest.bench.stacks import V2_BINARY, check_answer, route, wrk_args
    from loadtest.bench.wrk import request_files

    model = StoreModel.load("lenet5", threads=1, tag=baseline_env["BASELINE_LENET5_TAG"])
    files = request_files(tmp_path, model.metadata["preprocessing"], model.input_name)
    with running_baseline(Config("triton", 1, 32, 0.0), tmp_path / "triton.log", baseline_env) as server:
        theirs = check_answer(server.http_url, V2_BINARY, files)
        result = run_wrk(server.http_url + route(V2_BINARY), wrk_args(V2_BINARY, files), connections=4, seconds=1)
        assert result.requests > 0 and result.errors == 0, server.log(3000)
    ours = check_answer(live_server.http_url, V2_BINARY, files)
    assert ours == theirs and ours.startswith("logits [1, 10], argmax ")
    result = run_wrk(live_server.http_url + route(V2_BINARY), wrk_args(V2_BINARY, files), connections=2, seconds=1)
    assert result.requests > 0 and result.errors == 0
