"""The agent's Kubernetes side against a real kube-apiserver: registration, status, Events.

A private control plane (the mesh singleton must not be shared with other tests).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.keys import public_key
from tests.integration.agent_netns import wait_for
from wirekube import ipam, k8s
from wirekube.agent.plan import Skipped
from wirekube.agent.source import KubeSource
from wirekube.lab.cluster import ControlPlane
from wirekube.models import PeerStatus, Transport, TransportMode

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(300)]
CIDR = "10.254.0.0/16"


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(Path(tmp_path_factory.mktemp("agent-cp")) / "cluster").up()
    try:
        yield plane
    finally:
        plane.down()


@pytest.fixture(scope="module")
def kube(cp: ControlPlane) -> Iterator[k8s.Kube]:
    client = k8s.Kube.from_kubeconfig(cp.kubeconfig)
    client.create(k8s.MESHES, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeMesh",
                               "metadata": {"name": "default"}, "spec": {"meshCIDR": CIDR, "listenPort": 51820,
                                                                         "autoAllowedIPs": {"includeNodeInternalIP": True}}})
    yield client
    client.close()


def make_node(kube: k8s.Kube, name: str, internal: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    node = kube.create(k8s.NODES, {"apiVersion": "v1", "kind": "Node",
                                   "metadata": {"name": name, "annotations": annotations or {}}})
    kube.patch_status(k8s.NODES, name, {"status": {"addresses": [{"type": "InternalIP", "address": internal}]}})
    return node


def started(kube: k8s.Kube, name: str) -> KubeSource:
    src = KubeSource(kube, name).start()
    assert src.peers.wait_synced(30) and src.meshes.wait_synced(30)
    wait_for(lambda: src.snapshot() is not None, 30, "mesh in the informer cache")
    return src


def test_registration_creates_and_keeps_own_peer(kube: k8s.Kube, unique: str) -> None:
    name = f"node-{unique}"
    node = make_node(kube, name, "192.168.50.7")
    src = started(kube, name)
    try:
        key = public_key()
        src.register(key)
        peer = kube.get(k8s.PEERS, name)
        assert peer["metadata"]["labels"] == {"wirekube.io/node": name}
        assert peer["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
        assert peer["spec"]["publicKey"] == key
        assert peer["spec"]["allowedIPs"] == [f"{ipam.mesh_ip(name, CIDR)}/32", "192.168.50.7/32"]
        assert peer["spec"]["endpoint"] == "192.168.50.7:51820"

        kube.patch_merge(k8s.PEERS, name, {"spec": {"allowedIPs": [*peer["spec"]["allowedIPs"], "10.77.0.0/24"]}})
        wait_for(lambda: "10.77.0.0/24" in src.peers.cache.get(name, {}).get("spec", {}).get("allowedIPs", []), 30,
                 "informer update")
        src.register(key)
        wait_for(lambda: (src.peers.cache.get(name, {}).get("status") or {}).get("endpointDiscoveryMethod")
                 == "internal-ip", 30,
                 "discovery method in status")
        rv = kube.get(k8s.PEERS, name)["metadata"]["resourceVersion"]
        src.register(key)
        after = kube.get(k8s.PEERS, name)
        assert after["spec"]["allowedIPs"][-1] == "10.77.0.0/24", "user-added entry must be kept"
        assert after["metadata"]["resourceVersion"] == rv, "an up-to-date peer is not rewritten"
    finally:
        src.stop()


def test_own_node_is_watched_and_an_annotation_change_reaches_registration(kube: k8s.Kube, unique: str) -> None:
    name = f"node-{unique}"
    make_node(kube, name, "192.168.50.9")
    make_node(kube, f"other-{unique}", "192.168.50.10")
    woke: list[int] = []
    src = KubeSource(kube, name, on_change=lambda: woke.append(1)).start()
    try:
        wait_for(lambda: src.node.wait_synced(0) and name in src.node.cache, 30, "own Node in the watch cache")
        assert list(src.node.cache) == [name]  # only this node: the field selector holds
        wait_for(lambda: src.snapshot() is not None, 30, "mesh in the informer cache")
        key = public_key()
        src.register(key)
        assert kube.get(k8s.PEERS, name)["spec"]["endpoint"] == "192.168.50.9:51820"
        before = len(woke)
        kube.patch_merge(k8s.NODES, name, {"metadata": {"annotations": {"wirekube.io/endpoint": "203.0.113.9:51820"}}})
        wait_for(lambda: (src.node.cache.get(name, {}).get("metadata", {}).get("annotations") or {})
                 .get("wirekube.io/endpoint"), 30, "annotation in the watch cache")
        assert len(woke) > before  # the agent's loop is woken by its Node changing
        src.register(key)
        assert kube.get(k8s.PEERS, name)["spec"]["endpoint"] == "203.0.113.9:51820"
    finally:
        src.stop()


def test_mesh_ip_moves_off_an_address_an_older_peer_holds(kube: k8s.Kube, unique: str) -> None:
    name = f"late-{unique}"
    make_node(kube, name, "192.168.50.8")
    taken = ipam.mesh_ip(name, CIDR)
    kube.create(k8s.PEERS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer",
                            "metadata": {"name": f"early-{unique}"},
                            "spec": {"publicKey": public_key(), "allowedIPs": [f"{taken}/32"]}})
    src = started(kube, name)
    try:
        wait_for(lambda: f"early-{unique}" in src.peers.cache, 30, "other peer cached")
        src.register(public_key())
        first = ipaddress.ip_network(kube.get(k8s.PEERS, name)["spec"]["allowedIPs"][0])
        assert first.network_address != taken and first.subnet_of(ipaddress.ip_network(CIDR))  # type: ignore[arg-type]
    finally:
        src.stop()


def test_status_is_written_and_skipped_peers_become_events(kube: k8s.Kube, unique: str) -> None:
    name = f"stat-{unique}"
    make_node(kube, name, "192.168.50.9")
    src = started(kube, name)
    try:
        src.register(public_key())
        wait_for(lambda: name in src.peers.cache, 30, "own peer cached")
        status = PeerStatus(connected=True, transport_mode=TransportMode.DIRECT,
                            peer_transports={"other": Transport.DIRECT}, last_handshake="2025-01-01T00:00:00Z")
        src.publish(status, [Skipped(f"bad-{unique}", "spec.allowedIPs[0] claims this node's own address")])
        got = kube.get(k8s.PEERS, name)["status"]
        assert got["connected"] is True and got["transportMode"] == "direct"
        assert got["peerTransports"] == {"other": "direct"} and got["lastHandshake"] == "2025-01-01T00:00:00Z"
        events, _ = kube.list(k8s.EVENTS, namespace="default")
        notes = [e.get("note", "") for e in events if e.get("reason") == "PeerSkipped"]
        assert any(f"bad-{unique}" in n and "own address" in n for n in notes)
        src.publish(status, [Skipped(f"bad-{unique}", "spec.allowedIPs[0] claims this node's own address")])
        events2, _ = kube.list(k8s.EVENTS, namespace="default")
        assert len([e for e in events2 if f"bad-{unique}" in e.get("note", "")]) == 1, "no repeated Event"
    finally:
        src.stop()
