"""Faults against real servers (each test starts its own on the session store, tiny models, 2 workers):
a worker SIGKILLed under load, a model whose ONNX file is truncated, SIGTERM with streams in flight, bodies
of 40-64 MiB past every limit.

The scenarios live in loadtest/faults.py (``python -m loadtest.faults`` measures the same on the real
models for docs/reliability.md). No timing is asserted: times are recorded in the report, which a
failing assertion prints."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from loadtest.faults import (
    corrupt_model_report,
    digit_png,
    kill_worker_under_load,
    large_bodies,
    sigterm_with_streams,
    truncated_copy,
)

pytestmark = pytest.mark.integration

WORKERS = {"NNSERVE_WORKERS": "2", "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}  # no 503 from a busy CI box


@pytest.fixture(scope="module")
def image() -> bytes:
    return digit_png()


def test_a_killed_worker_costs_only_its_in_flight_requests(own_server, image):
    threads = 4
    with own_server("faults-kill", WORKERS) as server:
        report = kill_worker_under_load(server, image, threads=threads, before_s=2.0, after_s=5.0)
        # The issue saw SIGTERM not finish within 60 s after a worker kill: it must stop as usual.
        server.process.send_signal(signal.SIGTERM)
        try:
            report["sigterm_returncode"] = server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            report["sigterm_returncode"] = None
        log = server.log()
    why = json.dumps(report, indent=1) + "\n" + log
    assert report["sigterm_returncode"] is not None, why
    # Each client thread has one request in flight (or one idle connection to the dead worker): at most
    # one failure per thread, none of them an HTTP error from a worker that was still alive.
    assert report["failed"] <= threads, why
    assert all(not status.isdigit() for status in report["failed_statuses"]), why
    assert report["first_success_after_kill_s"] is not None, why
    assert report["first_clean_second"] is not None, why
    assert report["replacement_serving_s"] is not None, why  # its replacement loaded and serves
    # circus replaced the victim; the other worker is the same process
    assert report["victim"] not in report["workers_after"] and len(report["workers_after"]) == 2, why
    assert set(report["workers_before"]) - {report["victim"]} <= set(report["workers_after"]), why
    # Health kept answering 200 throughout, never a hang or an error: the surviving worker answers, and
    # the restarted one accepts connections only once its models are loaded. Only a probe the victim had
    # accepted when it was killed may die with it (probes run every 50 ms and take ~2 ms: rare).
    for path in ("/livez", "/readyz"):
        health = report["health"][path]
        assert health["failed_not_in_flight_at_kill"] == 0, why
        assert health["statuses"].get("200", 0) >= sum(health["statuses"].values()) - 1, why


def test_a_truncated_model_fails_alone_with_its_reason(own_server, image, tiny_store):
    tag = truncated_copy(tiny_store["lenet5"], "lenet5-truncated")
    with own_server("faults-corrupt", {**WORKERS, "NNSERVE_LENET5_TAG": tag}, ready_path="/livez") as server:
        report = corrupt_model_report(server, image, watch_s=5.0)
        log = server.log()
    why = json.dumps(report, indent=1)[:6000] + "\n" + log
    assert report["workers_after"] == report["workers_before"], f"crash loop: {why}"
    classify = report["classify_lenet5"]
    assert classify["status"] == 503, why
    assert "failed to load" in classify["body"]["error"] and "lenet5" in classify["body"]["error"], why
    assert report["features_vgg_fc7"]["status"] == 200, why
    assert report["generate_char_lstm"]["status"] == 200, why
    models = {m["name"]: m for m in report["models"]["body"]["models"]}
    assert models["lenet5"]["state"] == "failed" and models["lenet5"]["reason"], why
    assert all(models[n]["state"] == "ready" for n in ("vgg_fc7", "char_lstm", "char_gru")), why
    assert report["v2_lenet5_ready"]["status"] != 200, why
    assert report["livez"]["status"] == 200, why
    readyz = report["readyz"]
    assert readyz["status"] == 503, why
    # --- /readyz JSON body (service/front.py on main): says why, per model -------------------------------
    body = readyz["body"]
    assert isinstance(body, dict) and body["ready"] is False, why
    assert "lenet5" in body["reason"] and "failed to load" in body["reason"], why
    assert body["models"]["lenet5"]["state"] == "failed" and body["models"]["lenet5"]["reason"], why
    assert body["models"]["vgg_fc7"]["state"] == "ready", why
    # --- end of the /readyz JSON body --------------------------------------------------------------------
    ready = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in report["metric_lines"]}
    assert ready.get('model="lenet5"') == 0.0 and ready.get('model="vgg_fc7"') == 1.0, why


def test_sigterm_lets_open_streams_finish_and_exits(own_server):
    # One decode slot: the 6 streams run one after the other, so several are still open at SIGTERM
    # (on tiny models a 2000-character stream alone takes well under a second).
    env = {**WORKERS, "NNSERVE_GENERATION_BATCH_SIZE": "1", "NNSERVE_DRAIN_TIMEOUT_S": "120"}
    with own_server("faults-sigterm", env) as server:
        report = sigterm_with_streams(server, streams=6, max_new_chars=2000, exit_bound_s=120 + 60)
        log = server.log()
    why = json.dumps(report, indent=1) + "\n" + log
    assert report["complete"] == 6, why  # every stream in flight at SIGTERM got all its characters
    # New requests after SIGTERM stop being served while the streams drain (BentoML's arbiter keeps the
    # listening socket until the workers are gone: a new connection waits unanswered, then is reset or
    # refused; see docs/reliability.md).
    assert report["first_unserved_probe_s"] is not None, why
    assert report["exit_s"] is not None and report["returncode"] is not None, why


def test_sigterm_cuts_streams_past_the_drain_bound(own_server):
    # 16 streams, one decode slot per worker: 8 in a row per worker, about 2-3 s of work even on a fast box
    # (a tiny-model stream of 2000 characters takes 0.2-0.4 s), against the smallest bound, 1 s.
    env = {**WORKERS, "NNSERVE_GENERATION_BATCH_SIZE": "1", "NNSERVE_DRAIN_TIMEOUT_S": "1"}
    with own_server("faults-drain-bound", env) as server:
        report = sigterm_with_streams(server, streams=16, max_new_chars=2000, exit_bound_s=1 + 60)
        log = server.log()
    why = json.dumps(report, indent=1) + "\n" + log
    assert report["exit_s"] is not None, why  # exited within the bound + a margin for the hooks
    # It did not wait for everything: the streams still queued behind the single decode slot were cut,
    # answered 503 (retry elsewhere), not uvicorn's 500.
    assert report["complete"] < 16, why
    assert all(s["status"] in (200, 503) for s in report["streams"]), why


def test_large_bodies_are_refused_without_being_kept(own_server):
    """40-64 MiB bodies to /classify, /generate (past their limits: 413) and /v2 (read whole up to its
    64 MiB limit: 400 not JSON, then 413), with Content-Length and chunked; the worker's memory does not
    keep them (the issue saw +105 MiB kept after such a run). 32 MiB of slack: under one body, far over
    allocator noise (measured: docs/reliability.md)."""
    with own_server("faults-large", {"NNSERVE_WORKERS": "1"}) as server:
        report = large_bodies(server, rounds=2)
    why = json.dumps(report, indent=1)
    hows = ("content-length", "chunked")
    assert set(report["statuses"]) == ({f"{kind} {how} 413" for kind in ("classify", "generate", "v2") for how in hows}
                                       | {f"v2 {how} 400" for how in hows}), why
    assert report["growth_mib"] and all(g < 32 for g in report["growth_mib"].values()), why
