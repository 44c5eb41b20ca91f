"""The import graph: no cycles among the kernel's modules, no import upward.

The installed packages, lowest first: ``tender_service`` (the library),
``comparison`` (the harness) and ``unifork`` (the command line); inside the
library, DESIGN.md's layers.

Only imports that run count (not those under ``if TYPE_CHECKING:``): a cycle
there is what made the kernel import its syscall table lazily, inside a VM's
construction.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import comparison
import tender_service
import unifork

ROOT = Path(tender_service.__file__).parent
#: DESIGN.md's layers, lowest first; a module may import its own layer and those below
LAYERS = ["machine", "bmk", "rump", "fork", "transports", "instance", "service"]
#: modules beside the layer packages, and the layer they belong to
RANK = {
    **{name: i for i, name in enumerate(LAYERS)},
    "vm": LAYERS.index("fork"),
    "toolchain": 0,
    "protos": 0,
    "gen": 0,
}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path, prefix: str = "tender_service") -> set[str]:
    """Modules starting with ``prefix`` that ``path`` imports when it runs (module level
    or inside functions), without those under ``if TYPE_CHECKING:``."""
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
    return {m for m in out if m.split(".")[0] == prefix}


def _graph(package: str) -> dict[str, set[str]]:
    mods = {
        _module(p): p for p in (ROOT / package.split(".", 1)[1].replace(".", "/")).rglob("*.py")
    }
    return {m: _runtime_imports(p) & mods.keys() for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
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
    return {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("comparison")
    }


def _imports_of(package, prefix: str) -> list[str]:
    """``module imports name`` for every import of ``prefix`` in ``package``'s files,
    also under ``if TYPE_CHECKING:`` (a type-only import still points upward)."""
    root = Path(package.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            bad += [
                f"{path.relative_to(root.parent)} imports {n}"
                for n in names
                if n.split(".")[0] == prefix
            ]
    return bad


def test_the_library_imports_neither_the_harness_nor_the_cli() -> None:
    assert not _imports_of(tender_service, "comparison") + _imports_of(tender_service, "unifork")


def test_the_harness_never_imports_the_cli() -> None:
    assert not _imports_of(comparison, "unifork")


def test_the_import_finder_finds_an_upward_import() -> None:
    # the CLI does import both packages below it: the finder sees those imports
    assert _imports_of(unifork, "comparison") and _imports_of(unifork, "tender_service")


def test_importing_the_whole_library_loads_neither_the_harness_nor_the_cli() -> None:
    """The same, at run time: every module of tender_service imported in a fresh
    interpreter, and no module of comparison or unifork came with them."""
    code = (
        "import importlib, pkgutil, sys, tender_service\n"
        "for m in pkgutil.walk_packages(tender_service.__path__, 'tender_service.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(len([m for m in sys.modules if m.startswith('tender_service')]))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comparison', 'unifork')))"
    )
    out = _fresh_interpreter(code)
    assert int(out[0]) > 50 and out[1] == "[]", out


def test_unifork_run_forks_before_the_emulator_is_imported() -> None:
    """The CLI module and the mode registry import no part of the VM: ``unifork run``
    forks the process a one-VM instance runs in before the child imports the emulator
    and the kernel, which then live in the child's own pages.  Imported before the
    fork, they were shared copy-on-write with the parent and the guest's first fork
    paid a host page fault per page its Python wrote (issue 17)."""
    code = (
        "import sys, unifork.cli, tender_service.instance.modes\n"
        "print(sorted(m for m in sys.modules if m == 'unicorn' or m.startswith(("
        "'tender_service.machine.cpu', 'tender_service.rump.kernel', 'tender_service.fork', "
        "'tender_service.instance.backends', 'tender_service.transports'))))"
    )
    assert _fresh_interpreter(code) == ["[]"]


def _fresh_interpreter(code: str) -> list[str]:
    """The lines ``code`` prints in a new Python process (nothing imported yet)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.splitlines()
