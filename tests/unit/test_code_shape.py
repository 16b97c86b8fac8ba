"""The shape STYLE.md asks of product code (``worker``, ``handlers``, ``schemas``):
modules of at most 400 lines, functions of at most 60, and the runtime importing no
topic handler (``handlers`` imports ``worker``, never the reverse, but for the
commands and the read side, which build on both)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "handlers", "schemas")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# The layers above the runtime: they compose handlers, the read side and the runtime.
MAY_IMPORT_HANDLERS = ("worker/cli/", "worker/read/", "worker/http/")

MODULES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_and_functions_are_small(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{_name(path)}: split it by idea"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{_name(path)}:{node.lineno} {node.name}"


@pytest.mark.parametrize("path", [p for p in MODULES if _name(p).startswith("worker/")], ids=_name)
def test_the_runtime_imports_no_handler(path: Path) -> None:
    if _name(path).startswith(MAY_IMPORT_HANDLERS):
        return
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            assert not name.startswith("handlers"), f"{_name(path)} imports {name}"
