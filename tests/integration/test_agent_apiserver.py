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
from wirekube import ipam, k8s, reports
from wirekube.agent.plan import Skipped
from wirekube.agent.source import KubeSource
from wirekube.lab.cluster import ControlPlane
from wirekube.models import PAIR_FIELDS, BirthdayRound, PeerStatus, Transport, TransportMode

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
                               "metadata": {"name": "default"},
                               "spec": {"meshCIDR": CIDR, "listenPort": 51820,
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
        assert got["connected"] is True
        # Issue 20: what every agent watches holds no per-pair map; the node's report does.
        assert not set(got) & set(PAIR_FIELDS), got
        report = kube.get(k8s.NODE_REPORTS, name)["status"]
        assert report["peerTransports"] == {"other": "direct"} and report["lastHandshake"] == "2025-01-01T00:00:00Z"
        assert report["transportMode"] == "direct"
        events, _ = kube.list(k8s.EVENTS, namespace="default")
        notes = [e.get("note", "") for e in events if e.get("reason") == "PeerSkipped"]
        assert any(f"bad-{unique}" in n and "own address" in n for n in notes)
        src.publish(status, [Skipped(f"bad-{unique}", "spec.allowedIPs[0] claims this node's own address")])
        events2, _ = kube.list(k8s.EVENTS, namespace="default")
        assert len([e for e in events2 if f"bad-{unique}" in e.get("note", "")]) == 1, "no repeated Event"
    finally:
        src.stop()


def test_pair_observations_reach_only_their_readers_and_unchanged_status_is_not_rewritten(
        kube: k8s.Kube, unique: str) -> None:
    """Issue 20: per-pair observations go to the node's WireKubeNodeReport, an observed endpoint and
    a birthday round to a WireKubePairSignal that only the addressee's agent watches (and sees as
    the sender's status.observedEndpoints / status.birthday entry for it, as before). A pass that
    changes nothing a reader needs writes nothing, a later handshake time included."""
    a, b, c = f"obs-a-{unique}", f"obs-b-{unique}", f"obs-c-{unique}"
    for n, ip in ((a, "192.168.60.1"), (b, "192.168.60.2"), (c, "192.168.60.3")):
        make_node(kube, n, ip)
    srcs = {n: started(kube, n) for n in (a, b, c)}
    try:
        for src in srcs.values():
            src.register(public_key())
        wait_for(lambda: all(n in srcs[a].peers.cache for n in (a, b, c)), 30, "all three peers cached")
        bday = BirthdayRound(3, "2026-12-07T16:00:05.000Z", 40000, 40511)
        status = PeerStatus(connected=True, transport_mode=TransportMode.MIXED,
                            peer_transports={b: Transport.DIRECT, c: Transport.RELAY},
                            relay_reasons={c: "udp blocked (peer)"}, path_mtu={b: 1360},
                            last_handshake="2026-12-07T16:00:00Z",
                            observed_endpoints={b: "198.51.100.7:40000"}, birthday={c: bday})
        srcs[a].publish(status, [])
        signals, _ = kube.list(k8s.PAIR_SIGNALS, label_selector=f"wirekube.io/from={a}")
        assert sorted(o["metadata"]["name"] for o in signals) == [f"{a}.{b}", f"{a}.{c}"]
        # The addressee sees the sender's word to it, and only that.
        def seen_by(n: str) -> Any:
            snap = srcs[n].snapshot()
            return next((p for p in snap.peers if p.name == a), None) if snap else None

        wait_for(lambda: (p := seen_by(b)) is not None and p.status.observed_endpoints.get(b) == "198.51.100.7:40000",
                 30, f"{b} sees {a}'s observation of it")
        wait_for(lambda: (p := seen_by(c)) is not None and p.status.birthday.get(c) == bday, 30,
                 f"{c} sees {a}'s birthday round with it")
        assert set(srcs[b].signals.cache) == {f"{a}.{b}"} and set(srcs[c].signals.cache) == {f"{a}.{c}"}
        seen = seen_by(b)
        assert seen is not None and not seen.status.birthday and set(seen.status.observed_endpoints) == {b}
        # Readers of every pair (wirekubectl status, doctor, the lab) get the v1alpha1 shape.
        merged = reports.get_peer(kube, a)["status"]
        assert merged["peerTransports"] == {b: "direct", c: "relay"}
        assert merged["relayReasons"] == {c: "udp blocked (peer)"}
        assert merged["pathMTU"] == {b: 1360}
        assert merged["observedEndpoints"] == {b: "198.51.100.7:40000"}
        assert merged["birthday"][c]["round"] == 3
        # Nothing a reader needs changed (a handshake time advanced, a port step moved): nothing is written.
        wait_for(lambda: "connected" in (srcs[a].peers.cache[a].get("status") or {}), 30, "own status cached")
        before = {r.plural: kube.get(r, a)["metadata"]["resourceVersion"] for r in (k8s.PEERS, k8s.NODE_REPORTS)}
        sig_before = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in signals}
        import dataclasses

        later = dataclasses.replace(status, last_handshake="2026-12-07T16:02:00Z", nat_port_step=7)
        srcs[a].publish(later, [])
        after = {r.plural: kube.get(r, a)["metadata"]["resourceVersion"] for r in (k8s.PEERS, k8s.NODE_REPORTS)}
        signals, _ = kube.list(k8s.PAIR_SIGNALS, label_selector=f"wirekube.io/from={a}")
        assert after == before
        assert {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in signals} == sig_before
        # A transport change is written to the report only; the peer object stays as it was.
        moved = dataclasses.replace(later, peer_transports={b: Transport.RELAY, c: Transport.RELAY},
                                    relay_reasons={b: "direct path failed", c: "udp blocked (peer)"}, path_mtu={})
        srcs[a].publish(moved, [])
        assert kube.get(k8s.PEERS, a)["metadata"]["resourceVersion"] == before[k8s.PEERS.plural]
        report = kube.get(k8s.NODE_REPORTS, a)["status"]
        assert report["peerTransports"] == {b: "relay", c: "relay"} and not report.get("pathMTU")
        assert report["lastHandshake"] == "2026-12-07T16:02:00Z" and report["natPortStep"] == 7  # carried along
        # Withdrawn observations: their signals go.
        srcs[a].publish(dataclasses.replace(moved, observed_endpoints={}, birthday={}), [])
        assert kube.list(k8s.PAIR_SIGNALS, label_selector=f"wirekube.io/from={a}")[0] == []
        wait_for(lambda: not srcs[b].signals.cache, 30, f"{b}'s signal cache emptied")
        # What an agent from before issue 20 left on the peer goes with the next write.
        kube.patch_status(k8s.PEERS, b, {"status": {"peerTransports": {a: "direct"}, "birthday": {}}})
        wait_for(lambda: "peerTransports" in (srcs[b].peers.cache[b].get("status") or {}), 30, "legacy status cached")
        srcs[b].publish(PeerStatus(connected=True, peer_transports={a: Transport.DIRECT}), [])
        assert not set(kube.get(k8s.PEERS, b)["status"]) & set(PAIR_FIELDS)
    finally:
        for src in srcs.values():
            src.stop()


