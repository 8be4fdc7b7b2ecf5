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

from wirekube import k8s
from wirekube.lab.cluster import ControlPlane


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "apiserver: needs the real kube-apiserver + etcd")
    config.addinivalue_line("markers", "netns: needs root, network namespaces and nftables")


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
