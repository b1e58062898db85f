"""One headless locust run as a subprocess: shared by the bench (loadtest/bench) and tests/test_loadtest.py.

Locust runs in its own process because it gevent-monkey-patches the process it runs in.
"""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
BUDGETS = Path(__file__).with_name("budgets.json")  # the locustfile's default table
# The locustfile's user classes, one per endpoint (the locustfile itself cannot be imported: gevent).
USER_CLASSES = ("ClassifyUser", "FeaturesUser", "GenerateUser", "GenerateStreamUser", "KServeUser")


@dataclass
class LocustRun:
    returncode: int  # 0 = all good, 1 = failed requests or a missed budget (both in the output), else a crash
    output: str  # locust's stdout + stderr
    rows: dict[str, dict]  # its CSV stats rows by endpoint name ("Aggregated" included); empty if none written
    command: str

    def check(self) -> LocustRun:
        """Raise unless locust ran to the end (rc 0 or 1 with its stats written): for callers that report
        failures rather than assert on them."""
        if self.returncode not in (0, 1) or not self.rows:
            raise RuntimeError(f"locust exited with {self.returncode}: {self.command}\n{self.output[-3000:]}")
        return self


def run_locust(url: str, user_classes: list[str] | tuple[str, ...], users: int, seconds: int, workdir: Path,
               name: str | None = None, budgets: str | Path = "none", generate_chars: int = 100) -> LocustRun:
    """``locust --headless -u users -r users -t seconds`` of ``user_classes`` against ``url``; CSV and log
    files go to ``workdir`` under ``name`` (default: the classes and user count)."""
    name = name or f"locust-{user_classes[0] if len(user_classes) == 1 else 'all'}-{users}"
    prefix = workdir / name
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "5",
           "--host", url, "--csv", str(prefix), "--budgets", str(budgets),
           "--generate-chars", str(generate_chars), *user_classes]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=seconds + 180)
    output = done.stdout + done.stderr
    (workdir / f"{name}.log").write_text(output)
    stats_csv = Path(f"{prefix}_stats.csv")
    rows = {}
    if stats_csv.exists():
        with open(stats_csv) as f:
            rows = {row["Name"]: row for row in csv.DictReader(f)}
    return LocustRun(done.returncode, output, rows, shlex.join(cmd))


def number(row: dict | None, column: str) -> float:
    """A numeric cell of a locust stats row; NaN when missing ("N/A": nothing recorded)."""
    try:
        return float(row[column]) if row else float("nan")
    except (KeyError, ValueError):
        return float("nan")
