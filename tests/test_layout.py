"""The package's shape, read from its source: modules small enough to read in one sitting, no
import cycle, and aiohttp's private members touched in one module only (relay/aiohttp_internals.py).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import aiohttp
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "relay"
#: The one module that owns every use of aiohttp's internals.
OWNER = "relay.aiohttp_internals"
MAX_LINES = 400
#: aiohttp's modules whose names are public (documented, and in their ``__all__``).
PUBLIC_AIOHTTP = {"aiohttp", "aiohttp.web", "aiohttp.http", "aiohttp.abc", "aiohttp.typedefs", "aiohttp.hdrs"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that runs (at module level or in a function), not those under TYPE_CHECKING."""
    def visit(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (n for stmt in child.orelse for n in visit_stmt(stmt))
                continue
            yield from visit_stmt(child)

    def visit_stmt(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            yield from visit(node)

    yield from visit(tree)


def _relay_targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("relay"):
                yield alias.name
        return
    base = node.module or ""
    if node.level:
        package = module.split(".")[: len(module.split(".")) - node.level + (1 if MODULES[module].name == "__init__.py" else 0)]
        base = ".".join(package + ([base] if base else []))
    if not base.startswith("relay"):
        return
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in MODULES else base


def test_every_module_is_under_400_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) >= MAX_LINES}
    assert not long, f"modules of {MAX_LINES} lines or more: {long}"


def test_no_import_cycle_among_the_packages_modules() -> None:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            for target in _relay_targets(name, node):
                # A package's __init__ runs before its modules; ``relay`` itself is the version only.
                if target in MODULES and target != name and target != "relay":
                    graph[name].add(target)
    # Tarjan's strongly connected components: any of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def _aiohttp_private_names() -> set[str]:
    """Every private member aiohttp defines (``self._x = ``, ``def _x``, ``_x: T`` in a class)."""
    names: set[str] = set()
    for path in pathlib.Path(aiohttp.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                name = node.attr
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = node.name
            elif isinstance(node, ast.ClassDef):
                names.update(t.target.id for t in node.body
                             if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)
                             and t.target.id.startswith("_") and not t.target.id.startswith("__"))
                continue
            else:
                continue
            if name.startswith("_") and not name.startswith("__"):
                names.add(name)
    return names


def test_aiohttp_internals_are_touched_only_by_their_one_module() -> None:
    private = _aiohttp_private_names()
    assert {"_parser", "_waiter", "_messages", "_payload_writer"} <= private  # the scan sees aiohttp's own
    found = []
    for name, path in MODULES.items():
        if name == OWNER:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                # A relay class's own private attribute (``self._x``) is not aiohttp's.
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
                if node.module not in PUBLIC_AIOHTTP:
                    found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
                found.extend(f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_"))
            elif isinstance(node, ast.Import):
                found.extend(f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                             if a.name.startswith("aiohttp.") and a.name not in PUBLIC_AIOHTTP)
    assert not found, "aiohttp internals used outside relay/aiohttp_internals.py:\n" + "\n".join(found)


@pytest.mark.parametrize("text", ["from aiohttp.web_protocol import RequestHandler\n",
                                  "def f(handler):\n    return handler._waiter\n"])
def test_the_internals_check_catches_a_use_outside_the_owner(text: str, tmp_path: pathlib.Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The check above is only worth its green if it can go red: one private import and one
    # private member, written into a module of their own, are each found.
    path = tmp_path / "stray.py"
    path.write_text(text)
    monkeypatch.setitem(MODULES, "relay.stray", path)
    with pytest.raises(AssertionError, match="stray.py"):
        test_aiohttp_internals_are_touched_only_by_their_one_module()
