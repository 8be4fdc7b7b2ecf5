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
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.root import is_root, root_reason
from wirekube import k8s
from wirekube.cli import nodestate
from wirekube.lab import kubelet, orchestrate
from wirekube.lab.cluster import cache_dir
from wirekube.lab.net import Lab
from wirekube.lab.topology import builtin_topology
from wirekube.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.apiserver]

AGENT_PODS = "app.kubernetes.io/component=agent"
PODS = k8s.Resource("", "v1", "pods", "Pod")


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

    def connected() -> dict[str, bool]:
        return {p["metadata"]["name"]: bool((p.get("status") or {}).get("connected")) for p in kube.list(k8s.PEERS)[0]}

    # `connected` follows the first handshake at the agent's next pass (an event or its resync), so it
    # may trail the converged pairs by one resync interval.
    wait_for(lambda: all(connected().values()), 60, "every WireKubePeer to say connected", interval=1.0)
    assert set(connected()) == set(lab_.nodes)
    expected = orchestrate.expected_pairs(lab_)
    got = {(p["from"], p["to"]): p["transport"] for p in orchestrate.collect(lab_, kube)["pairs"]}
    assert {k: got[k] for k in expected} == expected
    assert set(expected.values()) == {"direct", "relay"}  # the topology has both kinds


def test_the_agents_are_the_charts_daemonset_pods_not_lab_processes(chart_lab: Any) -> None:
    lab_, kube, _ = chart_lab
    pods = kube.list(PODS, kubelet.NAMESPACE, label_selector=AGENT_PODS)[0]
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


# Run inside the agent container (ctr task exec: its environment, its mounts, its projected token).
TOKEN_CHECK = textwrap.dedent("""
    import sys
    from wirekube import errors, k8s
    own, other = sys.argv[1], sys.argv[2]
    kube = k8s.Kube.in_cluster()
    mark = {"metadata": {"labels": {"wirekube-test/token-check": "1"}}}
    try:
        kube.patch_merge(k8s.PEERS, other, mark)
        print("OTHER ALLOWED")
    except errors.Forbidden as e:
        print("OTHER DENIED:", e)
    kube.patch_merge(k8s.PEERS, own, mark)
    kube.patch_merge(k8s.PEERS, own, {"metadata": {"labels": {"wirekube-test/token-check": None}}})
    print("OWN ALLOWED")
""")


def test_an_agent_pods_own_token_cannot_patch_another_nodes_peer(chart_lab: Any) -> None:
    """From inside a running agent container, with the token the kubelet projected into it: its
    own WireKubePeer can be patched, another node's is refused with the admission policy's words."""
    lab_, kube, h = chart_lab
    pods = kube.list(PODS, kubelet.NAMESPACE, label_selector=AGENT_PODS)[0]
    pod = sorted(pods, key=lambda p: p["spec"]["nodeName"])[0]
    own = pod["spec"]["nodeName"]
    other = next(n for n in sorted(lab_.nodes) if n != own)
    status = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "agent")
    cid = status["containerID"].removeprefix("containerd://")
    root = kubelet.node_root(h.workdir, own)
    done = lab_.exec(own, ["ctr", f"--address={root}/containerd.sock", "-n", "k8s.io", "task", "exec",
                           "--exec-id", f"token-check-{uuid.uuid4().hex[:6]}", cid,
                           "python3", "-c", TOKEN_CHECK, own, other], check=False, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "OTHER DENIED:" in out and f"may only write the WireKubePeer named {own}, not {other}" in out, out
    assert "OWN ALLOWED" in out, out
    labels = kube.get(k8s.PEERS, other)["metadata"].get("labels") or {}
    assert "wirekube-test/token-check" not in labels


def test_helm_uninstall_then_cleanup_leaves_nothing_on_any_node(chart_lab: Any, tmp_path: Path) -> None:
    """The module's last test (it removes the release): `helm uninstall`, then `wirekubectl cleanup`
    on each node leaves no WireKube link, ip rule, route in table 22347 or nftables table."""
    lab_, kube, h = chart_lab
    proc = kubelet.helm(h.admin_kubeconfig, "uninstall", kubelet.RELEASE, "-n", kubelet.NAMESPACE, "--wait",
                        "--timeout=300s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: not kube.list(PODS, kubelet.NAMESPACE, label_selector=AGENT_PODS)[0], 300,
             "the agent pods to be gone after helm uninstall")
    wirekubectl = Path(sys.executable).parent / "wirekubectl"
    left = {}
    for node in sorted(lab_.nodes):
        # The chart's wireguard-go and relay path sockets were in the pod's emptyDir, gone with it; the
        # lab nodes share this host's /run/wireguard with other labs, so cleanup looks in an empty dir.
        done = lab_.exec(node, [str(wirekubectl), "cleanup", "--socket-dir", str(tmp_path)], check=False,
                         timeout=120)
        assert done.returncode == 0, f"{node}: {done.stdout}{done.stderr}"
        state = nodestate.inspect(netns=lab_.netns(node))
        leftovers = {"link": state.link_kind, "rules": [r.text for r in state.rules], "routes": list(state.routes),
                     "nft": state.nft.present, "mss": state.mss.present}
        if any(leftovers.values()):
            left[node] = leftovers
    assert not left, left
