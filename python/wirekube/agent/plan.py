"""Desired dataplane state from the mesh, the peers and this node's facts; and the diff to reach it.

Pure module: no I/O, no clock (``now`` is passed in), no pyroute2, no kubernetes.

``plan()`` decides what the node should have:
- the interface (mesh /32, MTU, up, sysctls disable_xfrm=1, disable_policy=1, rp_filter=2);
- the WireGuard device (listen port, fwmark 0x574B, one peer per valid WireKubePeer);
- routes in table 22347, one per accepted AllowedIPs entry, via the interface;
- rules: ``fwmark 0x574B lookup main`` (priority 100), ``to <API server> lookup main``
  (priority 199) and ``lookup 22347`` (priority 200).

``diff()`` compares that with what was observed and returns the operations that close the gap.
It touches only what WireKube owns (its interface, table 22347, rules it recognises as its own),
never rewrites a WireGuard peer whose configuration already matches, and removes duplicates of
its own rules.  Applying the result and diffing again yields no operations.

The agent does not call ``plan()`` on every change: :class:`IncrementalPlanner` gives the same
answer while re-deciding only the peers a change can affect, and ``diff_since()`` turns the
difference between two plans into operations without re-reading the whole route table.  The
reconciler still does a full ``diff()`` (and a from-scratch plan) on every periodic resync.

Peers are validated here as well as in the models, because a bad peer must be *skipped with a
reason* while the rest of the mesh keeps working:
- a public key that is not a key, or this node's own key, or a key already used by an older peer;
- a mesh IP (first /32 entry) claimed by an older peer (``ipam.conflict_winner``);
- an AllowedIPs entry claiming one of this node's addresses, or, inside meshCIDR, containing this
  node's or another peer's mesh IP (wider entries such as egress ranges may cover mesh IPs: the
  /32s are more specific and win in WireGuard and in the route table).
Entries that are merely not routable from here are *dropped* (the peer stays): loopback,
link-local and multicast ranges, a default route unless ``routing.allowDefaultRoute``, the parts
covered by ``routing.excludeCIDRs``, entries overlapping this node's own subnets when
``routing.localSubnetPolicy`` is ``skip``, and exact duplicates of an older peer's entry
(WireGuard AllowedIPs are unique per device).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgDeviceState, WgOp, WgPeerConfig, sorted_nets
from wirekube.models import (
    FWMARK,
    ROUTE_TABLE,
    Endpoint,
    IPAddress,
    IPNetwork,
    LocalSubnetPolicy,
    Mesh,
    Peer,
    RoutingSpec,
    Transport,
    parse_key,
)

MAIN_TABLE = 254
RULE_PRIORITY_FWMARK = 100
RULE_PRIORITY_BYPASS = 199
RULE_PRIORITY_TABLE = 200
HANDSHAKE_FRESH_SECONDS = 180.0
"""WireGuard's REJECT_AFTER_TIME: a session younger than this is alive."""

INTERFACE_SYSCTLS: Mapping[str, str] = {"disable_xfrm": "1", "disable_policy": "1", "rp_filter": "2"}

_NEVER_ROUTED = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32", "::1/128", "fe80::/10", "ff00::/8")
)


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Rule:
    family: int
    priority: int
    table: int
    fwmark: int = 0
    dst: IPNetwork | None = None
    foreign: bool = False
    """The rule has selectors WireKube never sets (iif, src, uid...): never ours."""

    def __str__(self) -> str:
        sel = f"fwmark {self.fwmark:#x} " if self.fwmark else ""
        sel += f"to {self.dst} " if self.dst is not None else ""
        return f"ipv{self.family} pref {self.priority} {sel}lookup {self.table}"


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    dev: str
    table: int = ROUTE_TABLE
    mtu: int = 0
    """The route's MTU attribute (0: none, the interface's MTU applies): a peer's path MTU."""

    def __str__(self) -> str:
        return f"{self.dst} dev {self.dev} table {self.table}" + (f" mtu {self.mtu}" if self.mtu else "")


