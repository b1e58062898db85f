"""Per-model execution settings (issue 26, item 1): ``instance_group`` count, ONNX Runtime thread
``parameters`` and the variant in models.yaml, their bounds and the oversubscription warning; instances
running batches at once; and a real two-worker server whose model's threads, instances and variant change
live through the management API."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import numpy as np
import pytest
import requests

from loadtest.faults import store_copy
from service.batching import BatchingConfig, DynamicBatcher
from service.settings import ModelConfig, Settings, SettingsError, read_models_document, resolve_entries

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOKEN = "execution-test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def entry(text: dict, settings: Settings | None = None) -> ModelConfig:
    return resolve_entries(settings or Settings(), read_models_document({"models": {"m": text}}, "models.yaml"),
                           "models.yaml")[0]


# -- models.yaml ----------------------------------------------------------------------------------------------

def test_execution_keys_in_tritons_names_parse_and_round_trip():
    model = entry({"tag": "m", "instance_group": [{"count": 2, "kind": "KIND_AUTO"}],
                   "parameters": {"intra_op_thread_count": {"string_value": "3"}, "inter_op_thread_count": 2},
                   "variant": "int8"})
    assert (model.instances, model.intra_op_threads, model.inter_op_threads, model.variant) == (2, 3, 2, "int8")
    assert model.store_name == "m-int8"  # the variant's store entry; the served name stays "m"
    again = entry(model.to_entry())
    assert (again.instances, again.intra_op_threads, again.inter_op_threads, again.variant) == (2, 3, 2, "int8")
    assert again.to_entry()["tag"] == "m"


def test_defaults_never_oversubscribe():
    settings = Settings(workers=2, cpus=8)
    plain = entry({})
    assert (plain.instances, plain.intra_op_threads, plain.variant) == (1, 0, "fp32")
    assert settings.threads_for(plain) == 4
    assert settings.threads_for(entry({"instance_group": [{"count": 2}]})) == 2
    assert settings.threads_for(entry({"instance_group": [{"count": 16}]})) == 1
    # NNSERVE_INTRA_OP_THREADS is every model's default; a model's own setting beats it
    assert settings.threads_for(entry({}, Settings(intra_op_threads=3))) == 3
    assert settings.threads_for(entry({"parameters": {"intra_op_thread_count": 5}}, Settings(intra_op_threads=3))) == 5
    assert settings.oversubscription(plain) is None
    adaptive = entry({"instance_group": [{"count": 2}], "parameters": {"lone_request_thread_count": 8}})
    assert adaptive.lone_request_threads == 8 and settings.oversubscription(adaptive) is None
    assert "lone_request_thread_count 9 is more than the 8 cores" in settings.oversubscription(
        entry({"parameters": {"lone_request_thread_count": 9}}))


BAD = [
    ({"instance_group": [{"count": 0}]}, "models.m.instance_group[0].count: must be in [1, 16], got 0"),
    ({"instance_group": [{"count": 17}]}, "models.m.instance_group[0].count: must be in [1, 16], got 17"),
    ({"instance_group": {"count": 2}}, "models.m.instance_group: must be a list of one group"),
    ({"instance_group": [{"count": 1}, {"count": 1}]}, "models.m.instance_group: must be a list of one group"),
    ({"instance_group": [{"count": 1, "kind": "KIND_GPU"}]}, "instance_group[0].kind: must be KIND_AUTO"),
    ({"instance_group": [{"count": 1, "gpus": [0]}]}, "models.m.instance_group[0].gpus: unknown key"),
    ({"instance_group": [{}]}, "models.m.instance_group[0]: needs a count"),
    ({"parameters": {"intra_op_threads": 2}}, "models.m.parameters.intra_op_threads: unknown parameter"),
    ({"parameters": {"intra_op_thread_count": {"string_value": "two"}}},
     "models.m.parameters.intra_op_thread_count: must be an integer, got 'two'"),
    ({"parameters": {"intra_op_thread_count": 257}}, "intra_op_thread_count: must be in [0, 256], got 257"),
    ({"parameters": {"inter_op_thread_count": 0}}, "inter_op_thread_count: must be in [1, 64], got 0"),
    ({"parameters": {"intra_op_thread_count": {"value": "2"}}}, "must be {string_value: \"N\"} or a number"),
    ({"variant": "fp16"}, "models.m.variant: must be one of fp32, int8"),
    ({"parameters": {"lone_request_thread_count": -1}}, "lone_request_thread_count: must be in [0, 256], got -1"),
    ({"parameters": {"lone_request_thread_count": 300}}, "lone_request_thread_count: must be in [0, 256], got 300"),
    ({"tag": "m:abc", "variant": "int8"}, "names a version of the fp32 entry and variant 'int8' is set"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_out_of_bounds_execution_settings_are_refused_naming_the_key(text, message):
    with pytest.raises(SettingsError) as raised:
        entry(text)
    assert message in str(raised.value)


def test_threads_above_the_cores_warn_naming_the_oversubscription(tmp_path, caplog):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  digits: {tag: digits, parameters: {intra_op_thread_count: {string_value: '8'}}}\n"
                      "  quiet: {tag: quiet, instance_group: [{count: 2}]}\n")
    with caplog.at_level(logging.WARNING, logger="nnserve.settings"):
        settings = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_CPUS": "4",
                                      "NNSERVE_WORKERS": "2"})
    warnings = [r.getMessage() for r in caplog.records if "oversubscription" in r.getMessage()]
    assert len(warnings) == 1, warnings  # quiet: 2 workers x 2 instances x 1 thread (its default) fit 4 cores
    assert "'digits'" in warnings[0] and "2 worker(s) x 1 instance(s) x 8 thread(s)" in warnings[0]
    assert "= 16 threads on 4 cores" in warnings[0]
    assert settings.threads_for(settings.model("quiet")) == 1


# -- instances run batches at once ---------------------------------------------------------------------------

def concurrent_calls(instances: int, requests_: int = 4) -> int:
    """The most model calls that ran at once while ``requests_`` one-item requests were served."""
    running, most = 0, 0
    lock = threading.Lock()

    def model(feeds):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.2)
        with lock:
            running -= 1
        return {"y": feeds["x"] * 2}

    batcher = DynamicBatcher("m", [model] * instances, lambda name: 0, BatchingConfig(max_batch_size=1))

    async def go() -> list:
        return await asyncio.gather(*(batcher.infer({"x": np.full((1, 2), i, np.float32)}) for i in range(requests_)))

    try:
        results = asyncio.run(go())
    finally:
        batcher.close()
    assert [float(out["y"][0, 0]) for out, _ in results] == [2.0 * i for i in range(requests_)]
    return most


def test_a_lone_batch_runs_on_the_lone_request_session_and_a_busy_batcher_on_the_instances():
    """Adaptive: the lone-request session (all cores) runs a batch that is the only work; while another batch
    runs, or more wait, the instances' own sessions run them."""
    calls: list[str] = []
    lock = threading.Lock()

    def session(name: str):
        def run(feeds):
            with lock:
                calls.append(name)
            time.sleep(0.1)
            return {"y": feeds["x"] + 1}
        return run

    batcher = DynamicBatcher("m", [session("a"), session("b")], lambda name: 0, BatchingConfig(max_batch_size=1),
                             lone=session("lone"))

    async def one() -> None:
        await batcher.infer({"x": np.zeros((1, 2), np.float32)})

    async def several() -> None:
        await asyncio.gather(*(batcher.infer({"x": np.zeros((1, 2), np.float32)}) for _ in range(4)))

    try:
        asyncio.run(one())
        asyncio.run(one())
        assert calls == ["lone", "lone"]
        calls.clear()
        asyncio.run(several())
    finally:
        batcher.close()
    assert len(calls) == 4 and calls.count("lone") <= 1, calls  # the last one may find the batcher alone
    assert {"a", "b"} <= set(calls), calls


