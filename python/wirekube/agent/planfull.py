"""The from-scratch plan: the desired dataplane of this node, with every peer validated in turn
(the rules are in :mod:`wirekube.agent.plan`'s docstring).

Also the pieces the incremental planner (:mod:`wirekube.agent.incremental`) shares with it: the
per-peer checks, the mesh IP index and the rules WireKube owns.  Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from wirekube.agent.plantypes import (
    MAIN_TABLE,
    RULE_PRIORITY_BYPASS,
    RULE_PRIORITY_FWMARK,
    RULE_PRIORITY_TABLE,
    Desired,
    Dropped,
    LinkConfig,
    LocalFacts,
    PeerPath,
    Route,
    Rule,
    Skipped,
    route_for,
)
from wirekube.agent.wg.base import WgPeerConfig, sorted_nets
from wirekube.models import (
    FWMARK,
    ROUTE_TABLE,
    IPAddress,
    IPNetwork,
    LocalSubnetPolicy,
    Mesh,
    Peer,
    RoutingSpec,
    parse_key,
)

_NEVER_ROUTED = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32", "::1/128", "fe80::/10", "ff00::/8")
)


def plan(
    mesh: Mesh,
    peers: Sequence[Peer],
    node: LocalFacts,
    paths: Mapping[str, PeerPath] | None = None,
) -> Desired:
    """The desired dataplane of ``node`` (see the module docstring for the rules).

    This is the from-scratch reference: :class:`IncrementalPlanner` must return exactly this for
    the same inputs (the agent uses that one; tests compare the two).
    """
    paths = paths or {}
    spec = mesh.spec
    ordered = sorted(peers, key=_order)
    own = next((p for p in ordered if p.name == node.name), None)
    own_ip = _mesh_ip(own, mesh)
    skipped: list[Skipped] = []
    dropped: list[Dropped] = []

    others = _valid_identities(ordered, node, mesh, own_ip, skipped)
    mesh_ips = _mesh_ip_index(others, mesh)

    configs: dict[str, WgPeerConfig] = {}
    names: dict[str, str] = {}
    forced: set[str] = set()
    routes: set[Route] = set()
    taken: set[IPNetwork] = set()
    for peer in others:
        if not peer.spec.allowed_ips:
            continue  # passive peer: no WireGuard entry, no routes
        reason = _claim_reason(peer, node, own_ip, mesh_ips, spec.mesh_cidr)
        if reason:
            skipped.append(Skipped(peer.name, reason))
            continue
        entries = _accepted_entries(peer, mesh, node, taken, dropped)
        taken.update(entries)
        path = paths.get(peer.name, _NO_PATH)
        cfg = _peer_config(peer, entries, path)
        configs[cfg.public_key] = cfg
        names[cfg.public_key] = peer.name
        if path.endpoint is not None:
            forced.add(cfg.public_key)
        routes.update(route_for(net, spec.interface_name, path, spec.mtu) for net in entries)

    return Desired(
        link=_link_config(mesh, own_ip),
        listen_port=spec.listen_port,
        fwmark=FWMARK,
        public_key=node.public_key,
        peers=configs,
        peer_names=names,
        forced_endpoints=frozenset(forced),
        routes=frozenset(routes),
        rules=frozenset(desired_rules(node.api_server_ips, {r.dst.version for r in routes})),
        skipped=tuple(skipped),
        dropped=tuple(dropped),
    )


_NO_PATH = PeerPath()
_EXCLUDED = "overlaps routing.excludeCIDRs (only the rest is routed)"
_TAKEN = "already routed to an older peer"


def _order(p: Peer) -> tuple[str, str]:
    """Older peers first (they win conflicts); peers without a timestamp last, then by name."""
    return (p.creation_timestamp or "~", p.name)


def _link_config(mesh: Mesh, own_ip: ipaddress.IPv4Address | None) -> LinkConfig:
    return LinkConfig(
        ifname=mesh.spec.interface_name,
        mtu=mesh.spec.mtu,
        address=ipaddress.IPv4Interface(f"{own_ip}/32") if own_ip is not None else None,
    )


def _peer_config(peer: Peer, entries: Iterable[IPNetwork], path: PeerPath) -> WgPeerConfig:
    return WgPeerConfig(
        public_key=peer.spec.public_key,
        endpoint=path.endpoint or peer.spec.endpoint,
        allowed_ips=sorted_nets(entries),
        persistent_keepalive=path.keepalive if path.keepalive is not None else peer.spec.persistent_keepalive,
    )


def desired_rules(api_server_ips: Iterable[IPAddress], route_families: set[int]) -> list[Rule]:
    rules: list[Rule] = []
    for family in sorted(route_families | {4}):
        rules.append(Rule(family, RULE_PRIORITY_FWMARK, MAIN_TABLE, fwmark=FWMARK))
        rules.append(Rule(family, RULE_PRIORITY_TABLE, ROUTE_TABLE))
        for ip in api_server_ips:
            if ip.version == family:
                rules.append(Rule(family, RULE_PRIORITY_BYPASS, MAIN_TABLE, dst=ipaddress.ip_network(ip)))
    return rules


def is_wirekube_rule(rule: Rule) -> bool:
    """Whether WireKube owns ``rule`` (only such rules are ever deleted)."""
    if rule.foreign:
        return False
    if rule.table == ROUTE_TABLE:
        return True
    if rule.table != MAIN_TABLE:
        return False
    if rule.fwmark == FWMARK and rule.dst is None:
        return rule.priority < RULE_PRIORITY_TABLE
    return (
        rule.priority == RULE_PRIORITY_BYPASS
        and rule.fwmark == 0
        and rule.dst is not None
        and rule.dst.prefixlen == rule.dst.max_prefixlen
    )


def _mesh_ip(peer: Peer | None, mesh: Mesh) -> ipaddress.IPv4Address | None:
    if peer is None:
        return None
    ip = peer.mesh_ip
    return ip if ip is not None and ip in mesh.spec.mesh_cidr else None


class _MeshIps:
    """The mesh IPs of the peers whose identity is valid, sorted, for range look-ups.

    ``oldest_in(entry)`` answers "whose mesh IP does this entry contain" in O(log n + hits)
    instead of testing every mesh IP against every entry (quadratic at 1,000 peers).
    """

    def __init__(self) -> None:
        self._ints: list[int] = []
        self._by_int: dict[int, tuple[object, str, ipaddress.IPv4Address]] = {}

    def add(self, ip: ipaddress.IPv4Address, owner: str, rank: object) -> None:
        n = int(ip)
        if n not in self._by_int:
            bisect.insort(self._ints, n)
        self._by_int[n] = (rank, owner, ip)

    def remove(self, ip: ipaddress.IPv4Address) -> None:
        n = int(ip)
        if self._by_int.pop(n, None) is not None:
            del self._ints[bisect.bisect_left(self._ints, n)]

    def owner(self, ip: ipaddress.IPv4Address) -> str | None:
        hit = self._by_int.get(int(ip))
        return hit[1] if hit is not None else None

    def oldest_in(
        self, entry: IPNetwork, not_owner: str, not_ip: ipaddress.IPv4Address | None
    ) -> tuple[ipaddress.IPv4Address, str] | None:
        """The mesh IP inside ``entry`` whose owner is oldest (lowest rank), skipping the asker's."""
        lo, hi = int(entry.network_address), int(entry.broadcast_address)
        best: tuple[object, str, ipaddress.IPv4Address] | None = None
        ints = self._ints
        i = bisect.bisect_left(ints, lo)
        while i < len(ints) and ints[i] <= hi:
            hit = self._by_int[ints[i]]
            i += 1
            if hit[1] == not_owner or hit[2] == not_ip:
                continue
            if best is None or hit[0] < best[0]:  # type: ignore[operator]
                best = hit
        return (best[2], best[1]) if best is not None else None


