"""No class over 300 lines and no function over 60 lines in python/wirekube (issue 17).

Lines are counted as the AST sees them: from the `class`/`def` line to the last line of its body,
docstring and comments included. A class or function that truly earns more goes into ALLOWED with
its limit and the reason; the limit is the size it had when allowed, so it cannot grow unnoticed,
and an entry that is no longer needed fails the test too (the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "wirekube"
MAX_CLASS = 300
MAX_FUNCTION = 60

# "path/relative/to/wirekube.py:Qualified.name" -> (lines allowed, why)
ALLOWED: dict[str, tuple[int, str]] = {}


def sizes() -> dict[str, tuple[str, int]]:
    """Every class and function in the package: qualified key -> (kind, lines)."""
    found: dict[str, tuple[str, int]] = {}

    def walk(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                assert child.end_lineno is not None
                found[f"{path}:{name}"] = (kind, child.end_lineno - child.lineno + 1)
                walk(child, path, f"{name}.")
            else:
                walk(child, path, prefix)

    for file in sorted(PACKAGE.rglob("*.py")):
        walk(ast.parse(file.read_text(), str(file)), file.relative_to(PACKAGE).as_posix(), "")
    return found


def test_no_class_or_function_over_its_limit() -> None:
    over = []
    for key, (kind, lines) in sorted(sizes().items()):
        limit = MAX_CLASS if kind == "class" else MAX_FUNCTION
        allowed = ALLOWED.get(key, (limit, ""))[0]
        if lines > max(limit, allowed):
            over.append(f"{kind} {key}: {lines} lines (limit {max(limit, allowed)})")
    assert not over, "split these along their seams (or allow one in ALLOWED, saying why):\n" + "\n".join(over)


def test_the_allow_list_only_names_what_still_needs_it() -> None:
    found = sizes()
    stale = []
    for key, (allowed, why) in ALLOWED.items():
        assert why.strip(), f"{key}: an allow-list entry says why"
        if key not in found:
            stale.append(f"{key}: no such class or function any more")
            continue
        kind, lines = found[key]
        if lines <= (MAX_CLASS if kind == "class" else MAX_FUNCTION):
            stale.append(f"{key}: {lines} lines, within the limit now")
        elif lines < allowed:
            stale.append(f"{key}: {lines} lines, allowed {allowed}: lower the entry")
    assert not stale, "shrink ALLOWED:\n" + "\n".join(stale)


def test_the_walk_sees_nested_definitions() -> None:
    found = sizes()
    assert found["agent/main.py:main"][0] == "function"
    assert any(key.count(".") >= 2 and key.startswith("agent/") for key in found), "methods are qualified"
