"""python/, tests/, bench/ and ci/ pass `ruff check` (configuration in ruff.toml at the repository root)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_code_passes_ruff_check() -> None:
    # ruff's own package, installed with the `test` extra, lives beside this interpreter.
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise",
                          "python", "tests", "bench", "ci"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
