"""The suite's root rule (tests/fixtures/root.py, tests/conftest.py), run in an inner pytest
whose uid is set at the one seam the rule reads (os.geteuid)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

INNER_TESTS = '''
import pytest

def test_skips_for_no_good_reason():
    pytest.skip("tool X is missing")

@pytest.mark.root
def test_needs_root():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
'''

OPT_IN = '''
import pytest

def test_opt_in_lab():
    pytest.skip("runs with its make target")
'''


def run_inner(tmp_path: Path, uid: int) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(
        f"import os\nos.geteuid = lambda: {uid}\n"
        "from tests.conftest import pytest_configure, pytest_runtest_makereport, pytest_runtest_setup\n")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    (tmp_path / "test_lab_kernel.py").write_text(OPT_IN)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:randomly",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_as_root_a_skip_fails_the_run_except_in_the_opt_in_lab_modules(tmp_path: Path) -> None:
    proc = run_inner(tmp_path, 0)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in out, out
    assert "skipped while running as root, where every test must run: tool X is missing" in out
    assert "SKIPPED [1] test_lab_kernel.py" in out  # the opt-in module still skips, saying why


def test_without_root_root_tests_skip_saying_why_and_the_run_passes(tmp_path: Path) -> None:
    proc = run_inner(tmp_path, 1000)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "3 skipped, 1 xfailed" in out, out
    assert "needs root for network namespaces, nftables and raw sockets (running as uid 1000)" in out
