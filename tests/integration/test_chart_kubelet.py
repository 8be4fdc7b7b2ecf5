"""The Helm chart on real kubelet nodes (issue 22): `wirekube-lab up chart`.

One cluster for the module: 3 lab nodes (open, port-restricted cone, symmetric), each running
containerd + a kubelet in its own namespaces, kube-controller-manager and kube-scheduler beside
the API server, the images `make images` built imported into every node, and WireKube installed
with `helm install wirekube charts/wirekube -n wirekube-system --create-namespace -f <values>`.

Not yet in `make test`: it needs kubelet & co. (`WIREKUBE_CONTROL_PLANE_NODES=1
ci/build-control-plane.sh`, 20+ min cold) and the images (`make images`), and one run takes
several minutes. Run it with `make test-chart` (sets WIREKUBE_CHART_LAB=1).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.root import is_root, root_reason
from wirekube import k8s
from wirekube.lab import kubelet, orchestrate
from wirekube.lab.cluster import cache_dir
from wirekube.lab.net import Lab
from wirekube.lab.topology import builtin_topology

pytestmark = [pytest.mark.netns, pytest.mark.apiserver]


def _missing() -> str | None:
    if os.environ.get("WIREKUBE_CHART_LAB") != "1":
        return "the kubelet lab runs with `make test-chart` (WIREKUBE_CHART_LAB=1), not in `make test` yet"
    if not is_root():
        return root_reason()
    for binary in ("kubelet", "kube-controller-manager", "kube-scheduler"):
        if not (cache_dir() / "bin" / binary).exists():
            return f"{binary} is not built: WIREKUBE_CONTROL_PLANE_NODES=1 bash ci/build-control-plane.sh"
    if not (cache_dir() / "images" / "images.env").exists():
        return "the images are not built: make images"
    return None


@pytest.fixture(scope="module")
def chart_lab() -> Iterator[tuple[Lab, k8s.Kube, Any]]:
    reason = _missing()
    if reason:
        print(f"skipping the kubelet lab: {reason}")
        pytest.skip(reason)
    name = f"ch{uuid.uuid4().hex[:5]}"
    try:
        h = orchestrate.up(builtin_topology("chart"), name, wait=240)
        lab_, kube, _ = orchestrate.attach(name)
        yield lab_, kube, h
        kube.close()
    finally:
        orchestrate.down(name)
    assert not list(Path("/run/wirekube-lab").glob(f"{name}/kubelet")), "down left the kubelet nodes' files"


def test_every_peer_connected_and_every_pair_on_its_predicted_transport(chart_lab: Any) -> None:
    lab_, kube, h = chart_lab
    st = orchestrate.state(h.name)
    assert st["converged"] is True, st
    peers = {p["metadata"]["name"]: p for p in kube.list(k8s.PEERS)[0]}
    assert set(peers) == set(lab_.nodes)
    assert all((p.get("status") or {}).get("connected") for p in peers.values()), \
        {n: (p.get("status") or {}).get("connected") for n, p in peers.items()}
    expected = orchestrate.expected_pairs(lab_)
    got = {(p["from"], p["to"]): p["transport"] for p in orchestrate.collect(lab_, kube)["pairs"]}
    assert {k: got[k] for k in expected} == expected
    assert set(expected.values()) == {"direct", "relay"}  # the topology has both kinds


def test_the_agents_are_the_charts_daemonset_pods_not_lab_processes(chart_lab: Any) -> None:
    lab_, kube, _ = chart_lab
    pods = kube.list(k8s.Resource("", "v1", "pods", "Pod"), "wirekube-system",
                     label_selector="app.kubernetes.io/component=agent")[0]
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(lab_.nodes)
    assert all(p["status"].get("phase") == "Running" for p in pods)
    assert all(p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet" for p in pods)
    for node in lab_.nodes:
        assert orchestrate.running_agents(lab_, node) == [], f"the lab itself started an agent on {node}"


def test_helm_test_passes(chart_lab: Any) -> None:
    _, _, h = chart_lab
    proc = kubelet.helm(h.admin_kubeconfig, "test", kubelet.RELEASE, "-n", kubelet.NAMESPACE, "--timeout=300s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Succeeded" in proc.stdout


def test_node_cost_is_measured(chart_lab: Any) -> None:
    lab_, _, h = chart_lab
    usage = kubelet.node_usage(lab_, h.workdir)
    print(f"kubelet + containerd + shims per node: {usage}")
    assert set(usage) == set(lab_.nodes)
    assert all(50 < u["rss_mb"] < 1500 for u in usage.values()), usage


def test_ctr_sees_the_imported_images_on_every_node(chart_lab: Any) -> None:
    lab_, _, h = chart_lab
    images = kubelet.images_env()
    for node in lab_.nodes:
        root = kubelet.node_root(h.workdir, node)
        out = lab_.exec(node, ["ctr", f"--address={root}/containerd.sock", "-n", "k8s.io", "images", "ls", "-q"],
                        check=True).stdout.split()
        for key in ("AGENT_REF", "GATEWAY_REF", "PAUSE_REF"):
            assert images[key] in out, (node, key, out)
