"""The layout's rules, read from the source with :mod:`ast`: imports flow one way, downwards through the layers,
and nowhere in ``src/lmevi`` (counting imports inside functions) do modules import each other in a circle;
the experiments import no circle either, and the tests import nothing from them.

Imports under ``if TYPE_CHECKING:`` are left out: they exist for type checkers only and never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Layers from the bottom; a module may import its own layer and those below it. q and exact are siblings (both
# criteria over the same frame and families) and import neither each other.
LAYERS = {"runtime": 0, "frame": 1, "families": 2, "q": 3, "exact": 3, "fitting": 4, "result": 5}
TOP = 6  # lmevi/__init__, api, cli, warmup, __main__


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement of a module, inside functions too, but not under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (``from a import b`` counts ``a.b`` where that is a
    module, else ``a``)."""
    files = {_module_name(p, root): p for p in (root / package.replace(".", "/")).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 2 or parts[-1] in LAYERS else TOP


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    graph = import_graph(SRC, "lmevi")
    assert len(graph) > 40  # the walk found the package
    assert cycles(graph) == []


def test_imports_flow_downwards_through_the_layers():
    graph = import_graph(SRC, "lmevi")
    upward = [(a, b) for a, edges in graph.items() for b in edges
              if a != "lmevi" and _layer(b) > _layer(a)]
    siblings = [(a, b) for a, edges in graph.items() for b in edges if {_package(a), _package(b)} == {"q", "exact"}]
    assert upward == [] and siblings == []


def test_every_layer_says_what_it_does_and_may_import():
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((SRC / "lmevi" / layer / "__init__.py").read_text()))
        assert doc and len(doc) > 200 and "import" in doc, layer


@pytest.mark.parametrize("folder", ["src/lmevi", "experiments"])
def test_no_module_is_over_about_500_lines(folder):
    """One concept per file: the layout issue's bound, with a little slack for docstrings."""
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 560}
    assert big == {}


def test_no_circle_between_the_experiments_and_no_test_imports_them():
    graph = import_graph(ROOT, "experiments")
    assert cycles(graph) == []
    imported = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in _imports(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            imported |= {n for n in names if n.split(".")[0] in ("experiments", "bench")}
        assert "spec_from_file_location" not in path.read_text() or path.name == "test_architecture.py", path
    assert imported == set()


def _code_lines(node) -> int:
    """A function's lines without its docstring (which says shapes, math and references, and may be long)."""
    first = node.body[0]
    doc = (first.end_lineno - first.lineno + 1) if (
        isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
        and isinstance(first.value.value, str)) else 0
    return node.end_lineno - node.lineno + 1 - doc


def test_long_functions_say_why():
    """Functions over about 80 lines of code (docstrings aside) are split, or say why they are not in a
    ``# Long:`` comment."""
    long = []
    for path in (SRC / "lmevi").rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 80:
                body = lines[node.lineno - 1:node.end_lineno]
                if not any(line.strip().startswith("# Long:") for line in body):
                    long.append(f"{path.relative_to(SRC)}:{node.name}")
    assert long == []
