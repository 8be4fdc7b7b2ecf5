"""CIDR overlap checks for gateway routes.  Pure.

A gateway route becomes an AllowedIPs entry of the active gateway peer on every client, so a bad
one can capture traffic that belongs elsewhere.  :func:`effective_routes` keeps the routes that
are safe and explains each one it rejects:

* a route overlapping the mesh CIDR would capture the mesh's own addresses;
* a default route (prefix 0) needs the mesh's ``routing.allowDefaultRoute`` (egress gateway);
  it does contain the mesh CIDR, but every mesh /32 is more specific and wins;
* a route overlapping a route of a gateway that takes precedence (older, then smaller name)
  would give two peers the same addresses, and WireGuard keeps only the last one set;
* a route equal to an AllowedIPs entry of a non-gateway peer (a node's pod CIDR, say) would take
  that entry away from its owner;
* a duplicate of an earlier route of the same gateway is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from wirekube.models import Gateway, IPNetwork, Mesh


@dataclass(frozen=True)
class Rejected:
    cidr: IPNetwork
    reason: str

    def __str__(self) -> str:
        return f"{self.cidr}: {self.reason}"


@dataclass(frozen=True)
class OwnedCIDR:
    """A CIDR that someone else already holds (for messages: who and what)."""

    cidr: IPNetwork
    owner: str


def overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def first_overlap(cidr: IPNetwork, others: Iterable[OwnedCIDR]) -> OwnedCIDR | None:
    return next((o for o in others if overlaps(cidr, o.cidr)), None)


def effective_routes(
    gateway: Gateway,
    mesh: Mesh | None,
    precedence: Sequence[OwnedCIDR],
    peer_entries: Mapping[str, Sequence[IPNetwork]],
) -> tuple[tuple[IPNetwork, ...], tuple[Rejected, ...]]:
    """The routes of ``gateway`` that may be injected, and the rejected ones with reasons.

    ``precedence`` holds the routes of gateways that win over this one; ``peer_entries`` the
    AllowedIPs of every peer by name (gateway peers of this gateway are ignored).
    """
    accepted: list[IPNetwork] = []
    rejected: list[Rejected] = []
    others = [
        OwnedCIDR(e, f"WireKubePeer {name}")
        for name, entries in sorted(peer_entries.items())
        if name not in gateway.spec.peer_refs
        for e in entries
    ]
    for route in gateway.spec.routes:
        reason = _route_problem(route.cidr, mesh, precedence, others, accepted)
        if reason:
            rejected.append(Rejected(route.cidr, reason))
        else:
            accepted.append(route.cidr)
    return tuple(accepted), tuple(rejected)


def _route_problem(
    cidr: IPNetwork,
    mesh: Mesh | None,
    precedence: Sequence[OwnedCIDR],
    others: Sequence[OwnedCIDR],
    accepted: Sequence[IPNetwork],
) -> str:
    if cidr in accepted:
        return "duplicate route"
    if cidr.prefixlen == 0:
        if mesh is None or not mesh.spec.routing.allow_default_route:
            return "a default route needs WireKubeMesh spec.routing.allowDefaultRoute"
    elif mesh is not None and overlaps(cidr, mesh.spec.mesh_cidr):
        return f"overlaps the mesh CIDR {mesh.spec.mesh_cidr}"
    clash = first_overlap(cidr, precedence)
    if clash is not None:
        return f"overlaps route {clash.cidr} of {clash.owner}, which takes precedence"
    same = next((o for o in others if o.cidr == cidr), None)
    if same is not None:
        return f"is already an AllowedIPs entry of {same.owner}"
    return ""
