"""service/runtime.py, the model kinds and settings.py without a server: provider choice, settings from the
environment, what each model kind knows, and the BentoML timer fix."""

from __future__ import annotations

import logging
import os
from dataclasses import fields

import onnxruntime as ort
import pytest

from models.runtime import choose_providers
from service.repository import warmup_sizes
from service.runtime import load_runtime
from service.settings import Settings, SettingsError


def test_providers_keep_the_requested_order_and_only_available_ones(caplog):
    available = ort.get_available_providers()
    with caplog.at_level(logging.INFO, logger="nnserve.runtime"):
        chosen = choose_providers(["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider skipped: not available" in caplog.text  # the reason is logged
    default = choose_providers(Settings().providers)
    assert default[-1] == "CPUExecutionProvider" and set(default) <= set(available)
    for gpu in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        assert (gpu in default) == (gpu in available)


def test_providers_from_the_environment(monkeypatch):
    monkeypatch.setenv("NNSERVE_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    want = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    assert choose_providers(Settings.from_env().providers) == [*want, "CPUExecutionProvider"]


def test_missing_model_says_how_to_create_it():
    with pytest.raises(RuntimeError, match="make export"):
        load_runtime("lenet5", "lenet5:doesnotexist")


@pytest.fixture(scope="module")
def lenet5(tiny_store):
    return load_runtime("lenet5", tiny_store["lenet5"])


def test_runtime_reports_its_provider_and_tensors(lenet5, tiny_store):
    info = lenet5.describe()
    assert f"{info['name']}:{info['version']}" == tiny_store["lenet5"] == info["store_tag"]
    assert info["provider"] == lenet5.session.get_providers()[0] and info["provider"] in ort.get_available_providers()
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 1, 32, 32]}]
    assert len(info["labels"]) == 10 and info["preprocessing"]["input_size"] == 32
    # warmup runs exactly the served batch shapes (ORT's first call per shape is the slow one)
    feeds = lenet5.kind_module.warmup_feeds(lenet5.metadata, lenet5.inputs, (1, 3))
    assert [f["input"].shape for f in feeds] == [(1, 1, 32, 32), (3, 1, 32, 32)]
    assert isinstance(lenet5.warmup((1, 3)), float)


def test_ort_thread_spinning_is_off_unless_configured(tiny_store, monkeypatch):
    def spinning(runtime) -> str:
        return runtime.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning(load_runtime("lenet5", tiny_store["lenet5"])) == "0"
    monkeypatch.setenv("NNSERVE_ORT_SPINNING", "1")  # read through Settings.from_env()
    assert spinning(load_runtime("lenet5", tiny_store["lenet5"])) == "1"


def test_kinds_own_the_batch_axes_and_example_inputs(lenet5, tiny_store):
    gru = load_runtime("char_gru", tiny_store["char_gru"])
    assert [lenet5.batch_axis(t.name) for t in lenet5.inputs + lenet5.outputs] == [0, 0]
    assert {t.name: gru.batch_axis(t.name) for t in gru.inputs + gru.outputs} == {
        "tokens": 0, "h": 1, "logits": 0, "h_out": 1}
    feeds = gru.example_feeds(3, seq_len=5)
    assert feeds["tokens"].shape == (3, 5) and feeds["h"].shape[1] == 3
    assert lenet5.example_feeds(2)["input"].shape == (2, 1, 32, 32)
    assert gru.describe()["vocab_size"] == len(gru.metadata["vocab"])
    assert lenet5.describe()["parity"] == lenet5.metadata["parity"]  # the export's certificate


def test_warmup_sizes_cover_the_served_batch_shapes():
    assert warmup_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert warmup_sizes(24) == (1, 2, 4, 8, 16, 24)
    assert warmup_sizes(1) == (1,)