def test_each_instance_runs_its_own_batch_at_the_same_time():
    assert concurrent_calls(1) == 1
    assert concurrent_calls(2) == 2
    assert concurrent_calls(3, requests_=6) == 3


# -- a real server, changed live ----------------------------------------------------------------------------

def register_int8(source_tag: str, name: str, passed: bool) -> str:
    """A copy of ``source_tag`` registered as an INT8 entry ``name`` whose accuracy gate passed or not."""
    import shutil
    from pathlib import Path

    import bentoml

    source = bentoml.models.get(source_tag)
    metadata = dict(source.info.metadata)
    metadata |= {"variant": "int8", "parity": {"reference": "fp32 ONNX graph", "top1_drop_points": 9.0,
                                               "passed": passed}}
    with bentoml.models.create(name, metadata=metadata, labels=dict(source.info.labels)) as model:
        for path in Path(source.path).iterdir():
            if path.is_file() and path.name != "model.yaml":
                shutil.copy2(path, model.path_of(path.name))
    return str(model.tag)


@pytest.fixture(scope="module")
def server(own_server, tiny_store, session_dir):
    store_copy(tiny_store["lenet5"], "exec-digits")
    register_int8(tiny_store["lenet5"], "exec-digits-int8", passed=False)
    config = session_dir / "execution-models.yaml"
    config.write_text(json.dumps({"models": {"digits": {"tag": "exec-digits"}}}))
    token = session_dir / "execution-token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    env = {"NNSERVE_MANAGEMENT_TOKEN_FILE": str(token), "NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_WORKERS": "2",
           "NNSERVE_CPUS": "2", "NNSERVE_STATE_DIR": str(session_dir / "execution-state"),
           "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    with own_server("execution", env) as live:
        yield live


