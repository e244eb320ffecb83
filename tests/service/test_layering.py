"""The dependency direction of DESIGN.md, enforced: `api -> db <- worker -> pruning_core`, with `lifecycle`
(webhooks, sweeper, heartbeats) shared by api and worker. Read from the source (AST), so an import inside a
function counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules it must never import
FORBIDDEN = {
    "api": {"worker"},
    "db": {"api", "worker", "lifecycle"},
    "lifecycle": {"api", "worker"},
    "pruning_core": {"fastapi", "starlette", "sqlalchemy", "celery", "api", "db", "worker", "lifecycle"},
}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports stay inside its own package)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def violations(package: str) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = []
    for f in files:
        for mod in imported_modules(f):
            if mod.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package: str) -> None:
    assert violations(package) == [], f"{package}/ must not import {sorted(FORBIDDEN[package])}"


def test_the_check_sees_imports_anywhere_in_a_module(tmp_path: Path) -> None:
    """The walk finds top-level, nested and `import x.y` forms (else the test above could pass vacuously)."""
    f = tmp_path / "m.py"
    f.write_text("import worker.tasks\n\ndef f():\n    from worker.runner import run_prune\n    from . import x\n")
    assert imported_modules(f) == {"worker.tasks", "worker.runner"}
