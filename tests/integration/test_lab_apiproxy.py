"""The management path: the real API server reached from inside node namespaces via loopback."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.root import require_root
from wirekube.lab.cluster import ControlPlane, write_kubeconfig

pytestmark = [pytest.mark.netns, pytest.mark.apiserver]


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    require_root()
    names = [f"wkap{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    for ns in names:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    yield names
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_api_server_reachable_on_each_namespace_loopback(control_plane: ControlPlane, namespaces: list[str],
                                                         tmp_path: Path) -> None:
    assert control_plane.state is not None
    proxy = subprocess.Popen(
        [sys.executable, "-m", "wirekube.lab.apiproxy", "--target", f"127.0.0.1:{control_plane.state.apiserver_port}",
         *namespaces], stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        kubeconfig = tmp_path / "node.kubeconfig"
        write_kubeconfig(kubeconfig, "https://127.0.0.1:6443", control_plane.pki)
        for ns in namespaces:
            out = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c",
                 "import sys; from wirekube import k8s; "
                 "items, _ = k8s.Kube.from_kubeconfig(sys.argv[1]).list(k8s.CRDS); print(len(items))",
                 str(kubeconfig)], check=True, capture_output=True, text=True).stdout
            assert int(out) >= 3
    finally:
        proxy.terminate()
        assert proxy.wait(10) == 0
