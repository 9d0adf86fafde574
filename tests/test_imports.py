"""The package's layering: ``selma.core`` imports nothing else from selma, no two subpackages import
each other at module level, and every module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import selma

PACKAGE = Path(selma.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, *, module_level: bool) -> set[str]:
    """The selma modules ``path`` imports (at module level only, or anywhere), ``TYPE_CHECKING``
    blocks left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = []
    pending = list(tree.body) if module_level else list(ast.walk(tree))
    for node in pending:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if module_level and isinstance(node, (ast.If, ast.Try)):
            pending.extend(node.body + node.orelse + [n for h in getattr(node, "handlers", []) for n in h.body])
        nodes.append(node)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "selma" or name.startswith("selma.")}


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_core_imports_nothing_else_from_selma():
    stray = {module: sorted(i for i in _imports(path, module_level=False)
                            if not i.startswith("selma.core") and i != "selma")
             for module, path in _modules().items() if module.startswith("selma.core")}
    assert {m: s for m, s in stray.items() if s} == {}


def test_no_two_subpackages_import_each_other_at_module_level():
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        source = _subpackage(module)
        for target in _imports(path, module_level=True):
            if _subpackage(target) not in (source, "selma"):
                graph.setdefault(source, set()).add(_subpackage(target))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(package for package in graph if reaches(package, package, {package}))
    assert cycles == [], {package: sorted(graph[package]) for package in cycles}


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    modules = [name for name in _modules() if not name.endswith("__main__")]
    result = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
