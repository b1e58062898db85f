"""The locust load test with budgets (every endpoint at once), as docs/bench.md documents it: one user per
endpoint; the verdict is the locustfile's own (its ``BUDGET EXCEEDED`` lines), not recomputed here."""

from __future__ import annotations

from pathlib import Path

from loadtest.bench.common import log
from loadtest.locust_runner import BUDGETS, USER_CLASSES, number, run_locust


def bench_budgets(url: str, seconds: int, generate_chars: int, workdir: Path) -> dict:
    users = len(USER_CLASSES)
    log(f"load test with budgets: {users} users (one per endpoint) for {seconds} s")
    run = run_locust(url, USER_CLASSES, users, seconds, workdir, budgets=BUDGETS, generate_chars=generate_chars)
    run.check()
    violations = [line.split("BUDGET EXCEEDED ", 1)[1] for line in run.output.splitlines()
                  if "BUDGET EXCEEDED" in line]
    endpoints = [{"endpoint": name, "requests": number(row, "Request Count"), "failures": number(row, "Failure Count"),
                  "p50": number(row, "50%"), "p95": number(row, "95%"), "p99": number(row, "99%")}
                 for name, row in run.rows.items() if name != "Aggregated"]
    log(f"  budgets {'met' if not violations else 'EXCEEDED: ' + '; '.join(violations)}")
    return {"users": users, "seconds": seconds, "endpoints": endpoints, "violations": violations}
