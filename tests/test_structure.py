"""How the repository fits together, checked on its source: dependencies point one way (no import cycle, lazy
imports inside functions counted), the plain layer knows neither the fast path nor deploy, the package changes
objects only through public module APIs, no function is longer than a screen, and scripts do not reach into
tests/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "compconv"
SOURCES = [*sorted(PACKAGE.rglob("*.py")), *sorted(ROOT.glob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every repository module ``path`` imports, at any depth of its code (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    known = {module_name(p) for p in SOURCES}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in SOURCES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_lazy_imports_counted():
    edges = graph()
    # a package's __init__ only hands names on: an edge into it is an edge into what it re-exports
    assert not cycles({k: {m for m in v if not (k.startswith(m + ".") and (ROOT / m.replace(".", "/")).is_dir())}
                       for k, v in edges.items()})


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_plain_layer_imports_neither_the_fast_path_nor_deploy():
    found = imports(PACKAGE / "layers.py")
    assert not {m for m in found if m.startswith(("compconv.efficient", "compconv.inference", "compconv.factory"))}


def test_objects_are_changed_through_public_module_apis_only():
    pattern = re.compile(r"__class__\s*=|__dict__|\._parameters\b|\._buffers\b|\._modules\b|__new__\(")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = [f"{p.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in PACKAGE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long


def test_scripts_import_nothing_from_tests():
    for path in (ROOT / "scripts").glob("*.py"):
        text = path.read_text()
        assert '/ "tests"' not in text and "from tests" not in text and "import helpers" not in text, path.name