def test_settings_from_the_environment_are_typed_and_validated():
    settings = Settings.from_env({"NNSERVE_WORKERS": "3", "NNSERVE_MAX_QUEUE_DELAY_MS": "2.5",
                                  "NNSERVE_PREFERRED_BATCH_SIZES": "4, 8", "NNSERVE_ACCESS_LOG": "true",
                                  "NNSERVE_LENET5_TAG": "lenet5-int8:abc", "NNSERVE_VGG_FC7_MAX_QUEUE_DELAY_MS": "4"})
    assert (settings.queue_delay_ms("vgg_fc7"), settings.queue_delay_ms("lenet5")) == (4.0, 2.5)
    assert "vgg_fc7: tag='vgg_fc7:latest' max_batch_size=32 max_queue_delay_ms=4.0" in settings.describe()
    assert (settings.workers, settings.max_queue_delay_ms, settings.preferred_batch_sizes) == (3, 2.5, (4, 8))
    assert settings.access_log is True and settings.model_tags["lenet5"] == "lenet5-int8:abc"
    assert settings.model_tags["vgg_fc7"] == "vgg_fc7:latest"
    assert "NNSERVE_MAX_QUEUE_SIZE = 128" in settings.describe()
    assert settings.header_timeout_s == 60.0 and settings.management_token_file == ""  # management off by default
    assert Settings.from_env({"NNSERVE_HEADER_TIMEOUT_S": "0.5"}).header_timeout_s == 0.5
    for env, words in [({"NNSERVE_WORKERS": "two"}, "NNSERVE_WORKERS='two' is not a valid int"),
                       ({"NNSERVE_WORKERS": "0"}, "NNSERVE_WORKERS must be >= 1"),
                       ({"NNSERVE_ACCESS_LOG": "maybe"}, "NNSERVE_ACCESS_LOG"),
                       ({"NNSERVE_PREFERRED_BATCH_SIZES": "64"}, "NNSERVE_PREFERRED_BATCH_SIZES"),
                       ({"NNSERVE_LOG_LEVEL": "LOUD"}, "NNSERVE_LOG_LEVEL"),
                       ({"NNSERVE_HEADER_TIMEOUT_S": "0"}, "NNSERVE_HEADER_TIMEOUT_S must be a number of seconds > 0"),
                       ({"NNSERVE_HEADER_TIMEOUT_S": "-5"}, "NNSERVE_HEADER_TIMEOUT_S"),
                       ({"NNSERVE_HEADER_TIMEOUT_S": "nan"}, "NNSERVE_HEADER_TIMEOUT_S"),
                       ({"NNSERVE_HEADER_TIMEOUT_S": "inf"}, "NNSERVE_HEADER_TIMEOUT_S"),
                       ({"NNSERVE_MAX_QUEUE_DELAY_MS": "2000"}, "NNSERVE_QUEUE_TIMEOUT_MS"),
                       ({"NNSERVE_VGG_FC7_MAX_QUEUE_DELAY_MS": "-1"}, "NNSERVE_VGG_FC7_MAX_QUEUE_DELAY_MS"),
                       ({"NNSERVE_VGG_FC7_MAX_QUEUE_DELAY_MS": "5000"}, "NNSERVE_VGG_FC7_MAX_QUEUE_DELAY_MS")]:
        with pytest.raises(SettingsError, match=words):
            Settings.from_env(env)


def test_every_setting_is_documented_in_one_table():
    from pathlib import Path

    documented = (Path(__file__).resolve().parent.parent / "docs" / "service.md").read_text()
    for f in fields(Settings):
        name = {"models": "NNSERVE_MODELS_CONFIG"}.get(f.name, f"NNSERVE_{f.name.upper()}")
        assert f"`{name}`" in documented, name


def test_threads_per_session_never_oversubscribe_the_cores():
    cores = os.cpu_count() or 1
    assert Settings(workers=1).threads_per_session() == cores
    assert Settings(workers=cores * 2).threads_per_session() == 1
    assert Settings(workers=1, intra_op_threads=3).threads_per_session() == 3
    # A pod's CPU limit (NNSERVE_CPUS), not the node's cores: 2 workers on 2 CPUs get one thread each.
    assert Settings(workers=2, cpus=2).threads_per_session() == 1
    assert Settings.from_env({"NNSERVE_CPUS": "4", "NNSERVE_WORKERS": "2"}).threads_per_session() == 2


# ---- service/bentoml_fixes.py: BentoML's request timeout timer is cancelled once the request is over ----

def run_through_timeout_middleware(app, timeout: float, requests: int) -> tuple[list[dict], list]:
    """Drive BentoML's TimeoutMiddleware (as the server wraps every request) in a fresh event loop:
    the messages sent back, and its timeout timers still pending when the requests are done."""
    import asyncio

    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from service import bentoml_fixes

    bentoml_fixes.apply()
    middleware, sent = TimeoutMiddleware(app, timeout=timeout), []

    async def main() -> list:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        for _ in range(requests):
            await middleware({"type": "http", "path": "/"}, receive, send)
        timers = asyncio.get_running_loop()._scheduled  # noqa: SLF001 (what leaked is the point)
        return [h for h in timers if not h.cancelled() and h._callback == middleware._set_timer_out]  # noqa: SLF001

    return sent, asyncio.run(main())


async def ok_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_finished_requests_leave_no_timeout_timer_behind():
    sent, pending = run_through_timeout_middleware(ok_app, timeout=300, requests=50)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200] * 50
    assert pending == []  # unpatched BentoML 1.4.39: 50 timers, each holding its request for 300 s


def test_a_request_over_the_timeout_still_gets_504():
    import asyncio

    async def slow_app(scope, receive, send) -> None:
        await asyncio.sleep(30)

    sent, pending = run_through_timeout_middleware(slow_app, timeout=0.05, requests=1)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [504]
    assert pending == []
