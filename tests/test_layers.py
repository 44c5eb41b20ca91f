"""The import graph of the kernel: no cycles among its modules, no import upward.

Only imports that run count (not those under ``if TYPE_CHECKING:``): a cycle
there is what made the kernel import its syscall table lazily, inside a VM's
construction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tender_service

ROOT = Path(tender_service.__file__).parent
#: DESIGN.md's layers, lowest first; a module may import its own layer and those below
LAYERS = ["machine", "bmk", "rump", "fork", "transports", "instance", "service"]
#: modules beside the layer packages, and the layer they belong to
RANK = {**{name: i for i, name in enumerate(LAYERS)}, "vm": LAYERS.index("fork"),
        "toolchain": 0, "protos": 0, "gen": 0, "cli": len(LAYERS)}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules of tender_service that ``path`` imports when it runs (module level or
    inside functions), without those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("tender_service")}


def _graph(package: str) -> dict[str, set[str]]:
    mods = {_module(p): p for p in (ROOT / package.split(".", 1)[1].replace(".", "/")).rglob("*.py")}
    return {m: _runtime_imports(p) & mods.keys() for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_the_kernel() -> None:
    graph = _graph("tender_service.rump")
    assert len(graph) > 10  # the walk found the kernel's modules
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_never_import_higher_ones() -> None:
    bad = []
    for i, layer in enumerate(LAYERS):
        for path in (ROOT / layer).rglob("*.py"):
            for m in _runtime_imports(path) | _comparison_imports(path):
                parts = m.split(".")
                if m.startswith("comparison") or (len(parts) > 1 and RANK.get(parts[1], 0) > i):
                    bad.append(f"{_module(path)} imports {m}")
    assert not bad, "\n".join(bad)


def _comparison_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
            and n.module.startswith("comparison")}
