"""The package's layering: ``selma.core`` imports nothing else from selma, no two subpackages (nor
two modules) import each other at module level, selma imports sit at the top of the file (so the
cycle checks see them), and every module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import selma

PACKAGE = Path(selma.__file__).parent

# The one module that imports selma modules inside functions on purpose: the command line loads
# only what the command it runs needs, so `selma --help` and a config error answer without loading
# Ray or torch. Every other module imports selma modules at the top of the file.
LAZY_BY_DESIGN = frozenset({"selma.cli"})


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


def _in_function_imports(path: Path) -> list[str]:
    """``line: statement`` for every selma import inside a function of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = {}
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom):  # relative: always selma's own
                names = ["selma"]
            else:
                continue
            if any(name == "selma" or name.startswith("selma.") for name in names):
                found[node.lineno] = ast.unparse(node)
    return [f"{line}: {text}" for line, text in sorted(found.items())]


def _module_graph() -> dict[str, set[str]]:
    """Module -> the selma modules it imports at module level (``from selma.x import y`` counts as
    ``selma.x.y`` when that is a module); the implicit import of a module's parent packages is left out."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        pending = list(tree.body)
        for node in pending:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                pending.extend(node.body + node.orelse + [n for h in getattr(node, "handlers", []) for n in h.body])
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                targets |= submodules or {node.module}
        graph[module] = targets - {module}
    return graph


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


def test_no_two_modules_import_each_other_at_module_level():
    graph = _module_graph()
    cycles = set()
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            module, trail = stack.pop()
            for target in sorted(graph.get(module, ())):
                if target == start and start == min(trail):  # each cycle once, from its first module
                    cycles.add(" -> ".join(trail + [start]))
                elif target != start and target not in seen:
                    seen.add(target)
                    stack.append((target, trail + [target]))
    assert sorted(cycles) == []


def test_selma_imports_sit_at_module_level():
    """In-function selma imports hide import cycles from the checks above: modules import selma at the
    top of the file (optional or heavy third-party libraries may stay lazy, with a comment saying why)."""
    modules = _modules()
    hidden = {module: _in_function_imports(path) for module, path in modules.items()}
    offending = {module: found for module, found in hidden.items() if found and module not in LAZY_BY_DESIGN}
    assert offending == {}, "move these imports to the top of the file (fix the layering if that makes a cycle)"
    cleaned = sorted(module for module in LAZY_BY_DESIGN if module in modules and not hidden[module])
    assert cleaned == [], "no selma import left inside functions: take these off LAZY_BY_DESIGN"
    assert sorted(LAZY_BY_DESIGN - set(modules)) == [], "LAZY_BY_DESIGN names modules that do not exist"
