"""Who may route what: the AllowedIPs entries of a peer that carry traffic.  Pure (no I/O, no clock).

A WireKubePeer is written by its node's agent, the least trusted writer in the mesh, so what
it claims in ``spec.allowedIPs`` is only a request.  Every receiving agent routes an entry only
when an authoritative source grants it to that peer:

* the peer's own mesh IP (its first entry; identity conflicts are the planner's business);
* a :class:`~wirekube.models.RouteGrant` listing the peer's node and a CIDR containing the entry:
  the gateway controller keeps one per node from the Node object (its InternalIP when
  ``autoAllowedIPs.includeNodeInternalIP``, its pod CIDRs with ``podCIDRSync``), administrators
  write the others (subnet routers, egress ranges); agents can only read grants;
* a route of a WireKubeGateway whose active peer it is (``gateway.contract.client_allowed_ips``).

Whatever is granted, entries holding an address the mesh's own control traffic needs are never
routed (the *guarded* addresses): the API server, the relays and STUN servers, every other
peer's published endpoint and this node's own addresses.  Capturing one of them would black-hole the
relay connection, the API server or another peer's WireGuard path.

What is refused comes back as :class:`Refusal` (the entry, why, and the fix), which the agent
turns into Events, a condition on its own peer and a metric, and ``wirekubectl doctor`` lists.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from wirekube.models import IPAddress, IPNetwork, Mesh, Peer, RouteGrant


@dataclass(frozen=True, slots=True)
class Guarded:
    """An address no peer may capture, and what it is (for the message)."""

    address: IPAddress
    what: str
    owner: str = ""
    """The peer whose own endpoint this is: its own entries may hold it (its InternalIP is often
    its endpoint; WireGuard's packets to it carry the fwmark and stay in the main table)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    peer: str
    entry: IPNetwork
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.peer} {self.entry}: {self.reason} (fix: {self.fix})"


def grants_by_node(grants: Iterable[RouteGrant]) -> dict[str, tuple[IPNetwork, ...]]:
    """Granted networks per node name, from every grant that names the node."""
    return merge_grants(*({node: g.cidrs for node in g.nodes} for g in grants))


def merge_grants(*maps: Mapping[str, Sequence[IPNetwork]]) -> dict[str, tuple[IPNetwork, ...]]:
    out: dict[str, list[IPNetwork]] = {}
    for m in maps:
        for node, nets in m.items():
            have = out.setdefault(node, [])
            have.extend(n for n in nets if n not in have)
    return {n: tuple(v) for n, v in out.items()}


def guarded_addresses(
    mesh: Mesh,
    peers: Iterable[Peer],
    api_server_ips: Iterable[IPAddress] = (),
    own_addresses: Iterable[IPAddress] = (),
    resolved: Iterable[Guarded] = (),
) -> tuple[Guarded, ...]:
    """Every address the mesh's control traffic needs, first reason first.

    ``resolved`` adds what only the agent knows (relay or STUN host names it resolved)."""
    out: dict[IPAddress, tuple[str, str]] = {}

    def add(addr: IPAddress | None, what: str, owner: str = "") -> None:
        if addr is not None and addr not in out:
            out[addr] = (what, owner)

    for a in api_server_ips:
        add(a, "the API server")
    for g in resolved:
        add(g.address, g.what, g.owner)
    spec = mesh.spec
    for hp in mesh.status.relay_endpoints:
        add(_literal(hp.host), f"the relay {hp}")
    if spec.relay.external_endpoint is not None:
        add(_literal(spec.relay.external_endpoint.host), f"the relay {spec.relay.external_endpoint}")
    for hp in spec.stun_servers:
        add(_literal(hp.host), f"the STUN server {hp}")
    for a in own_addresses:
        add(a, "this node's own address")
    for p in peers:
        if p.spec.endpoint is not None:
            add(p.spec.endpoint.ip, f"the endpoint of peer {p.name}", p.name)
    return tuple(Guarded(a, w, o) for a, (w, o) in out.items())


def named_hosts(mesh: Mesh) -> tuple[tuple[str, str], ...]:
    """The relay and STUN hosts the mesh names by DNS name, with what each is: the agent resolves
    them and passes the addresses to :func:`guarded_addresses` as ``resolved``."""
    spec = mesh.spec
    named = [(hp, f"the relay {hp}") for hp in mesh.status.relay_endpoints]
    if spec.relay.external_endpoint is not None:
        named.append((spec.relay.external_endpoint, f"the relay {spec.relay.external_endpoint}"))
    named += [(hp, f"the STUN server {hp}") for hp in spec.stun_servers]
    return tuple(dict.fromkeys((hp.host, what) for hp, what in named if _literal(hp.host) is None))


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class _GuardIndex:
    """Guarded addresses sorted per family: which of them lies inside a network, in O(log n)."""

    def __init__(self, guarded: Sequence[Guarded]) -> None:
        self._by_family: dict[int, tuple[list[int], list[Guarded]]] = {}
        for g in sorted(guarded, key=lambda g: (g.address.version, int(g.address))):
            keys, items = self._by_family.setdefault(g.address.version, ([], []))
            keys.append(int(g.address))
            items.append(g)

    def first_in(self, net: IPNetwork, claimant: str) -> Guarded | None:
        """The lowest guarded address inside ``net`` that is not ``claimant``'s own endpoint."""
        found = self._by_family.get(net.version)
        if found is None:
            return None
        keys, items = found
        last = int(net.broadcast_address)
        i = bisect.bisect_left(keys, int(net.network_address))
        while i < len(keys) and keys[i] <= last:
            if items[i].owner != claimant:
                return items[i]
            i += 1
        return None


