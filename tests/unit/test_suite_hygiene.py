"""Rules the test suite keeps (issue 17), checked on its source: helpers live outside test_*.py,
and every pytest.raises says which message it expects."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# test_relay_wss.py re-runs the raw-TCP protocol probe's tests over WSS: it imports that module
# for its tests, on purpose, not for helpers.
REUSES_TESTS = {("integration/test_relay_wss.py", "tests.integration.test_relay_handshake")}


def modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(TESTS)), ast.parse(p.read_text(), str(p))) for p in sorted(TESTS.rglob("*.py"))]


def test_no_module_imports_helpers_from_a_test_module() -> None:
    found = []
    for name, tree in modules():
        for node in ast.walk(tree):
            targets = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for target in targets:
                if target.startswith("tests.") and target.rsplit(".", 1)[-1].startswith("test_") \
                        and (name, target) not in REUSES_TESTS:
                    found.append(f"{name}:{node.lineno} imports {target}")
    assert not found, "move the shared helpers into a module not named test_*.py:\n" + "\n".join(found)


def test_every_pytest_raises_names_the_expected_message() -> None:
    found = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "raises" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest" \
                    and len(node.args) <= 1 and not any(k.arg == "match" for k in node.keywords):
                found.append(f"{name}:{node.lineno}")
    assert not found, "pytest.raises without match= (name the real message):\n" + "\n".join(found)
