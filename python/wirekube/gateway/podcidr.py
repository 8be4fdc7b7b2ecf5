"""Pod CIDR sync: each node's pod CIDRs into its WireKubePeer's AllowedIPs.  Pure.

With WireKubeMesh ``spec.podCIDRSync``:

* ``node``: the CIDRs come from ``Node.spec.podCIDRs`` (or the older ``spec.podCIDR``);
* ``cilium``: from ``CiliumNode`` (cilium.io/v2) ``spec.ipam.podCIDRs`` of the same name;
* ``none``: nothing, and entries synced earlier are removed.

Who writes what.  The controller patches ``spec.allowedIPs`` of the peer and records the entries
it added in the peer annotation ``wirekube.io/pod-cidrs`` (comma-separated).  Only those entries
are ever removed or replaced by the controller, so entries added by the agent (mesh /32,
InternalIP) or by a user survive; an entry a user added by hand that equals a pod CIDR stays the
user's.  The agent in turn keeps every entry it did not add itself (its own are listed in
``wirekube.io/auto-allowed-ips``), so the two never undo each other.  The controller's patch
carries the peer's resourceVersion, so it never overwrites a concurrent agent update.

A pod CIDR is refused, with a reason, when it overlaps the mesh CIDR, a service CIDR, a route of
a WireKubeGateway, or any AllowedIPs entry of another peer that is not a synced pod CIDR.  Two
nodes claiming overlapping pod CIDRs: the one already holding it keeps it, otherwise the older
peer (creationTimestamp, then name) gets it; the other is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wirekube.gateway.cidrs import OwnedCIDR, first_overlap, overlaps
from wirekube.models import IPNetwork, Mesh, Peer, PodCIDRSync

ANNOTATION_POD_CIDRS = "wirekube.io/pod-cidrs"
MAX_ALLOWED_IPS = 256


@dataclass(frozen=True)
class Refusal:
    peer: str
    cidr: IPNetwork
    reason: str

    def __str__(self) -> str:
        return f"{self.peer} {self.cidr}: {self.reason}"


@dataclass(frozen=True)
class PeerUpdate:
    """New ``spec.allowedIPs`` and pod-CIDR annotation for one peer (written against ``resource_version``)."""

    peer: str
    allowed_ips: tuple[IPNetwork, ...]
    managed: tuple[IPNetwork, ...]
    resource_version: str

    def merge_patch(self) -> dict[str, Any]:
        return {
            "metadata": {
                "resourceVersion": self.resource_version,
                "annotations": {ANNOTATION_POD_CIDRS: ",".join(str(n) for n in self.managed) or None},
            },
            "spec": {"allowedIPs": [str(n) for n in self.allowed_ips]},
        }


@dataclass(frozen=True)
class PodCIDRPlan:
    updates: tuple[PeerUpdate, ...] = ()
    refused: tuple[Refusal, ...] = ()
    synced: Mapping[str, tuple[IPNetwork, ...]] = field(default_factory=dict)


def node_pod_cidrs(node_obj: Mapping[str, Any]) -> tuple[IPNetwork, ...]:
    spec = node_obj.get("spec") or {}
    texts = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    return _parse_all(texts)


def cilium_pod_cidrs(ciliumnode_obj: Mapping[str, Any]) -> tuple[IPNetwork, ...]:
    ipam = (ciliumnode_obj.get("spec") or {}).get("ipam") or {}
    return _parse_all(ipam.get("podCIDRs") or [])


def _parse_all(texts: Any) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for text in texts if isinstance(texts, list) else []:
        try:
            net = ipaddress.ip_network(str(text), strict=False)
        except ValueError:
            continue
        if net not in out:
            out.append(net)
    return tuple(out)


def managed_entries(peer: Peer) -> tuple[IPNetwork, ...]:
    """The entries the controller added earlier (from the peer's annotation)."""
    return _parse_all([t.strip() for t in peer.annotations.get(ANNOTATION_POD_CIDRS, "").split(",") if t.strip()])


def plan_pod_cidrs(
    mesh: Mesh,
    peers: Sequence[Peer],
    sources: Mapping[str, Sequence[IPNetwork]],
    gateway_routes: Sequence[OwnedCIDR],
) -> PodCIDRPlan:
    """The peer updates that bring every peer's synced pod CIDRs to ``sources`` (by node name)."""
    if mesh.spec.pod_cidr_sync is PodCIDRSync.NONE:
        sources = {}
    managed = {p.name: managed_entries(p) for p in peers}
    base = {p.name: tuple(e for e in p.spec.allowed_ips if e not in managed[p.name]) for p in peers}
    fixed = [
        OwnedCIDR(mesh.spec.mesh_cidr, "the mesh CIDR"),
        *(OwnedCIDR(n, "a service CIDR") for n in mesh.spec.service_cidrs),
        *gateway_routes,
    ]
    granted: list[tuple[IPNetwork, str]] = []
    refused: list[Refusal] = []
    accepted: dict[str, list[IPNetwork]] = {p.name: [] for p in peers}
    for peer in _claim_order(peers, managed, sources):
        if peer.mesh_ip is None:
            continue  # not registered yet: its first entry must be its mesh /32
        for cidr in sources.get(peer.name, ()):
            reason = _refusal(peer, cidr, fixed, base, granted)
            if reason:
                refused.append(Refusal(peer.name, cidr, reason))
                continue
            granted.append((cidr, peer.name))
            if cidr not in base[peer.name]:
                accepted[peer.name].append(cidr)
    updates = tuple(u for p in peers if (u := _update(p, base[p.name], accepted[p.name], managed[p.name])) is not None)
    synced = {name: tuple(cidrs) for name, cidrs in accepted.items() if cidrs}
    return PodCIDRPlan(updates=updates, refused=tuple(refused), synced=synced)


def _claim_order(
    peers: Sequence[Peer], managed: Mapping[str, Sequence[IPNetwork]], sources: Mapping[str, Sequence[IPNetwork]]
) -> list[Peer]:
    """Peers holding their pod CIDRs already first, then by age: earlier claims win overlaps."""

    def holds(p: Peer) -> bool:
        return bool(set(managed[p.name]) & set(sources.get(p.name, ())))

    return sorted(peers, key=lambda p: (not holds(p), p.creation_timestamp or "~", p.name))


def _refusal(
    peer: Peer,
    cidr: IPNetwork,
    fixed: Sequence[OwnedCIDR],
    base: Mapping[str, Sequence[IPNetwork]],
    granted: Sequence[tuple[IPNetwork, str]],
) -> str:
    clash = first_overlap(cidr, fixed)
    if clash is not None:
        return f"overlaps {clash.owner} {clash.cidr}"
    for other, entries in sorted(base.items()):
        if other == peer.name:
            continue
        hit = next((e for e in entries if overlaps(cidr, e)), None)
        if hit is not None:
            return f"overlaps AllowedIPs entry {hit} of WireKubePeer {other}"
    for held, owner in granted:
        if owner != peer.name and overlaps(cidr, held):
            return f"overlaps pod CIDR {held} of node {owner}"
    return ""


def _update(
    peer: Peer, base: Sequence[IPNetwork], accepted: Sequence[IPNetwork], managed: Sequence[IPNetwork]
) -> PeerUpdate | None:
    room = max(0, MAX_ALLOWED_IPS - len(base))
    wanted = tuple(accepted[:room])
    allowed = (*base, *wanted)
    if allowed == peer.spec.allowed_ips and wanted == tuple(managed):
        return None
    return PeerUpdate(peer.name, allowed, wanted, peer.resource_version)
