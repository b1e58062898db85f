"""The locust load test (loadtest/locustfile.py) against the session's real server.

Locust runs as a subprocess, as users run it: importing it here would gevent-monkey-patch pytest itself.
Nothing here asserts on timings: the passing run gets budgets no machine can miss, the failing run
budgets no machine can meet (or an error rate no run can stay under).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.locust_runner import BUDGETS, USER_CLASSES
from loadtest.locust_runner import run_locust as locust

pytestmark = pytest.mark.integration

DEFAULT_BUDGETS = json.loads(BUDGETS.read_text())
NEVER_MISSED = {"p50_ms": 600_000, "p95_ms": 600_000, "p99_ms": 600_000, "max_error_rate": 0.0}


def run_locust(server, tmp_path: Path, name: str, budgets: dict, users: int, seconds: int,
               classes: tuple[str, ...], generate_chars: int = 20) -> tuple[int, str, dict[str, dict]]:
    """The bench's run_locust with a budget table written for this test; (exit code, output, CSV rows)."""
    budgets_path = tmp_path / f"{name}-budgets.json"
    budgets_path.write_text(json.dumps(budgets))
    run = locust(server.http_url, classes, users, seconds, tmp_path, name=name, budgets=budgets_path,
                 generate_chars=generate_chars)
    assert run.rows, f"locust wrote no stats (exit {run.returncode}):\n{run.output[-5000:]}"
    return run.returncode, run.output, run.rows


def test_every_endpoint_under_load_without_failures(live_server, tmp_path):
    budgets = {endpoint: NEVER_MISSED for endpoint in DEFAULT_BUDGETS}
    rc, output, rows = run_locust(live_server, tmp_path, "all", budgets, users=len(USER_CLASSES), seconds=8,
                                  classes=USER_CLASSES)
    context = f"locust output:\n{output[-5000:]}\nserver log:\n{live_server.log(5000)}"
    assert rc == 0, context
    assert "all budgets met" in output, context
    endpoints = set(rows) - {"Aggregated"}
    # Every endpoint of the default budget table was exercised, and nothing outside the table was sent.
    assert endpoints == set(DEFAULT_BUDGETS), context
    for endpoint in endpoints:
        assert int(rows[endpoint]["Request Count"]) > 0, f"{endpoint}: no requests\n{context}"
    assert int(rows["Aggregated"]["Failure Count"]) == 0, context


def test_broken_budgets_fail_the_run_naming_the_endpoint(live_server, tmp_path):
    # /classify: a p50 of 1 microsecond is impossible. /generate: 5000 characters is over the service's
    # limit, so every request is a 400 failure: a 100% error rate against a 0% budget.
    budgets = {"/classify": {**NEVER_MISSED, "p50_ms": 0.001}, "/generate": NEVER_MISSED}
    rc, output, rows = run_locust(live_server, tmp_path, "broken", budgets, users=2, seconds=3,
                                  classes=("ClassifyUser", "GenerateUser"), generate_chars=5000)
    context = f"locust output:\n{output[-5000:]}"
    assert rc == 1, context
    assert int(rows["/classify"]["Failure Count"]) == 0, context
    assert int(rows["/generate"]["Failure Count"]) == int(rows["/generate"]["Request Count"]) > 0, context
    assert "BUDGET EXCEEDED /classify: p50" in output, context
    assert "BUDGET EXCEEDED /generate: error rate 100.00%" in output, context
    assert "all budgets met" not in output, context


def test_prompts_stay_inside_the_served_vocabulary():
    # The default char models train on Shakespeare: '_', '=' or '*' from the stdlib docs would be a 400.
    from harness.data import prompts

    vocab = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:'\n"
    found = prompts(32, vocab=vocab)
    assert len(found) == 32 and all(set(p) <= set(vocab) for p in found)
    assert any(set(p) - set(vocab) for p in prompts(64))  # unfiltered, the docs do have such characters
