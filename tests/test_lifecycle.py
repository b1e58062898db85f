"""Live model lifecycle (issue 15) against a real two-worker server, driven by unmodified tritonclient
(HTTP and gRPC) and plain HTTP: Triton's repository API, several versions, the traffic split, every worker
agreeing, faults (a version that cannot load, a conflicting change, a killed worker, unloading under a
running stream), Triton's model configuration and statistics."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from loadtest.faults import store_copy, truncated_copy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOKEN = "lifecycle-test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def versions(tiny_store) -> dict[str, list[str]]:
    """Two versions of a classifier ("digits") and of a text model ("poet"), oldest first, plus a broken
    third digits version registered later by a test."""
    digits = [store_copy(tiny_store["lenet5"], "digits").split(":")[1] for _ in range(2)]
    poet = [store_copy(tiny_store["char_gru"], "poet").split(":")[1] for _ in range(2)]
    return {"digits": digits, "poet": poet}


@pytest.fixture(scope="module")
def server(own_server, versions, session_dir: Path):
    config = session_dir / "lifecycle-models.yaml"
    # "late" is not in the store at start: it waits, then joins once exported (test below)
    config.write_text(json.dumps({"models": {"digits": {"tag": "digits"}, "poet": {"tag": "poet"},
                                             "late": {"tag": "late"}}}))
    state = session_dir / "lifecycle-state"
    token = session_dir / "lifecycle-token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    env = {"NNSERVE_MANAGEMENT_TOKEN_FILE": str(token), "NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_WORKERS": "2",
           "NNSERVE_STATE_DIR": str(state),
           "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    with own_server("lifecycle", env, ready_path="/livez") as live:  # /readyz: 503 while "late" waits
        live.state_dir = state
        wait_until(lambda: requests.get(f"{live.http_url}/v2/models/poet/ready", timeout=10).status_code == 200)
        yield live


def wait_until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def classify(server, version: str = "", headers: dict | None = None) -> requests.Response:
    data = {"model": "digits", **({"version": version} if version else {})}
    return requests.post(f"{server.http_url}/classify", files={"image": png()}, data=data, headers=headers, timeout=60)


def answered_version(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["model"].split(":")[1]


def v2_infer(http, version: str = "") -> tuple[str, np.ndarray]:
    meta = http.get_model_metadata("digits")
    x = np.random.default_rng(1).random((2, *meta["inputs"][0]["shape"][1:]), dtype=np.float32)
    inp = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = http.infer("digits", [inp], model_version=version)
    return result.get_response()["model_version"], result.as_numpy(meta["outputs"][0]["name"])


def reports(server) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in (server.state_dir / "workers").glob("*.json")}


def index(http) -> dict[tuple[str, str], dict]:
    return {(e["name"], e["version"]): e for e in http.get_model_repository_index(headers=AUTH)}


def test_start_serves_the_latest_version_and_the_index_lists_the_store(server, http, grpc, versions):
    old, new = versions["digits"]
    entries = index(http)
    assert entries[("digits", new)]["state"] == "READY"
    assert entries[("digits", old)]["state"] == "UNAVAILABLE"
    assert ("poet", versions["poet"][1]) in entries
    grpc_entries = {(m.name, m.version): m.state for m in grpc.get_model_repository_index(headers=AUTH).models}
    assert grpc_entries[("digits", new)] == "READY"
    assert answered_version(classify(server)) == new
    assert "model_repository" in http.get_server_metadata()["extensions"]


def test_a_configured_model_exported_after_start_joins_without_a_change(server, tiny_store):
    late = {m["name"]: m for m in requests.get(f"{server.http_url}/models", timeout=30).json()["models"]}["late"]
    assert late["state"] == "loading" and "waiting for 'late' to be exported" in late["reason"]
    answer = requests.post(f"{server.http_url}/classify", files={"image": png()}, data={"model": "late"}, timeout=30)
    assert answer.status_code == 503 and "waiting" in answer.json()["error"]
    version = store_copy(tiny_store["lenet5"], "late").split(":")[1]
    wait_until(lambda: len(reports(server)) == 2 and all(
        r["models"]["late"].get(version, {}).get("state") == "READY" for r in reports(server).values()), 60)
    assert requests.get(f"{server.http_url}/readyz", timeout=10).status_code == 200
    assert answered_version(requests.post(f"{server.http_url}/classify", files={"image": png()},
                                          data={"model": "late"}, timeout=30)) == version


def test_load_a_second_version_then_each_is_reachable_by_version(server, http, versions):
    old, new = versions["digits"]
    http.load_model("digits", headers=AUTH,
                    config=json.dumps({"version_policy": {"latest": {"num_versions": 2}}}))
    assert http.is_model_ready("digits", old) and http.is_model_ready("digits", new)
    assert v2_infer(http, old)[0] == old
    assert v2_infer(http, new)[0] == new
    np.testing.assert_allclose(v2_infer(http, old)[1], v2_infer(http, new)[1], rtol=1e-5)  # copies of one model
    assert v2_infer(http)[0] == new  # no version named, no split: the newest
    assert answered_version(classify(server, old)) == old
    # every worker reports the change before the call returned
    assert all(old in r["models"]["digits"] and r["models"]["digits"][old]["state"] == "READY"
               for r in reports(server).values()) and len(reports(server)) == 2


def test_default_switch_and_a_sticky_canary_split(server, http, versions):
    old, new = versions["digits"]
    url = f"{server.http_url}/v2/repository/models/digits/traffic"
    assert requests.post(url, json={"default_version": old}, headers=AUTH, timeout=120).status_code == 200
    assert {answered_version(classify(server)) for _ in range(10)} == {old}
    body = {"weights": {old: 50, new: 50}, "sticky_header": "x-user"}
    answer = requests.post(url, json=body, headers=AUTH, timeout=120)
    assert answer.status_code == 200 and answer.json()["traffic"] == {old: 50.0, new: 50.0}
    seen = [answered_version(classify(server)) for _ in range(40)]
    assert set(seen) == {old, new}  # 40 fair coin flips all equal: p = 2e-12
    for user in ("ada", "bob", "cy"):
        assert len({answered_version(classify(server, headers={"x-user": user})) for _ in range(8)}) == 1


@pytest.mark.parametrize("body, status, named", [
    ({"weights": {"a": 60, "b": 30}}, 400, "must add up to 100"),
    ({"weights": {"nope": 100}}, 404, "does not serve version 'nope'"),
    ({"default_version": "nope", "weights": {}}, 400, "default_version"),
    ({"weights": {"x": 100}, "sticky_header": "bad header!"}, 400, "sticky_header"),
])
def test_bad_traffic_changes_are_refused_naming_the_problem(server, body, status, named):
    answer = requests.post(f"{server.http_url}/v2/repository/models/digits/traffic", json=body, headers=AUTH,
                           timeout=60)
    assert answer.status_code == status and named in answer.json()["error"]


def test_unknown_model_and_version_answer_404_naming_what_exists(server, http, versions):
    answer = requests.post(f"{server.http_url}/v2/repository/models/ghost/load", json={}, headers=AUTH, timeout=60)
    assert answer.status_code == 404 and "ghost" in answer.json()["error"]
    answer = requests.post(f"{server.http_url}/v2/repository/models/digits/load",
                           json={"parameters": {"version": "nope"}}, headers=AUTH, timeout=60)
    assert answer.status_code == 404 and versions["digits"][0] in answer.json()["error"]
    answer = requests.post(f"{server.http_url}/v2/models/digits/versions/nope/infer", json={"inputs": []}, timeout=60)
    assert answer.status_code == 404 and "serving" in answer.json()["error"]
    answer = requests.post(f"{server.http_url}/v2/repository/models/digits/load",
                           json={"parameters": {"file:1/model.onnx": "AAAA"}}, headers=AUTH, timeout=60)
    assert answer.status_code == 400 and "model store only" in answer.json()["error"]


def test_a_version_that_cannot_load_is_rolled_back_and_the_old_ones_serve(server, http, tiny_store, versions):
    broken = truncated_copy(tiny_store["lenet5"], "digits").split(":")[1]
    before = {e for e, v in index(http).items() if v["state"] == "READY"}
    answer = requests.post(f"{server.http_url}/v2/repository/models/digits/load",
                           json={"parameters": {"version": broken}}, headers=AUTH, timeout=300)
    assert answer.status_code == 400
    assert "rolled back" in answer.json()["error"] and broken in answer.json()["error"]
    after = index(http)
    assert {e for e, v in after.items() if v["state"] == "READY"} == before
    assert after[("digits", broken)]["reason"]  # the index keeps why it failed
    assert answered_version(classify(server, versions["digits"][0])) == versions["digits"][0]


def test_changes_need_the_management_token(server, grpc):
    url = f"{server.http_url}/v2/repository/models/digits/unload"
    assert requests.post(url, json={}, timeout=60).status_code == 401
    wrong = requests.post(url, json={}, headers={"authorization": "Bearer wrong-token-0123456789"}, timeout=60)
    assert wrong.status_code == 403 and "wrong-token" not in wrong.text
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        grpc.unload_model("digits")
    assert grpc.is_model_ready("digits")


def test_a_change_while_another_runs_gets_409(server):
    with open(server.state_dir / "change.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a change in progress holds
        try:
            answer = requests.post(f"{server.http_url}/v2/repository/models/digits/load", json={}, headers=AUTH,
                                   timeout=60)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert answer.status_code == 409 and "in progress" in answer.json()["error"]


def test_unloading_while_a_stream_runs_lets_it_finish(server, http, versions):
    chars = 400
    got: dict = {}

    def stream():
        with requests.post(f"{server.http_url}/generate", json={"model": "poet", "prompt": "a", "stream": True,
                                                                "max_new_chars": chars, "seed": 1},
                           stream=True, timeout=300) as r:
            got["status"] = r.status_code
            got["text"] = "".join(r.iter_content(chunk_size=None, decode_unicode=True))

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.3)
    http.unload_model("poet", headers=AUTH)
    thread.join(timeout=300)
    assert got["status"] == 200 and len(got["text"]) == chars
    assert not http.is_model_ready("poet")
    assert requests.post(f"{server.http_url}/generate", json={"model": "poet", "prompt": "a"},
                         timeout=60).status_code == 404
    http.load_model("poet", headers=AUTH)
    assert http.is_model_ready("poet", versions["poet"][1])


def test_grpc_load_unload_config_and_statistics(server, grpc, versions):
    old, new = versions["digits"]
    grpc.unload_model("digits", headers=AUTH)
    assert not grpc.is_model_ready("digits")
    # (the store's newest digits is the broken copy of an earlier test: name the version)
    grpc.load_model("digits", headers=AUTH,
                    config=json.dumps({"version_policy": {"specific": {"versions": [new]}}}))
    assert grpc.is_model_ready("digits", new) and not grpc.is_model_ready("digits", old)
    config = grpc.get_model_config("digits", as_json=True)["config"]
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == ["1", "32", "32"]
    assert "dynamic_batching" in config
    for _ in range(3):
        classify(server)
    stats = grpc.get_inference_statistics("digits", as_json=True)["model_stats"]
    assert stats[0]["version"] == new and int(stats[0]["inference_stats"]["success"]["count"]) >= 3
    assert int(stats[0]["execution_count"]) >= 1 and int(stats[0]["inference_stats"]["compute_infer"]["ns"]) > 0


def test_http_config_and_stats(server, http):
    config = http.get_model_config("digits")
    assert config["name"] == "digits" and config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 128
    stats = http.get_inference_statistics("digits")["model_stats"]
    assert stats and all(s["name"] == "digits" for s in stats)


def test_a_killed_worker_comes_back_serving_the_current_state(server, http, versions):
    old, new = versions["digits"]
    http.load_model("digits", headers=AUTH,
                    config=json.dumps({"version_policy": {"specific": {"versions": [old]}}}))
    generation = max(r["generation"] for r in reports(server).values())
    victim = reports(server)[2]["pid"]
    os.kill(victim, signal.SIGKILL)
    # A change while the worker is dead waits for its replacement (circus restarts it). A new connection:
    # the client's kept-alive one may have been to the killed worker.
    answer = requests.post(f"{server.http_url}/v2/repository/models/digits/load", headers=AUTH, timeout=300,
                           json={"parameters": {"config": {"version_policy": {"specific": {"versions": [old, new]}}}}})
    assert answer.status_code == 200, answer.text
    after = reports(server)
    assert after[2]["pid"] != victim and after[2]["generation"] > generation
    assert set(after[2]["models"]["digits"]) == {old, new}


def test_rest_generate_takes_a_version(server, versions):
    served = versions["poet"][1]
    answer = requests.post(f"{server.http_url}/generate", timeout=60,
                           json={"model": "poet", "version": served, "prompt": "a", "max_new_chars": 5})
    assert answer.status_code == 200 and answer.json()["model"] == f"poet:{served}"
    answer = requests.post(f"{server.http_url}/generate", timeout=60,
                           json={"model": "poet", "version": "nope", "prompt": "a"})
    assert answer.status_code == 404 and served in answer.json()["error"]
    answer = requests.post(f"{server.http_url}/generate", timeout=60,
                           json={"model": "poet", "version": 3, "prompt": "a"})
    assert answer.status_code == 400 and "version must be a string" in answer.json()["error"]
