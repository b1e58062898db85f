"""`make audit`: pip-audit of the installed environment (the locked pins of pyproject.toml, installed by
`make setup`) against PyPI's vulnerability service. Never a silent pass:

- advisory database unreachable (no network, or a PyPI mirror without the per-release JSON API that carries
  the advisories): prints "pip-audit skipped: advisory database unreachable: <reason>" and exits 0, so an
  offline CI goes on;
- reachable and a dependency has a known vulnerability: prints each one and exits 1;
- reachable and clean: prints how many packages were audited.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata

PROBE = "https://pypi.org/pypi/pip/{version}/json"  # the endpoint pip-audit's PyPI service reads, per release


def unreachable(reason: str) -> int:
    print(f"pip-audit skipped: advisory database unreachable: {reason}")
    return 0


def main() -> int:
    url = PROBE.format(version=metadata.version("pip"))
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            json.load(response)["vulnerabilities"]  # noqa: B018  (the field the audit needs must be there)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        return unreachable(f"GET {url}: {e}")
    run = subprocess.run([sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "--format", "json",
                          "--skip-editable"], capture_output=True, text=True)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        print(run.stdout + run.stderr, file=sys.stderr)
        print(f"pip-audit failed (exit {run.returncode}) without a report", file=sys.stderr)
        return 1
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    if not audited:  # every lookup failed: the service is not really there
        reasons = {d["skip_reason"] for d in deps} or {"no dependencies reported"}
        return unreachable(f"no dependency could be looked up ({sorted(reasons)[0]})")
    vulnerable = [(d, v) for d in audited for v in d.get("vulns", [])]
    for dep, vuln in vulnerable:
        fixed = ", ".join(vuln.get("fix_versions", [])) or "none yet"
        print(f"VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed}) "
              f"{vuln.get('description', '')[:200]}")
    skipped = len(deps) - len(audited)
    print(f"pip-audit: {len(audited)} packages audited ({skipped} skipped), {len(vulnerable)} known vulnerabilities")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
