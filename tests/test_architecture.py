"""The shape of the code: no import circles between the project's own modules, and none too long.

A circle is dodged today with a function-level import and bites tomorrow, when someone moves that
import to the top or imports the modules in another order; so every import statement counts,
wherever it sits, except those under ``if TYPE_CHECKING:``, which never run. The graph is read
from the sources with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mymps_magic", "kernel_server")
MAX_MODULE_LINES = 450
"""Past this a module holds more than one job (the house habit is to split near 400)."""


def _modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package under its own name)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree, at any depth, bar the ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The project modules one import statement depends on.

    ``from pkg import name`` means the submodule ``pkg.name`` when there is one, else ``pkg``
    itself; ``import a.b`` means ``a.b`` (Python runs ``a`` first, but a submodule does not
    depend on its package's ``__init__`` merely by living in it).
    """
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets: set[str] = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in known:
            targets.add(submodule)
        elif base in known:
            targets.add(base)
    return targets


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at run time, at any depth)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {
            target for node in _imports(tree) for target in _targets(name, is_package, node, known)
        } - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def _path_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete circle inside a component, ``a -> b -> a``, to name in the failure."""
    members = set(component)
    start = component[0]
    trail = [start]
    seen = {start}
    while True:
        for nxt in sorted(graph[trail[-1]] & members):
            if nxt == start and len(trail) > 1:
                return [*trail, start]
        step = next((n for n in sorted(graph[trail[-1]] & members) if n not in seen), None)
        if step is None:  # a dead end inside the component: the component itself says enough
            return component
        trail.append(step)
        seen.add(step)


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "kernel_server.app" in graph["kernel_server.__main__"]  # imported inside main()
    assert "mymps_magic.wire" in graph["kernel_server.execution"]  # ``from mymps_magic import wire``


def test_no_import_circles() -> None:
    graph = import_graph()
    circles = [f"{', '.join(component)} (for one: {' -> '.join(_path_through(graph, component))})"
               for component in find_cycles(graph)]
    assert not circles, "import circles between the project's modules:\n" + "\n".join(circles)


LIGHT_PROBE = """
import json, sys
import {module}
print(json.dumps([m for m in ("httpx", "websockets") if m in sys.modules]))
"""


def test_the_server_reaches_wire_without_the_client_machinery() -> None:
    """``kernel_server`` imports ``mymps_magic.wire``; that must not bring the client's HTTP and
    WebSocket stack (httpx, websockets, the session channel) into the server process."""
    for module in ("mymps_magic.wire", "kernel_server.sessions"):
        out = subprocess.run([sys.executable, "-c", LIGHT_PROBE.format(module=module)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == [], module


def test_no_module_is_over_the_line_limit() -> None:
    too_long = [f"{path.relative_to(ROOT)} ({lines} lines)" for path in _modules().values()
                if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines; split each by its jobs:\n" + "\n".join(too_long)
