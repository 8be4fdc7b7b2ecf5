"""The Dockerfiles are not built here (no Docker engine); ci/check-images.py keeps them honest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfiles_install_the_wheel_and_run_its_console_scripts() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "ci" / "check-images.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wirekube-agent" in proc.stdout and "wirekube-gateway" in proc.stdout and "wirekube-relay" in proc.stdout
