"""Scale-out with real servers behind a real HAProxy (deploy/cluster.py): a replica SIGKILLed under load
costs no request (the balancer retries on another replica), a replica drained and SIGTERMed finishes its
streams, a restarted one takes traffic again, and a rolling update moves lenet5 from version A to B with
no failed request (a 503 or a cut stream is a failure). Short runs (seconds of load); ``make cluster`` is
the long version with the numbers."""

from __future__ import annotations

import json
import os

import pytest

from deploy import cluster as dc

pytestmark = pytest.mark.integration

try:
    dc.haproxy_binary()
    HAPROXY = True
except RuntimeError:
    HAPROXY = False


@pytest.fixture(scope="module")
def version_b(tiny_artifacts, tiny_store, session_dir) -> str:
    """A second version of lenet5 in the store (the same artifact exported again), deleted afterwards so
    that ``lenet5:latest`` is again what other tests registered."""
    import bentoml

    from export.pipeline import Options, export_artifact

    opts = Options(bench_runs=3, report_dir=session_dir / "exported-b")
    tag = export_artifact(tiny_artifacts["lenet5"], opts).tags["fp32"]
    assert tag != tiny_store["lenet5"]
    yield tag
    bentoml.models.delete(tag)


@pytest.fixture(scope="module")
def env(tiny_store) -> dict[str, str]:
    # As live_server: a generous queue timeout, so a busy CI box sheds no request with 503.
    return {"BENTOML_HOME": os.environ["BENTOML_HOME"], "NNSERVE_QUEUE_TIMEOUT_MS": "60000",
            **{f"NNSERVE_{kind.upper()}_TAG": tag for kind, tag in tiny_store.items()}}


@pytest.mark.skipif(not HAPROXY, reason="haproxy not installed (apt-get install -y haproxy); `make cluster` "
                                        "installs it")
def test_kill_drain_restart_and_roll_behind_haproxy(env, tiny_store, version_b, tmp_path):
    image = dc.png_digit()
    with dc.cluster(env, workdir=tmp_path) as c:
        c.start_haproxy(check_ms=300)
        for name in ("r1", "r2"):
            c.spawn(name)
        for name in ("r1", "r2"):
            c.wait_ready(name)
            c.wait_status(name, "UP", timeout_s=20)
        logs = lambda: "\n".join(s.server.log(3000) for s in c.slots if s.server)  # noqa: E731

        killed = dc.scenario_kill(c, image, "r2", seconds=4, threads=3)
        # HAProxy replays every request the dead replica had not started to answer; an answer it was writing
        # at the SIGKILL instant (its headers out, its body not) cannot be replayed and reaches the client cut.
        # So at most one per load thread may be cut, none may get an error status, and nothing else may fail.
        # (Seen in CI: 1 cut of 4,715; drain and roll below, the planned exits, must cost none at all.)
        around, whole = killed["around_kill"], killed["whole_run"]
        assert around["failed_non_2xx"] == {} and around["failed_no_answer_or_cut"] <= 3, (killed, logs())
        assert whole["failed"] == around["failed"], killed
        assert killed["restart_to_first_request_s"] is not None, killed  # the restarted replica serves again

        drained = dc.scenario_drain(c, image, "r2", threads=2, streams=2, stream_chars=1500, pre_stop_s=1.0)
        assert drained["classify"]["failed"] == 0 and drained["streams"]["failed"] == 0, (drained, logs())
        assert drained["streams_open_on_victim_at_drain"] >= 1, drained  # the drain had streams to finish
        assert drained["streams_on_victim_finished"] == drained["streams_on_victim"] >= 1, drained

        c.spawn("r2")
        c.wait_ready("r2")
        c.wait_status("r2", "UP", timeout_s=20)
        a, b = tiny_store["lenet5"], version_b
        rolled = dc.scenario_roll(c, image, ["r1", "r2"], ["r3", "r4"], {"NNSERVE_LENET5_TAG": b}, threads=2,
                                  pre_stop_s=1.0)
        assert rolled["failed"] == 0, (rolled, logs())
        assert rolled["first_version"] == a and rolled["last_version"] == b, rolled
        assert rolled["versions"] == sorted([a, b]), rolled
        assert c.status()["r1"].startswith(("DOWN", "MAINT", "DRAIN")) and c.status()["r3"].startswith("UP")
        print(json.dumps({"kill": killed, "drain": drained, "roll": rolled}, indent=1))


def test_a_503_or_a_cut_stream_counts_as_a_failure():
    """The rule the rollout and drain numbers are judged by: only a 2xx answer with the whole stream is ok.
    A 503 (shed under load, or a replica shutting down) is a request the client did not get served."""
    ok = dc.Result("classify", 0.0, 0.1, 200, "r1", "lenet5:a")
    shed = dc.Result("classify", 0.1, 0.1, 503, "r2", error="server busy")
    cut = dc.Result("stream", 0.2, 0.5, 200, "r1", complete=False)
    no_answer = dc.Result("classify", 0.3, 0.1, None, error="ConnectionError")
    created = dc.Result("classify", 0.4, 0.1, 201, "r1")
    report = dc.summary([ok, shed, cut, no_answer, created, dc.Result("classify", 0.5, 0.1, 404)])
    assert (report["ok"], report["failed"]) == (2, 4), report
    assert report["failed_non_2xx"] == {"404": 1, "503": 1} and report["failed_no_answer_or_cut"] == 2, report
    assert "shed_503" not in report
    assert dc.summary([ok, shed])["failed"] == 1