@dataclass(frozen=True)
class LocalFacts:
    """What the planner needs to know about this node (not to be confused with
    :class:`wirekube.traversal.nat.NodeFacts`, a node's NAT as path selection sees it)."""

    name: str
    public_key: str
    addresses: tuple[IPAddress, ...] = ()
    """The node's own addresses on every interface except WireKube's."""
    subnets: tuple[IPNetwork, ...] = ()
    """The node's connected subnets (interfaces' networks), loopback excluded."""
    api_server_ips: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class PeerPath:
    """Per-peer path decisions made outside the planner (NAT traversal / relay, issue 6)."""

    endpoint: Endpoint | None = None
    """Override of the WireGuard endpoint (e.g. a 127.0.0.1 relay proxy); always enforced."""
    keepalive: int | None = None
    """Override of the persistent keepalive (e.g. 1 s on peers whose rx feeds failover)."""
    transport: Transport = Transport.DIRECT
    mtu: int | None = None
    """The path MTU measured towards this peer (issue 18), set on its routes when it is below the
    interface's MTU; None: the interface's MTU applies."""


def route_for(net: IPNetwork, dev: str, path: PeerPath, link_mtu: int) -> Route:
    """A peer's route; with the peer's path MTU when that is smaller than the link's (IPv6
    routes only down to IPv6's minimum of 1280)."""
    mtu = path.mtu if path.mtu is not None and path.mtu < link_mtu else 0
    if net.version == 6 and mtu and mtu < 1280:
        mtu = 1280
    return Route(net, dev, mtu=mtu)


@dataclass(frozen=True)
class Skipped:
    peer: str
    reason: str


@dataclass(frozen=True)
class Dropped:
    peer: str
    entry: IPNetwork
    reason: str


@dataclass(frozen=True)
class LinkConfig:
    ifname: str
    mtu: int
    address: ipaddress.IPv4Interface | None
    sysctls: Mapping[str, str] = field(default_factory=lambda: dict(INTERFACE_SYSCTLS))


@dataclass(frozen=True)
class Desired:
    link: LinkConfig
    listen_port: int
    fwmark: int
    public_key: str
    peers: Mapping[str, WgPeerConfig]
    """By public key."""
    peer_names: Mapping[str, str]
    """Public key -> peer name."""
    forced_endpoints: frozenset[str]
    routes: frozenset[Route]
    rules: frozenset[Rule]
    skipped: tuple[Skipped, ...] = ()
    dropped: tuple[Dropped, ...] = ()


