"""The import direction is ssjdn_cli -> flows -> pipelines -> ssjdn, with no cycles and no private imports.

Every import counts, including the ones inside functions (a lazy import hides a cycle from Python, not from
this check). The checker itself is tested on planted packages, so a broken checker fails here too.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ssjdn", "pipelines", "flows", "ssjdn_cli")

# package -> top-level modules it must never import
FORBIDDEN = {
    "ssjdn": {"ray", "prefect", "pipelines", "flows", "ssjdn_cli", "torchvision", "timm"},
    "pipelines": {"flows", "ssjdn_cli", "torchvision", "timm"},
    "flows": {"ssjdn_cli", "torchvision", "timm"},
    "ssjdn_cli": {"torchvision", "timm"},
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (a submodule when `from pkg import submodule`)
    names: tuple[str, ...]  # names taken from the target (empty for `import x`)
    line: int


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the given packages under root."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import statement in the file, wherever it sits (module level, functions, classes)."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [Import(name, alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = tuple(alias.name for alias in node.names)
            submodules = [n for n in names if f"{target}.{n}" in modules]
            out += [Import(name, f"{target}.{n}", (), node.lineno) for n in submodules]
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                out.append(Import(name, target, rest, node.lineno))
    return out


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, set[str]], list[Import]]:
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    every = []
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            every.append(imp)
            if imp.target in modules and imp.target != name:
                graph[name].add(imp.target)
    return graph, every


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(every: list[Import], modules) -> list[str]:
    """`from other_module import _private` across modules of this project (a module's own names are fine)."""
    out = []
    for imp in every:
        if imp.target not in modules or imp.target == imp.module:
            continue
        for n in imp.names:
            if n.startswith("_") and not n.startswith("__"):
                out.append(f"{imp.module}:{imp.line} imports {imp.target}.{n}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    _, every = import_graph(REPO)
    offenders = sorted(
        {
            f"{imp.module}:{imp.line} imports {imp.target}"
            for imp in every
            if imp.module.split(".")[0] == package and imp.target.split(".")[0] in FORBIDDEN[package]
        }
    )
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles_anywhere():
    graph, _ = import_graph(REPO)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def package_graph(graph: dict[str, set[str]], depth: int = 2) -> dict[str, set[str]]:
    """The module graph folded to packages (`pipelines.search.query` -> `pipelines.search`)."""
    fold = lambda m: ".".join(m.split(".")[:depth])  # noqa: E731
    out: dict[str, set[str]] = {}
    for src, targets in graph.items():
        out.setdefault(fold(src), set()).update(fold(t) for t in targets if fold(t) != fold(src))
    for targets in list(out.values()):
        for t in targets:
            out.setdefault(t, set())
    return out


def test_no_cycles_between_the_job_packages():
    graph, _ = import_graph(REPO)
    found = cycles(package_graph({m: t for m, t in graph.items() if m.startswith("pipelines.")}))
    assert not found, "package cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_imports_another_modules_private_names():
    graph, every = import_graph(REPO)
    offenders = private_imports(every, graph)
    assert not offenders, "\n".join(offenders)


def test_the_checker_finds_a_planted_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""planted"""\n')
    (pkg / "a.py").write_text("from planted.b import helper\n\n\ndef run():\n    return helper()\n")
    # The cycle hides inside a function, as the old query <-> ann cycle did.
    (pkg / "b.py").write_text("def helper():\n    from planted import a\n\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")  # relative imports resolve too (no cycle: nothing imports c)
    graph, _ = import_graph(tmp_path, packages=("planted",))
    assert cycles(graph) == [["planted.a", "planted.b"]]
    assert graph["planted.c"] == {"planted.a"}
    # Folded to packages, two modules that import each other's package form a package cycle.
    folded = package_graph({"p.x.a": {"p.y.b"}, "p.y.c": {"p.x.d"}, "p.x.d": set(), "p.y.b": set()})
    assert cycles(folded) == [["p.x", "p.y"]]


def test_the_checker_finds_a_planted_private_import_and_an_upward_import(tmp_path):
    pkg = tmp_path / "ssjdn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("def _secret():\n    return 1\n\n\ndef _own():\n    return _secret()\n")
    (pkg / "two.py").write_text("def f():\n    import ray\n\n    from ssjdn.one import _secret\n\n    return _secret\n")
    graph, every = import_graph(tmp_path, packages=("ssjdn",))
    assert private_imports(every, graph) == ["ssjdn.two:4 imports ssjdn.one._secret"]
    assert any(imp.target == "ray" and imp.module == "ssjdn.two" for imp in every)
    assert cycles(graph) == []