def _granted(entry: IPNetwork, nets: Sequence[IPNetwork]) -> bool:
    return any(entry.version == n.version and entry.subnet_of(n) for n in nets)  # type: ignore[arg-type]


def peer_refusals(
    peer: Peer, granted: Sequence[IPNetwork], guard: _GuardIndex, mesh_cidr: ipaddress.IPv4Network
) -> tuple[tuple[IPNetwork, ...], tuple[Refusal, ...]]:
    """The entries of ``peer`` that may carry traffic, and the refused ones with reasons."""
    mesh_ip = peer.mesh_ip if peer.mesh_ip is not None and peer.mesh_ip in mesh_cidr else None
    kept: list[IPNetwork] = []
    refused: list[Refusal] = []
    for i, entry in enumerate(peer.spec.allowed_ips):
        where = f"spec.allowedIPs[{i}] {entry}"
        own = mesh_ip is not None and entry.prefixlen == entry.max_prefixlen and entry.network_address == mesh_ip
        if not own and not _granted(entry, granted):
            refused.append(Refusal(
                peer.name, entry,
                f"{where} is not granted to node {peer.name}: no WireKubeRouteGrant for the node and no route "
                "of a WireKubeGateway it is active for contains it",
                f"if node {peer.name} should carry it, grant it: a WireKubeRouteGrant with spec.nodes "
                f"[{peer.name}] and spec.cidrs [{entry}]; otherwise remove it from the peer",
            ))
            continue
        hit = guard.first_in(entry, peer.name)
        if hit is not None and not own:
            refused.append(Refusal(
                peer.name, entry,
                f"{where} contains {hit.address}, {hit.what}, which is never routed into the mesh",
                f"narrow the grant or the entry so that it leaves out {hit.address}",
            ))
            continue
        kept.append(entry)
    return tuple(kept), tuple(refused)


class Authorizer:
    """:func:`peer_refusals` over the whole peer list, remembering each peer's answer.

    A peer is re-judged only when its spec, its grants or the guarded set change, so one changed
    peer costs one peer's work (the planner after it relies on unchanged ``Peer`` objects)."""

    def __init__(self) -> None:
        self._guard_key: tuple[ipaddress.IPv4Network, tuple[Guarded, ...]] | None = None
        self._guard = _GuardIndex(())
        self._guarded_key: object = None
        self._guarded: tuple[Guarded, ...] = ()
        self._memo: dict[str, tuple[Peer, tuple[IPNetwork, ...], tuple[IPNetwork, ...], tuple[Refusal, ...]]] = {}

    def guarded(self, mesh: Mesh, peers: Sequence[Peer], api_server_ips: Sequence[IPAddress] = (),
                own_addresses: Sequence[IPAddress] = (), resolved: Sequence[Guarded] = ()) -> tuple[Guarded, ...]:
        """:func:`guarded_addresses`, rebuilt only when one of its inputs changed (peers' endpoints
        are compared by identity first, so an unchanged peer list costs one pass of pointer checks)."""
        key = (mesh.spec, mesh.status.relay_endpoints, tuple(api_server_ips), tuple(own_addresses), tuple(resolved),
               tuple((p.name, p.spec.endpoint) for p in peers))
        if key != self._guarded_key:
            self._guarded_key = key
            self._guarded = guarded_addresses(mesh, peers, api_server_ips, own_addresses, resolved)
        return self._guarded

    def authorize(
        self, mesh: Mesh, peers: Sequence[Peer], granted: Mapping[str, Sequence[IPNetwork]],
        guarded: Sequence[Guarded],
    ) -> tuple[tuple[Peer, ...], tuple[Refusal, ...]]:
        """``peers`` with only their authorized entries (unchanged objects where nothing is refused)."""
        key = (mesh.spec.mesh_cidr, tuple(guarded))
        if key != self._guard_key:
            self._guard_key = key
            self._guard = _GuardIndex(key[1])
            self._memo.clear()
        out: list[Peer] = []
        refusals: list[Refusal] = []
        memo: dict[str, tuple[Peer, tuple[IPNetwork, ...], tuple[IPNetwork, ...], tuple[Refusal, ...]]] = {}
        for p in peers:
            nets = granted.get(p.name, ())
            hit = self._memo.get(p.name)
            if (hit is not None and (hit[1] is nets or tuple(hit[1]) == tuple(nets))
                    and (hit[0] is p or hit[0].spec == p.spec)):
                kept, refused = hit[2], hit[3]
            else:
                kept, refused = peer_refusals(p, nets, self._guard, mesh.spec.mesh_cidr)
            memo[p.name] = (p, tuple(nets), kept, refused)
            out.append(p if not refused else dataclasses.replace(p, spec=dataclasses.replace(p.spec, allowed_ips=kept)))
            refusals.extend(refused)
        self._memo = memo
        return tuple(out), tuple(refusals)
