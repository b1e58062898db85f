"""Data flows one way, models -> export -> (model store) -> service: no stage imports a later one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LATER = {"models": ("export", "service", "loadtest"), "export": ("service", "loadtest"),
         "service": ("export", "loadtest")}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("stage", sorted(LATER))
def test_no_stage_imports_a_later_one(stage):
    offenders = {f"{path.relative_to(ROOT)} imports {sorted(imported_packages(path) & set(LATER[stage]))}"
                 for path in sorted((ROOT / stage).rglob("*.py")) if imported_packages(path) & set(LATER[stage])}
    assert not offenders, offenders


def test_the_service_never_imports_torch():
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "service").rglob("*.py"))
                 if "torch" in imported_packages(path)]
    assert not offenders, offenders
