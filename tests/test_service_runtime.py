"""service/runtime.py without a server: provider choice, tags from configuration, the input guard in
front of the adaptive batcher, and the remote view of a model that another process runs."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from service.runtime import ClientError, choose_providers, load_remote, load_runtime, model_tag


def test_providers_keep_the_requested_order_and_only_available_ones(caplog):
    available = ort.get_available_providers()
    with caplog.at_level(logging.INFO, logger="nnserve.runtime"):
        chosen = choose_providers(["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider skipped: not available" in caplog.text  # the reason is logged
    default = choose_providers()
    assert default[-1] == "CPUExecutionProvider" and set(default) <= set(available)
    for gpu in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        assert (gpu in default) == (gpu in available)


def test_providers_from_the_environment(monkeypatch):
    monkeypatch.setenv("NNSERVE_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    want = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    assert choose_providers() == [*want, "CPUExecutionProvider"]


def test_model_tag_is_configurable_per_model(monkeypatch):
    assert model_tag("lenet5") == "lenet5:latest"
    monkeypatch.setenv("NNSERVE_LENET5_TAG", "lenet5-int8:abc")
    assert model_tag("lenet5") == "lenet5-int8:abc"
    assert model_tag("vgg_fc7") == "vgg_fc7:latest"


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
    assert lenet5.warmup((1, 3)) >= 0


def test_ort_thread_spinning_is_off_unless_configured(tiny_store, monkeypatch):
    def spinning(runtime) -> str:
        return runtime.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning(load_runtime("lenet5", tiny_store["lenet5"])) == "0"
    monkeypatch.setenv("NNSERVE_ORT_SPINNING", "1")
    assert spinning(load_runtime("lenet5", tiny_store["lenet5"])) == "1"


@pytest.mark.parametrize("feeds, words", [
    ({"input": np.zeros((1, 1, 28, 28), np.float32)}, "shape [1, 1, 28, 28]"),
    ({"input": np.zeros((1, 1, 32, 32), np.float64)}, "must be float32"),
    ({"input": np.zeros((0, 1, 32, 32), np.float32)}, "shape [0, 1, 32, 32]"),
    ({"input": np.zeros((1, 32, 32), np.float32)}, "shape [1, 32, 32]"),
    ({"pixels": np.zeros((1, 1, 32, 32), np.float32)}, "takes inputs ['input']"),
    ({"input": [[0.0]]}, "must be float32, got list"),
])
def test_check_feeds_rejects_what_would_break_a_merged_batch(lenet5, feeds, words):
    with pytest.raises(ClientError) as info:
        lenet5.check_feeds(feeds)
    assert words in str(info.value)


def test_check_feeds_accepts_any_batch(lenet5):
    for batch in (1, 5):
        lenet5.check_feeds({"input": np.zeros((batch, 1, 32, 32), np.float32)})


def test_remote_model_describes_the_model_as_the_running_process_reported(lenet5):
    remote = load_remote("lenet5", lenet5.signature())
    assert remote.describe() == lenet5.describe()
    assert [i.name for i in remote.session.get_inputs()] == [i.name for i in lenet5.session.get_inputs()]
    assert remote.session.get_inputs()[0].shape == lenet5.session.get_inputs()[0].shape
    assert not hasattr(remote, "run")  # it only describes: the other process runs it


def test_warmup_sizes_cover_the_served_batch_shapes():
    from service.service import warmup_sizes

    assert warmup_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert warmup_sizes(24) == (1, 2, 4, 8, 16, 24)
    assert warmup_sizes(1) == (1,)


@pytest.fixture(scope="module")
def char_gru(tiny_store):
    return load_runtime("char_gru", tiny_store["char_gru"])


@pytest.mark.parametrize("tokens, state_batch, words", [
    ([[-1]], 1, "must be in [0,"),  # ONNX Gather would wrap a negative id silently
    ([[10 ** 6]], 1, "must be in [0,"),
    ([[1], [2]], 1, "has batch 1 (dim 1) but tokens has batch 2"),
])
def test_check_feeds_guards_text_models(char_gru, tokens, state_batch, words):
    feeds = char_gru.example_feeds(state_batch)
    feeds["tokens"] = np.array(tokens, dtype=np.int64)
    with pytest.raises(ClientError) as info:
        char_gru.check_feeds(feeds)
    assert words in str(info.value)
    char_gru.check_feeds(char_gru.example_feeds(2, seq_len=3))  # the well-formed feeds pass


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