def _mesh_ip_index(others: Sequence[Peer], mesh: Mesh) -> _MeshIps:
    """The mesh IPs of ``others`` (valid identities, oldest first: the rank is the position).

    This node's own mesh IP is not indexed: an entry containing it is refused before the index
    is consulted (_claim_reason), so it could never be the answer.
    """
    mesh_ips = _MeshIps()
    for rank, p in enumerate(others):
        if (ip := _mesh_ip(p, mesh)) is not None:
            mesh_ips.add(ip, p.name, rank)
    return mesh_ips


def _valid_identities(
    ordered: Sequence[Peer], node: LocalFacts, mesh: Mesh, own_ip: ipaddress.IPv4Address | None, skipped: list[Skipped]
) -> list[Peer]:
    """Other peers whose key and mesh IP are usable (older peers win conflicts)."""
    keys: dict[str, str] = {node.public_key: node.name}
    ips: dict[ipaddress.IPv4Address, str] = {own_ip: node.name} if own_ip is not None else {}
    valid: list[Peer] = []
    for peer in ordered:
        if peer.name == node.name:
            continue
        reason = _identity_problem(peer, mesh, keys, ips)
        if reason:
            skipped.append(Skipped(peer.name, reason))
            continue
        keys[peer.spec.public_key] = peer.name
        if (ip := _mesh_ip(peer, mesh)) is not None:
            ips[ip] = peer.name
        valid.append(peer)
    return valid


def _key_error(key: str) -> str:
    try:
        parse_key(key)
    except ValueError as e:
        return f"spec.publicKey: {e}"
    return ""


def _same_key(owner: str) -> str:
    return f"spec.publicKey is the same key as peer {owner!r}"


