"""The soak run (loadtest/soak.py, ``make soak`` for 10 minutes) for seconds on the tiny models: mixed
load against a real server with 2 workers, RSS of every server process sampled each second, the CSV,
JSON and PNG written, every answer the expected one, and no worker growing past the bound after the
warm-up."""

from __future__ import annotations

import csv
import json

import pytest

from loadtest.soak import DEFAULT_BOUND_MIB, soak

pytestmark = pytest.mark.integration


def test_soak_memory_stays_within_the_bound(own_server, session_dir):
    out = session_dir / "soak"
    with own_server("soak", {"NNSERVE_WORKERS": "2", "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}) as server:
        summary = soak(server, seconds=15, warmup_s=5, bound_mib=DEFAULT_BOUND_MIB, out_dir=out, progress_s=5)
        log = server.log()
    why = json.dumps(summary, indent=1) + "\n" + log[-5000:]
    with open(out / "soak.csv") as f:
        rows = list(csv.DictReader(f))
    roles = {row["role"] for row in rows}
    assert {"arbiter", "worker-1", "worker-2"} <= roles, why  # every server process sampled
    assert len([r for r in rows if r["role"] == "worker-1"]) >= 10, why  # about once a second
    assert json.loads((out / "soak.json").read_text()) == summary
    assert (out / "soak-rss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*")), "a temp file was left behind"
    # Every kind of request ran and got its expected answer (503s, load shed, are counted apart).
    assert set(summary["expected"]) == {"classify", "features", "generate", "generate_stream", "v2", "bad"}, why
    assert summary["unexpected"] == {}, why
    assert summary["restarted_workers"] == 0, why
    assert summary["within_bound"], why
