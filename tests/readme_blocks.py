"""The README's Python examples, as the tests that check them see them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(?P<info>py[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path = README) -> list[tuple[str, str]]:
    """Every fenced block whose language starts with ``py``: (its info string, its code)."""
    return [(m["info"].strip(), m["code"]) for m in _FENCE.finditer(path.read_text(encoding="utf-8"))]


def names_imported_from(code: str, module: str) -> set[str]:
    """The names ``from MODULE import ...`` statements in ``code`` bring in."""
    return {
        alias.name
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
    }
