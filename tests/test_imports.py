"""The package's modules form no import cycle, and each imports on its own.

A cycle is dodged by importing inside a function, and the cost is code written twice or
a module that works only when another was imported first. These tests read every
module's imports (inside functions too; ``if TYPE_CHECKING:`` blocks aside, as they
never run) and import each module first in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dask_secure_cloud

PACKAGE = Path(dask_secure_cloud.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["dask_secure_cloud", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of ``if TYPE_CHECKING:`` bodies."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(module: str) -> set[str]:
    """The package's modules ``module`` imports, wherever in it."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:
                full = f"{name}.{alias.name}"
                found.add(full if full in MODULES else name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


def cycles() -> list[list[str]]:
    """Every group of modules that import each other, directly or not (Tarjan)."""
    graph = {module: imports_of(module) for module in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others():
    assert cycles() == []


def test_the_options_read_neither_the_config_module_nor_the_network():
    """Options are declared and checked on their own; the config module and the
    network policy are built from them, never the other way round."""
    for module in MODULES:
        if module.startswith("dask_secure_cloud.options"):
            assert not imports_of(module) & {
                "dask_secure_cloud.config",
                "dask_secure_cloud.network",
            }, module


def test_the_cycle_check_sees_a_cycle_inside_a_function(tmp_path, monkeypatch):
    """The check is not blind: two modules that import each other, one of them only
    inside a function, are a cycle."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setitem(MODULES, "dask_secure_cloud.a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "dask_secure_cloud.b", tmp_path / "b.py")
    assert ["dask_secure_cloud.a", "dask_secure_cloud.b"] in cycles()


#: Imports each module first, in one interpreter: every module of the package is
#: forgotten before the next is imported (what they import from elsewhere stays, which
#: is all they share with a fresh interpreter that matters here).
_FIRST = """
import importlib, sys, traceback
failed = []
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n.split(".")[0] == "dask_secure_cloud"]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception:
        failed.append(module + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_first_on_its_own():
    runnable = sorted(m for m in MODULES if not m.endswith("__main__"))
    done = subprocess.run(
        [sys.executable, "-c", _FIRST, *runnable], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_first_import_check_sees_a_broken_module():
    done = subprocess.run(
        [sys.executable, "-c", _FIRST, "dask_secure_cloud.errors", "dask_secure_cloud.nothing"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "dask_secure_cloud.nothing" in done.stdout