def _same_ip(ip: ipaddress.IPv4Address, owner: str) -> str:
    return f"mesh IP {ip} is already claimed by peer {owner!r}"


def _identity_problem(
    peer: Peer, mesh: Mesh, keys: Mapping[str, str], ips: Mapping[ipaddress.IPv4Address, str]
) -> str:
    if reason := _key_error(peer.spec.public_key):
        return reason
    if peer.spec.public_key in keys:
        return _same_key(keys[peer.spec.public_key])
    ip = _mesh_ip(peer, mesh)
    if ip is not None and ip in ips:
        return _same_ip(ip, ips[ip])
    return ""


def _accepted_entries(
    peer: Peer,
    mesh: Mesh,
    node: LocalFacts,
    taken: set[IPNetwork],
    dropped: list[Dropped],
) -> list[IPNetwork]:
    """The peer's AllowedIPs after filtering (the peer's claims were checked already)."""
    routing = mesh.spec.routing
    accepted: list[IPNetwork] = []
    for entry in peer.spec.allowed_ips:
        reason, check_taken = _static_drop(entry, node, routing)
        if not reason and check_taken and entry in taken:
            reason = _TAKEN
        if reason:
            dropped.append(Dropped(peer.name, entry, reason))
            continue
        pieces = _subtract(entry, routing.exclude_cidrs)
        if pieces != [entry]:
            dropped.append(Dropped(peer.name, entry, _EXCLUDED))
        accepted.extend(p for p in pieces if p not in taken)
    return accepted


def _claim_reason(
    peer: Peer,
    node: LocalFacts,
    own_ip: ipaddress.IPv4Address | None,
    mesh_ips: _MeshIps,
    mesh_cidr: ipaddress.IPv4Network,
) -> str:
    """Why one of the peer's entries invalidates the peer ("" when none does).

    Inside meshCIDR an entry may hold only the peer's own mesh IP.  Entries wider than meshCIDR
    (an egress range, a default route) may cover mesh IPs: the /32s are more specific and win,
    both in WireGuard's cryptokey routing and in the route table.
    """
    peer_ip = peer.mesh_ip
    for i, entry in enumerate(peer.spec.allowed_ips):
        where = f"spec.allowedIPs[{i}] {entry}"
        if entry.prefixlen == entry.max_prefixlen and entry.network_address in node.addresses:
            return f"{where} claims this node's own address"
        if entry.version != 4 or not entry.subnet_of(mesh_cidr):
            continue
        if own_ip is not None and own_ip in entry:
            return f"{where} contains this node's mesh IP {own_ip}"
        if (hit := mesh_ips.oldest_in(entry, peer.name, peer_ip)) is not None:
            return f"{where} contains the mesh IP {hit[0]} of peer {hit[1]!r}"
    return ""


def _static_drop(entry: IPNetwork, node: LocalFacts, routing: RoutingSpec) -> tuple[str, bool]:
    """Why ``entry`` is dropped whatever the other peers claim ("" for kept), and whether it must
    then still be checked against the entries older peers already route (an allowed default
    route is not: several peers may offer one)."""
    if entry.prefixlen == 0 and not routing.allow_default_route:
        return "a default route needs routing.allowDefaultRoute", False
    if any(entry.version == n.version and entry.subnet_of(n) for n in _NEVER_ROUTED):  # type: ignore[arg-type]
        return "loopback, link-local and multicast ranges are never routed", False
    if entry.prefixlen == 0:
        return "", False  # an allowed default route: the main-table bypass rules keep the API server reachable
    if any(a in entry for a in node.api_server_ips):
        return "contains the API server's address", False
    local = (s for s in node.subnets if s.version == entry.version)
    if routing.local_subnet_policy is LocalSubnetPolicy.SKIP and any(entry.overlaps(s) for s in local):
        return "overlaps one of this node's own subnets (routing.localSubnetPolicy=skip)", False
    return "", True


def _subtract(entry: IPNetwork, excludes: Sequence[IPNetwork]) -> list[IPNetwork]:
    pieces: list[IPNetwork] = [entry]
    for ex in excludes:
        nxt: list[IPNetwork] = []
        for piece in pieces:
            if piece.version != ex.version or not piece.overlaps(ex):
                nxt.append(piece)
            elif not piece.subnet_of(ex):  # type: ignore[arg-type]
                nxt.extend(piece.address_exclude(ex))  # type: ignore[arg-type]
        pieces = nxt
    return sorted(pieces, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


def mesh_ip_claims(peers: Iterable[Peer], mesh: Mesh) -> dict[ipaddress.IPv4Address, str]:
    """Mesh IPs claimed by ``peers`` (for ``ipam.choose_mesh_ip``)."""
    return {ip: p.name for p in peers if (ip := _mesh_ip(p, mesh)) is not None}