def test_without_the_split_crds_the_agent_publishes_the_v1alpha1_way(cp: ControlPlane, kube: k8s.Kube,
                                                                      unique: str) -> None:
    """A chart from before issue 20 (no WireKubeNodeReport / WireKubePairSignal CRDs): the agent
    says so once and keeps everything on its WireKubePeer. Last in the module: it deletes CRDs."""
    name = f"old-{unique}"
    make_node(kube, name, "192.168.61.1")
    for crd in ("wirekubenodereports.wirekube.io", "wirekubepairsignals.wirekube.io"):
        kube.delete(k8s.CRDS, crd)

    def gone() -> bool:
        try:
            kube.list(k8s.NODE_REPORTS)
        except Exception:  # noqa: BLE001 - NotFound once the API server stopped serving it
            return True
        return False

    wait_for(gone, 60, "the report CRD no longer served")
    src = started(kube, name)
    try:
        src.register(public_key())
        wait_for(lambda: name in src.peers.cache, 30, "own peer cached")
        status = PeerStatus(connected=True, peer_transports={"x": Transport.RELAY}, relay_reasons={"x": "why"},
                            observed_endpoints={"x": "198.51.100.9:4000"})
        src.publish(status, [])  # finds the CRDs missing
        src.publish(status, [])  # writes everything on the peer
        got = kube.get(k8s.PEERS, name)["status"]
        assert got["peerTransports"] == {"x": "relay"} and got["observedEndpoints"] == {"x": "198.51.100.9:4000"}
        assert reports.get_peer(kube, name)["status"]["relayReasons"] == {"x": "why"}
    finally:
        src.stop()
