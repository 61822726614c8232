"""The import direction is flows -> pipelines -> ssjdn; the model library never imports Ray or Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "ssjdn": {"ray", "prefect", "pipelines", "flows", "torchvision", "timm"},
    "pipelines": {"flows", "torchvision", "timm"},
    "flows": {"torchvision", "timm"},
}
# The CLI's `demo` command runs a Prefect flow; it is the one sanctioned upward import (lazy, inside run()).
ALLOWED = {("pipelines/commands/demo.py", "flows")}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        bad = {m for m in _imported_roots(path) & FORBIDDEN[package] if (rel, m) not in ALLOWED}
        if bad:
            offenders.append(f"{rel}: imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_layering_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ray\nfrom prefect import flow\n")
    assert _imported_roots(bad) >= {"ray", "prefect"}