@dataclass(frozen=True)
class LinkState:
    exists: bool
    mtu: int = 0
    up: bool = False
    addresses: frozenset[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = frozenset()
    sysctls: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Observed:
    link: LinkState
    wg: WgDeviceState
    rules: tuple[Rule, ...]
    """Every rule of the families WireKube uses (duplicates kept: they are counted)."""
    routes: tuple[Route, ...]
    """Every route in table 22347."""


# ------------------------------------------------------------------------------------------ ops


@dataclass(frozen=True)
class SetMtu:
    mtu: int


@dataclass(frozen=True)
class SetUp:
    pass


@dataclass(frozen=True)
class AddAddress:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class DelAddress:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class SetSysctl:
    name: str
    value: str


@dataclass(frozen=True)
class AddRoute:
    route: Route


@dataclass(frozen=True)
class DelRoute:
    route: Route


@dataclass(frozen=True)
class AddRule:
    rule: Rule


@dataclass(frozen=True)
class DelRule:
    rule: Rule


LinkOp = SetMtu | SetUp | AddAddress | DelAddress | SetSysctl
Op = LinkOp | WgOp | AddRoute | DelRoute | AddRule | DelRule


# ------------------------------------------------------------------------------------------ plan


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
    mesh_ips = _MeshIps()
    for rank, p in enumerate(others):
        if (ip := _mesh_ip(p, mesh)) is not None:
            mesh_ips.add(ip, p.name, rank)
    # This node's own mesh IP is not indexed: an entry containing it is refused before the index
    # is consulted (_claim_reason), so it could never be the answer.

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
        cfg = _peer_config(peer, entries, paths.get(peer.name, _NO_PATH))
        configs[cfg.public_key] = cfg
        names[cfg.public_key] = peer.name
        if paths.get(peer.name, _NO_PATH).endpoint is not None:
            forced.add(cfg.public_key)
        path = paths.get(peer.name, _NO_PATH)
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


# ------------------------------------------------------------------------------ incremental plan


@dataclass(frozen=True, slots=True)
class _Entry:
    """One AllowedIPs entry, as far as it can be judged without the other peers."""

    net: IPNetwork
    static: str
    """Drop reason that does not depend on other peers ("" when kept so far)."""
    check_taken: bool
    """Whether the whole entry is dropped when an older peer already routes it."""
    pieces: tuple[IPNetwork, ...]
    """What is left after routing.excludeCIDRs (empty when statically dropped)."""
    excluded: bool


@dataclass(frozen=True, slots=True)
class _Local:
    """Everything about one peer that depends only on the peer, the mesh and this node."""

    peer: Peer
    order: tuple[str, str]
    key_error: str
    """Bad key or this node's own key (the identity check every peer fails alone)."""
    ip: ipaddress.IPv4Address | None
    """The mesh IP (first /32 entry, inside meshCIDR)."""
    wide: tuple[tuple[int, IPNetwork], ...]
    """Entries inside meshCIDR that must not contain another peer's mesh IP (before ``claim``)."""
    claim: str
    """The claim problem found without the other peers ("" for none)."""
    entries: tuple[_Entry, ...]
    candidates: frozenset[IPNetwork]
    """Every net whose ownership by an older peer could change what this peer routes."""


def _local(peer: Peer, mesh: Mesh, node: LocalFacts, own_ip: ipaddress.IPv4Address | None) -> _Local:
    spec = mesh.spec
    key = peer.spec.public_key
    key_error = _key_error(key) or (_same_key(node.name) if key == node.public_key else "")
    peer_ip = peer.mesh_ip
    wide: list[tuple[int, IPNetwork]] = []
    claim = ""
    for i, entry in enumerate(peer.spec.allowed_ips):  # the local half of _claim_reason, same order
        where = f"spec.allowedIPs[{i}] {entry}"
        if entry.prefixlen == entry.max_prefixlen and entry.network_address in node.addresses:
            claim = f"{where} claims this node's own address"
            break
        if entry.version != 4 or not entry.subnet_of(spec.mesh_cidr):
            continue
        if own_ip is not None and own_ip in entry:
            claim = f"{where} contains this node's mesh IP {own_ip}"
            break
        if entry.prefixlen == 32 and entry.network_address == peer_ip:
            continue  # holds only the peer's own mesh IP, which is never a conflict
        wide.append((i, entry))
    entries: list[_Entry] = []
    if not claim:  # a local claim problem always ends up skipping the peer: its entries never count
        for entry in peer.spec.allowed_ips:
            static, check_taken = _static_drop(entry, node, spec.routing)
            pieces = () if static else tuple(_subtract(entry, spec.routing.exclude_cidrs))
            entries.append(_Entry(entry, static, check_taken, pieces, not static and pieces != (entry,)))
    candidates = {e.net for e in entries if not e.static and e.check_taken}
    candidates.update(p for e in entries for p in e.pieces)
    return _Local(
        peer=peer,
        order=_order(peer),
        key_error=key_error,
        ip=_mesh_ip(peer, mesh),
        wide=tuple(wide),
        claim=claim,
        entries=tuple(entries),
        candidates=frozenset(candidates),
    )


def _accept(name: str, local: _Local, taken: set[IPNetwork]) -> tuple[tuple[IPNetwork, ...], tuple[Dropped, ...]]:
    """The same decisions as _accepted_entries, from the precomputed entries."""
    accepted: list[IPNetwork] = []
    dropped: list[Dropped] = []
    for e in local.entries:
        if e.static:
            dropped.append(Dropped(name, e.net, e.static))
            continue
        if e.check_taken and e.net in taken:
            dropped.append(Dropped(name, e.net, _TAKEN))
            continue
        if e.excluded:
            dropped.append(Dropped(name, e.net, _EXCLUDED))
        accepted.extend(p for p in e.pieces if p not in taken)
    return tuple(accepted), tuple(dropped)


class IncrementalPlanner:
    """``plan()`` that remembers its last answer and re-decides only what an input change touches.

    The result is always exactly ``plan(mesh, peers, node, paths)``; what differs is the cost: a
    call where one peer changed costs a pass of identity checks over the peer list plus the work
    for the peers that change could affect, instead of re-validating every peer.

    Peers interact in three ways only, and each is followed through an index:

    * identity: a key or mesh IP held by an older valid peer.  Peers sharing a key or a mesh IP
      (transitively) form a group that is re-decided together, oldest first; removing the peer
      that held an address un-skips the next one that wanted it.
    * claims: an entry inside meshCIDR containing another valid peer's mesh IP.  When the owner
      of a mesh IP changes, the (usually few) peers with such entries are re-checked.
    * routing: an entry or piece an older peer already routes.  Active peers sharing a net
      (transitively) are re-decided together, oldest first.

    Per-peer facts (key validity, entry filters, excludeCIDRs pieces) are memoised by the peer's
    spec and creation time; a change of the mesh's CIDR/routing/interface, of the node's facts
    or of this node's own mesh IP rebuilds everything.  Unchanged peers keep their
    ``WgPeerConfig`` and ``Route`` objects, so comparing two results is cheap.
    """

    def __init__(self) -> None:
        self._reset(None, None)

    @property
    def warm(self) -> bool:
        """Whether there is a previous answer to build on."""
        return self._ctx is not None

    def _reset(self, ctx: object, own_ip: ipaddress.IPv4Address | None) -> None:
        self._ctx = ctx
        self._ifname = ""
        self._link_mtu = 0
        self._own_ip = own_ip
        self._peers: dict[str, Peer] = {}
        self._local: dict[str, _Local] = {}
        # identity
        self._by_key: dict[str, set[str]] = {}
        self._by_ip: dict[ipaddress.IPv4Address, set[str]] = {}
        self._valid: set[str] = set()
        self._skip_id: dict[str, str] = {}
        self._mesh_ips = _MeshIps()
        # claims
        self._wide: set[str] = set()
        self._skip_claim: dict[str, str] = {}
        self._active: set[str] = set()
        # routing
        self._by_net: dict[IPNetwork, set[str]] = {}
        self._cand: dict[str, frozenset[IPNetwork]] = {}
        self._result: dict[str, tuple[tuple[IPNetwork, ...], tuple[Dropped, ...]]] = {}
        self._path: dict[str, PeerPath] = {}
        # output, by peer name, and the aggregates Desired is made of
        self._config: dict[str, WgPeerConfig] = {}
        self._routes_of: dict[str, frozenset[Route]] = {}
        self._configs: dict[str, WgPeerConfig] = {}
        self._names: dict[str, str] = {}
        self._forced: set[str] = set()
        self._route_count: dict[Route, int] = {}
        self._v6_routes = 0
        self._out: dict[str, object] = {}
        """Cached immutable parts of the last Desired (dropped when what they show changes)."""

    # ------------------------------------------------------------------ the entry point

    def plan(
        self,
        mesh: Mesh,
        peers: Sequence[Peer],
        node: LocalFacts,
        paths: Mapping[str, PeerPath] | None = None,
    ) -> Desired:
        paths = paths or {}
        spec = mesh.spec
        current: dict[str, Peer] = {}
        for p in peers:
            if p.name in current:  # names are unique in the API; a hand-written file may repeat one
                self._reset(None, None)
                return plan(mesh, peers, node, paths)
            current[p.name] = p
        own = current.pop(node.name, None)
        own_ip = _mesh_ip(own, mesh)
        ctx = (spec.mesh_cidr, spec.routing, spec.interface_name, spec.mtu, node)
        if self._ctx is None or ctx != self._ctx or own_ip != self._own_ip:
            self._reset(ctx, own_ip)
            self._ifname = spec.interface_name
            self._link_mtu = spec.mtu
            changed = list(current)
            removed: list[str] = []
        else:
            changed = []
            known = self._peers
            for name, p in current.items():
                prev = known.get(name)
                if prev is p:
                    continue
                if prev is not None and prev.spec == p.spec and prev.creation_timestamp == p.creation_timestamp:
                    known[name] = p  # a new object (status, labels) with the same planning inputs
                    continue
                changed.append(name)
            removed = [n for n in known if n not in current] if changed or len(current) != len(known) else []
        if changed or removed:
            self._update(changed, removed, current, mesh, node, own_ip)
        self._follow_paths(paths)
        return self._desired(mesh, node, own_ip)

    # ------------------------------------------------------------------ identity

    def _index_identity(self, name: str, local: _Local) -> None:
        if local.key_error:
            return
        self._by_key.setdefault(local.peer.spec.public_key, set()).add(name)
        if local.ip is not None:
            self._by_ip.setdefault(local.ip, set()).add(name)

    def _unindex_identity(self, name: str, local: _Local) -> None:
        if local.key_error:
            return
        key = local.peer.spec.public_key
        self._by_key[key].discard(name)
        if not self._by_key[key]:
            del self._by_key[key]
        if local.ip is not None:
            self._by_ip[local.ip].discard(name)
            if not self._by_ip[local.ip]:
                del self._by_ip[local.ip]

    def _identity_group(self, keys: set[str], ips: set[ipaddress.IPv4Address]) -> set[str]:
        """Every peer linked to ``keys``/``ips`` through shared keys and mesh IPs."""
        group: set[str] = set()
        keys, ips = set(keys), set(ips)
        todo_k, todo_i = list(keys), list(ips)
        while todo_k or todo_i:
            names = self._by_key.get(todo_k.pop(), ()) if todo_k else self._by_ip.get(todo_i.pop(), ())
            for name in names:
                if name in group:
                    continue
                group.add(name)
                local = self._local[name]
                if (k := local.peer.spec.public_key) not in keys:
                    keys.add(k)
                    todo_k.append(k)
                if local.ip is not None and local.ip not in ips:
                    ips.add(local.ip)
                    todo_i.append(local.ip)
        return group

    # ------------------------------------------------------------------ one update

    def _update(
        self,
        changed: list[str],
        removed: list[str],
        current: Mapping[str, Peer],
        mesh: Mesh,
        node: LocalFacts,
        own_ip: ipaddress.IPv4Address | None,
    ) -> None:
        seed_keys: set[str] = set()
        seed_ips: set[ipaddress.IPv4Address] = set()

        def seed(local: _Local) -> None:
            if not local.key_error:
                seed_keys.add(local.peer.spec.public_key)
            if local.ip is not None:
                seed_ips.add(local.ip)

        for name in removed:
            old = self._local.pop(name)
            del self._peers[name]
            self._unindex_identity(name, old)
            seed(old)
            self._wide.discard(name)
        for name in changed:
            if (previous := self._local.get(name)) is not None:
                self._unindex_identity(name, previous)
                seed(previous)
            new = _local(current[name], mesh, node, own_ip)
            self._local[name] = new
            self._peers[name] = current[name]
            self._index_identity(name, new)
            seed(new)
            if new.wide:
                self._wide.add(name)
            else:
                self._wide.discard(name)
        touched = {*changed, *removed}

        # 1. identity: re-decide every group a changed peer is or was part of, oldest first.
        group = self._identity_group(seed_keys, seed_ips)
        redo = group | touched
        was_valid = {n for n in redo if n in self._valid}
        ips = set(seed_ips)
        ips.update(ip for n in group if (ip := self._local[n].ip) is not None)
        old_owner = {ip: self._mesh_ips.owner(ip) for ip in ips}
        for ip in ips:
            self._mesh_ips.remove(ip)
        for n in redo:
            self._valid.discard(n)
            self._skip_id.pop(n, None)
        for n in changed:
            if self._local[n].key_error:
                self._skip_id[n] = self._local[n].key_error
        keys_seen: dict[str, str] = {}
        ips_seen: dict[ipaddress.IPv4Address, str] = {}
        for n in sorted(group, key=lambda n: self._local[n].order):
            local = self._local[n]
            key, ip = local.peer.spec.public_key, local.ip
            if key in keys_seen:
                self._skip_id[n] = _same_key(keys_seen[key])
            elif ip is not None and ip == own_ip:
                self._skip_id[n] = _same_ip(ip, node.name)
            elif ip is not None and ip in ips_seen:
                self._skip_id[n] = _same_ip(ip, ips_seen[ip])
            else:
                self._valid.add(n)
                keys_seen[key] = n
                if ip is not None:
                    ips_seen[ip] = n
                    self._mesh_ips.add(ip, n, local.order)
        validity_changed = {n for n in redo if (n in self._valid) != (n in was_valid)}
        moved_ips = {ip for ip in ips if self._mesh_ips.owner(ip) != old_owner[ip]} | seed_ips
        self._out.pop("skipped", None)

        # 2. claims: the changed peers, the peers whose validity flipped, and the peers with an
        #    entry inside meshCIDR covering a mesh IP that changed hands.
        recheck = (touched - set(removed)) | validity_changed
        if moved_ips:
            for n in self._wide:
                if any(ip in entry for _, entry in self._local[n].wide for ip in moved_ips):
                    recheck.add(n)
        recheck -= set(removed)
        was_active = {n for n in (*recheck, *removed) if n in self._active}
        for n in removed:
            self._skip_claim.pop(n, None)
            self._active.discard(n)
        for n in recheck:
            local = self._local[n]
            self._skip_claim.pop(n, None)
            self._active.discard(n)
            if n not in self._valid or not local.peer.spec.allowed_ips:
                continue
            reason = self._claim(n, local)
            if reason:
                self._skip_claim[n] = reason
            else:
                self._active.add(n)

        # 3. routing: re-decide every group of active peers sharing a net with a peer that
        #    changed, left or (de)activated, oldest first.
        nets: set[IPNetwork] = set()
        group = set()
        for n in (*recheck, *removed):
            now = n in self._active
            before = n in was_active
            if before and (not now or n in touched):
                for net in self._cand.pop(n):
                    nets.add(net)
                    self._by_net[net].discard(n)
                    if not self._by_net[net]:
                        del self._by_net[net]
            if before and not now:
                self._withdraw(n)
            if now and (not before or n in touched):
                self._cand[n] = self._local[n].candidates
                for net in self._cand[n]:
                    nets.add(net)
                    self._by_net.setdefault(net, set()).add(n)
                group.add(n)
        todo = list(nets)
        while todo:
            for n in self._by_net.get(todo.pop(), ()):
                if n not in group:
                    group.add(n)
                    for net in self._cand[n]:
                        if net not in nets:
                            nets.add(net)
                            todo.append(net)
        taken: set[IPNetwork] = set()
        for n in sorted(group, key=lambda n: self._local[n].order):
            result = _accept(n, self._local[n], taken)
            taken.update(result[0])
            if n in touched or self._result.get(n) != result:
                self._result[n] = result
                self._out.pop("dropped", None)
                self._emit(n)

    def _claim(self, name: str, local: _Local) -> str:
        for i, entry in local.wide:
            if (hit := self._mesh_ips.oldest_in(entry, name, local.peer.mesh_ip)) is not None:
                return f"spec.allowedIPs[{i}] {entry} contains the mesh IP {hit[0]} of peer {hit[1]!r}"
        return local.claim

    # ------------------------------------------------------------------ output

    def _follow_paths(self, paths: Mapping[str, PeerPath]) -> None:
        if not paths and not self._path:
            return
        for n in self._active:
            path = paths.get(n, _NO_PATH)
            if path != self._path.get(n, _NO_PATH):
                self._emit(n, path)

    def _emit(self, name: str, path: PeerPath | None = None) -> None:
        """(Re)build the WireGuard peer and the routes of active peer ``name``."""
        if path is None:
            path = self._path.get(name, _NO_PATH)
        if path == _NO_PATH:
            self._path.pop(name, None)
        else:
            self._path[name] = path
        accepted = self._result[name][0]
        cfg = _peer_config(self._local[name].peer, accepted, path)
        old = self._config.get(name)
        if old is not None and old.public_key != cfg.public_key:
            self._drop_entry(name)
            old = None
        if old is None or old != cfg:  # an equal configuration keeps its object (cheap comparisons)
            self._config[name] = cfg
            self._configs[cfg.public_key] = cfg
            self._names[cfg.public_key] = name
            self._out.pop("peers", None)
        if (path.endpoint is not None) != (cfg.public_key in self._forced):
            if path.endpoint is not None:
                self._forced.add(cfg.public_key)
            else:
                self._forced.discard(cfg.public_key)
            self._out.pop("forced", None)
        self._set_routes(name, accepted, path)

    def _set_routes(self, name: str, accepted: tuple[IPNetwork, ...], path: PeerPath = _NO_PATH) -> None:
        old = self._routes_of.get(name, frozenset())
        new = frozenset(route_for(net, self._ifname, path, self._link_mtu) for net in accepted)
        if new == old:
            return
        for r in old - new:
            self._route_count[r] -= 1
            if not self._route_count[r]:
                del self._route_count[r]
                self._v6_routes -= r.dst.version == 6
        for r in new - old:
            if r not in self._route_count:
                self._route_count[r] = 0
                self._v6_routes += r.dst.version == 6
            self._route_count[r] += 1
        if new:
            self._routes_of[name] = new
        else:
            self._routes_of.pop(name, None)
        self._out.pop("routes", None)

    def _drop_entry(self, name: str) -> None:
        cfg = self._config.pop(name, None)
        # The key may already belong to another peer (emitted earlier in the same update).
        if cfg is not None and self._names.get(cfg.public_key) == name:
            del self._configs[cfg.public_key]
            del self._names[cfg.public_key]
            self._forced.discard(cfg.public_key)
            self._out.pop("peers", None)
            self._out.pop("forced", None)

    def _withdraw(self, name: str) -> None:
        """Forget everything ``name`` contributed (it is no longer active)."""
        self._drop_entry(name)
        self._path.pop(name, None)
        if self._result.pop(name, None) is not None:
            self._out.pop("dropped", None)
        self._set_routes(name, ())

    def _desired(self, mesh: Mesh, node: LocalFacts, own_ip: ipaddress.IPv4Address | None) -> Desired:
        out = self._out
        if "peers" not in out:
            out["peers"] = (dict(self._configs), dict(self._names))
        if "forced" not in out:
            out["forced"] = frozenset(self._forced)
        if "routes" not in out:
            out["routes"] = frozenset(self._route_count)
        if "skipped" not in out:
            out["skipped"] = tuple(
                [Skipped(n, self._skip_id[n]) for n in sorted(self._skip_id, key=lambda n: self._local[n].order)]
                + [Skipped(n, self._skip_claim[n])
                   for n in sorted(self._skip_claim, key=lambda n: self._local[n].order)]
            )
        if "dropped" not in out:
            with_drops = [n for n, r in self._result.items() if r[1]]
            out["dropped"] = tuple(d for n in sorted(with_drops, key=lambda n: self._local[n].order)
                                   for d in self._result[n][1])
        families = {4, 6} if self._v6_routes else {4}
        rules_key = (node.api_server_ips, self._v6_routes > 0)
        if out.get("rules_key") != rules_key:
            out["rules_key"] = rules_key
            out["rules"] = frozenset(desired_rules(node.api_server_ips, families))
        peers, names = cast(tuple[dict[str, WgPeerConfig], dict[str, str]], out["peers"])
        return Desired(
            link=_link_config(mesh, own_ip),
            listen_port=mesh.spec.listen_port,
            fwmark=FWMARK,
            public_key=node.public_key,
            peers=peers,
            peer_names=names,
            forced_endpoints=out["forced"],  # type: ignore[arg-type]
            routes=out["routes"],  # type: ignore[arg-type]
            rules=out["rules"],  # type: ignore[arg-type]
            skipped=out["skipped"],  # type: ignore[arg-type]
            dropped=out["dropped"],  # type: ignore[arg-type]
        )


# ------------------------------------------------------------------------------------------ diff


def diff(desired: Desired, observed: Observed, now: float) -> tuple[Op, ...]:
    """Operations that turn ``observed`` into ``desired``: adds first, removals last."""
    link = _link_ops(desired.link, observed.link)
    wg_device = _device_ops(desired, observed.wg)
    puts, removes = _peer_ops(desired, observed.wg, now)
    add_routes, del_routes = _route_ops(desired.routes, observed.routes)
    add_rules, del_rules = _rule_ops(desired.rules, observed.rules)
    del_addrs = [op for op in link if isinstance(op, DelAddress)]
    link = [op for op in link if not isinstance(op, DelAddress)]
    return (*link, *wg_device, *puts, *add_routes, *add_rules, *removes, *del_routes, *del_rules, *del_addrs)


def diff_since(
    previous: Desired,
    desired: Desired,
    link: LinkState,
    wg: WgDeviceState,
    rules: Sequence[Rule],
    now: float,
) -> tuple[Op, ...]:
    """The operations for an event-driven pass: only what changed from ``previous`` to ``desired``.

    ``previous`` is the plan the dataplane was last brought to.  The link, the device settings
    and the rules are compared with what is observed (they are small); the WireGuard peers only
    for the keys whose configuration changed between the two plans (against ``wg``, so a
    roamed endpoint is judged as in :func:`diff`); the routes of table 22347 are not read at all:
    the table is taken to hold ``previous.routes``.  Drift in what did not change (a route or a
    peer removed behind the agent's back) is left to the next full :func:`diff`, which the
    reconciler runs on every resync.  When the dataplane does match ``previous``, the result
    equals ``diff(desired, observed, now)``.
    """
    link_ops = _link_ops(desired.link, link)
    device = _device_ops(desired, wg)
    keys: set[str] = set()
    if desired.peers is not previous.peers:
        before = previous.peers
        keys.update(k for k, cfg in desired.peers.items() if (old := before.get(k)) is not cfg and old != cfg)
        keys.update(k for k in before if k not in desired.peers)
    if desired.forced_endpoints is not previous.forced_endpoints:
        keys.update(desired.forced_endpoints ^ previous.forced_endpoints)
    puts: list[Op] = [
        op for k in sorted(keys) if k in desired.peers and (op := _peer_op(desired, k, wg, now)) is not None
    ]
    removes: list[Op] = [RemovePeer(k) for k in sorted(keys) if k not in desired.peers and k in wg.peers]
    add_routes: list[Op] = []
    del_routes: list[Op] = []
    if desired.routes is not previous.routes:
        add_routes = [AddRoute(r) for r in sorted(desired.routes - previous.routes, key=_route_key)]
        replaced = {_route_slot(r) for r in desired.routes}
        del_routes = [DelRoute(r) for r in sorted(previous.routes - desired.routes, key=_route_key)
                      if _route_slot(r) not in replaced]
    add_rules, del_rules = _rule_ops(desired.rules, rules)
    del_addrs = [op for op in link_ops if isinstance(op, DelAddress)]
    link_ops = [op for op in link_ops if not isinstance(op, DelAddress)]
    return (*link_ops, *device, *puts, *add_routes, *add_rules, *removes, *del_routes, *del_rules, *del_addrs)


def _link_ops(want: LinkConfig, have: LinkState) -> list[Op]:
    ops: list[Op] = []
    if have.mtu != want.mtu:
        ops.append(SetMtu(want.mtu))
    for name, value in sorted(want.sysctls.items()):
        if have.sysctls.get(name) != value:
            ops.append(SetSysctl(name, value))
    wanted = {want.address} if want.address is not None else set()
    ops.extend(AddAddress(a) for a in sorted(wanted - have.addresses, key=str))
    if not have.up:
        ops.append(SetUp())
    ops.extend(DelAddress(a) for a in sorted(have.addresses - wanted, key=str))
    return ops


def _device_ops(desired: Desired, have: WgDeviceState) -> list[Op]:
    op = SetDevice(
        private_key=have.public_key != desired.public_key,
        listen_port=desired.listen_port if have.listen_port != desired.listen_port else None,
        fwmark=desired.fwmark if have.fwmark != desired.fwmark else None,
    )
    return [op] if op != SetDevice() else []


def _peer_ops(desired: Desired, have: WgDeviceState, now: float) -> tuple[list[Op], list[Op]]:
    puts: list[Op] = [op for key in sorted(desired.peers) if (op := _peer_op(desired, key, have, now)) is not None]
    removes: list[Op] = [RemovePeer(k) for k in sorted(have.peers) if k not in desired.peers]
    return puts, removes


def _peer_op(desired: Desired, key: str, have: WgDeviceState, now: float) -> PutPeer | None:
    want = desired.peers[key]
    state = have.peers.get(key)
    if state is None:
        return PutPeer(want, create=True)
    cur = state.config
    set_endpoint = _endpoint_needs_write(
        want.endpoint, cur.endpoint, key in desired.forced_endpoints, now - state.last_handshake
    )
    op = PutPeer(
        want,
        create=False,
        set_endpoint=set_endpoint,
        set_allowed_ips=cur.allowed_ips != want.allowed_ips,
        set_keepalive=cur.persistent_keepalive != want.persistent_keepalive,
    )
    return op if op.set_endpoint or op.set_allowed_ips or op.set_keepalive else None


def _endpoint_needs_write(want: Endpoint | None, have: Endpoint | None, forced: bool, handshake_age: float) -> bool:
    """A roamed endpoint that works (fresh handshake, not loopback) is kept unless forced."""
    if want is None or want == have:
        return False
    if forced or have is None or have.ip.is_loopback:
        return True
    return handshake_age >= HANDSHAKE_FRESH_SECONDS


def _route_ops(want: frozenset[Route], have: Sequence[Route]) -> tuple[list[Op], list[Op]]:
    seen: set[Route] = set()
    dels: list[Route] = []
    for route in have:
        if route not in want or route in seen:
            dels.append(route)
        seen.add(route)
    adds: list[Op] = [AddRoute(r) for r in sorted(want - seen, key=_route_key)]
    # A route whose MTU changes is rewritten in place (AddRoute replaces): deleting the old one
    # afterwards (by destination) would delete the new one.
    replaced = {_route_slot(r) for r in want - seen}
    return adds, [DelRoute(r) for r in sorted(dels, key=_route_key)
                  if _route_slot(r) not in replaced]


def _rule_ops(want: frozenset[Rule], have: Sequence[Rule]) -> tuple[list[Op], list[Op]]:
    seen: set[Rule] = set()
    dels: list[Op] = []
    for rule in have:
        if not is_wirekube_rule(rule):
            continue
        if rule not in want or rule in seen:
            dels.append(DelRule(rule))
        seen.add(rule)
    adds: list[Op] = [AddRule(r) for r in sorted(want - seen, key=_rule_key)]
    return adds, dels


def _route_key(r: Route) -> tuple[int, int, int, str, int]:
    return (r.dst.version, int(r.dst.network_address), r.dst.prefixlen, r.dev, r.mtu)


def _route_slot(r: Route) -> tuple[IPNetwork, int]:
    """What identifies a route in the kernel's table (the MTU is an attribute of it)."""
    return (r.dst, r.table)


def _rule_key(r: Rule) -> tuple[int, int, int, int, str]:
    return (r.family, r.priority, r.table, r.fwmark, str(r.dst))


def mesh_ip_claims(peers: Iterable[Peer], mesh: Mesh) -> dict[ipaddress.IPv4Address, str]:
    """Mesh IPs claimed by ``peers`` (for ``ipam.choose_mesh_ip``)."""
    return {ip: p.name for p in peers if (ip := _mesh_ip(p, mesh)) is not None}

