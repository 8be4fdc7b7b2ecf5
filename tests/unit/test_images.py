"""ci/check-images.py keeps the Dockerfiles honest (statically here; `make images` builds them with
buildah and runs it with --built)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def check_images() -> Any:
    """ci/check-images.py as a module (its file name is not an importable name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_images", ROOT / "ci" / "check-images.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dockerfiles_install_the_wheel_and_run_its_console_scripts() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "ci" / "check-images.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wirekube-agent" in proc.stdout and "wirekube-gateway" in proc.stdout and "wirekube-relay" in proc.stdout


def test_the_gateway_image_must_install_the_aws_extra() -> None:
    mod = check_images()
    path = ROOT / "images" / "gateway" / "Dockerfile"
    plain = ["RUN pip wheel --no-cache-dir --wheel-dir /wheels ./python", "RUN pip install /wheels/*.whl"]
    problems = mod.check_extras("gateway", path, plain, {"aws"})
    assert len(problems) == 2 and all("[aws]" in p for p in problems)
    with_extra = ['RUN pip wheel --wheel-dir /wheels "./python[aws]"',
                  'RUN pip install --no-index --find-links=/wheels/ "wirekube[aws]"']
    assert mod.check_extras("gateway", path, with_extra, {"aws"}) == []
    assert "does not define" in mod.check_extras("gateway", path, with_extra, set())[0]
    assert mod.check_extras("relay", path, plain, set()) == []


def test_a_base_given_by_arg_is_checked_with_its_default() -> None:
    mod = check_images()
    pinned = ["ARG BASE=python:3.11.14-slim-bookworm", "FROM ${BASE} AS wheel", "FROM $BASE"]
    assert [ln for ln in mod.resolve_args(pinned) if ln.startswith("FROM")] == [
        "FROM python:3.11.14-slim-bookworm AS wheel", "FROM python:3.11.14-slim-bookworm"]
    loose = mod.resolve_args(["ARG BASE=python:3.11", "FROM ${BASE}"])
    assert not mod.PINNED_FROM.match(loose[1])


def test_a_wheel_with_the_lab_in_it_is_refused() -> None:
    mod = check_images()
    clean = ["wirekube/__init__.py", "wirekube/agent/main.py", "wirekube-0.1.0.dist-info/RECORD"]
    assert mod.check_wheel_has_no_lab({"wirekube-agent"}, clean) == []
    problems = mod.check_wheel_has_no_lab({"wirekube-agent", "wirekube-lab"}, [*clean, "wirekube/lab/net.py"])
    assert problems == ["the wheel holds the lab: wirekube/lab/net.py",
                        "the wheel declares the lab's console script wirekube-lab"]
    assert "no wirekube/agent/" in mod.check_wheel_has_no_lab(set(), ["wirekube/__init__.py"])[0]