def load(server, config: dict) -> requests.Response:
    return requests.post(f"{server.http_url}/v2/repository/models/digits/load", timeout=300,
                         json={"parameters": {"config": json.dumps(config)}}, headers=AUTH | {"connection": "close"})


def triton_config(server) -> dict:
    return requests.get(f"{server.http_url}/v2/models/digits/config", timeout=30).json()


def classify(server) -> requests.Response:
    from tests.test_served_state import png

    return requests.post(f"{server.http_url}/classify", files={"image": png()}, data={"model": "digits"}, timeout=60)


def every_worker_describes(server, check, attempts: int = 20) -> dict:
    """GET /models on new connections until answers from both workers (by pid) pass ``check``."""
    seen = {}
    for _ in range(attempts):
        response = requests.get(f"{server.http_url}/models", timeout=30, headers={"connection": "close"})
        model = next(m for m in response.json()["models"] if m["name"] == "digits")
        assert check(model), model
        seen[response.headers.get("x-nnserve-worker", len(seen))] = model
    return seen


def test_threads_and_instances_change_live_in_every_worker(server):
    config = triton_config(server)
    assert config["instance_group"][0]["count"] == 1
    assert config["parameters"]["intra_op_thread_count"]["string_value"] == "1"  # 2 cores / 2 workers
    assert config["parameters"]["workers"]["string_value"] == "2"

    answer = load(server, {"instance_group": [{"count": 2}], "parameters": {"intra_op_thread_count": 1}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["workers"] == 2
    warning = answer.json()["warnings"][0]  # 2 workers x 2 instances x 1 thread on 2 cores
    assert "oversubscription" in warning and "= 4 threads on 2 cores" in warning, warning
    config = triton_config(server)
    assert config["instance_group"][0]["count"] == 2
    every_worker_describes(server, lambda m: m["execution"]["instances"] == 2
                           and m["execution"]["intra_op_threads"] == 1 and m["batching"]["max_batch_size"] == 32)
    assert classify(server).status_code == 200

    answer = load(server, {"instance_group": [{"count": 1}], "parameters": {"intra_op_thread_count": 2,
                                                                          "inter_op_thread_count": 1}})
    assert answer.status_code == 200, answer.text
    assert "oversubscription" in answer.json()["warnings"][0]  # 2 workers x 2 threads on 2 cores
    assert triton_config(server)["parameters"]["intra_op_thread_count"]["string_value"] == "2"
    every_worker_describes(server, lambda m: m["execution"]["instances"] == 1
                           and m["execution"]["intra_op_threads"] == 2)
    assert classify(server).status_code == 200

    answer = load(server, {"instance_group": [{"count": 2}], "parameters": {"intra_op_thread_count": 0,
                                                                          "lone_request_thread_count": 1}})
    assert answer.status_code == 200, answer.text
    every_worker_describes(server, lambda m: m["execution"]["instances"] == 2
                           and m["execution"]["lone_request_threads"] == 1)
    assert classify(server).status_code == 200

    answer = load(server, {"instance_group": [{"count": 1}],  # back to the default: no warning
                           "parameters": {"intra_op_thread_count": 0, "lone_request_thread_count": 0}})
    assert answer.status_code == 200 and "warnings" not in answer.json(), answer.text
    assert triton_config(server)["parameters"]["intra_op_thread_count"]["string_value"] == "1"


@pytest.mark.parametrize(("config", "named"), [
    ({"instance_group": [{"count": 0}]}, "instance_group[0].count: must be in [1, 16], got 0"),
    ({"parameters": {"intra_op_thread_count": {"string_value": "-1"}}}, "intra_op_thread_count: must be an integer"),
    ({"variant": "bf16"}, "variant: must be one of fp32, int8"),
])
def test_bad_execution_settings_are_refused_naming_the_key(server, config, named):
    answer = load(server, config)
    assert answer.status_code == 400 and named in answer.json()["error"], answer.text


def test_an_int8_variant_whose_gate_failed_is_never_served(server):
    before = triton_config(server)["parameters"]["store_tag"]["string_value"]
    answer = load(server, {"variant": "int8"})
    assert answer.status_code == 400, answer.text
    assert "accuracy gate did not pass" in answer.json()["error"] and "rolled back" in answer.json()["error"]
    assert triton_config(server)["parameters"]["store_tag"]["string_value"] == before
    assert classify(server).status_code == 200
