"""Shared fixtures.

``control_plane`` is ONE real etcd + kube-apiserver (built from the Go module proxy by
ci/build-control-plane.sh) shared by every test in the session; tests isolate themselves by
object names (``unique``), not by starting servers.  Tests that must stop or restart the API
server start their own private ControlPlane instead.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.root import OPT_IN_MODULES, is_root, require_root
from wirekube import k8s
from wirekube.lab.cluster import ControlPlane


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "apiserver: needs the real kube-apiserver + etcd")
    config.addinivalue_line("markers", "netns: needs root, network namespaces and nftables")
    config.addinivalue_line("markers", "root: needs root; skipped, saying why, without it (tests/fixtures/root.py)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        require_root("network namespaces, nftables and raw sockets")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Running as root, a skipped test fails the run: CI must not silently drop a layer. Only the
    opt-in lab modules (OPT_IN_MODULES) may skip there, saying why."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not (report.skipped and is_root()) or hasattr(report, "wasxfail") or item.path.name in OPT_IN_MODULES:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (f"skipped while running as root, where every test must run: {reason} "
                       f"(only {', '.join(sorted(OPT_IN_MODULES))} may skip; see tests/fixtures/root.py)")


@pytest.fixture(scope="session")
def lab_tmp() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="wirekube-test-"))
    yield root
    # Control planes remove their own directories; whatever remains is test debris.
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def control_plane(lab_tmp: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(lab_tmp / "cluster").up()
    try:
        yield cp
    finally:
        cp.down()


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Iterator[k8s.Kube]:
    client = k8s.Kube.from_kubeconfig(control_plane.kubeconfig)
    yield client
    client.close()


@pytest.fixture
def unique() -> str:
    """A fresh lowercase DNS-label suffix for object names, so tests share one API server."""
    return uuid.uuid4().hex[:8]


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"wirekube cache: {os.environ.get('WIREKUBE_CACHE', Path.home() / '.cache' / 'wirekube')}"]
