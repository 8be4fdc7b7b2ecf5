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

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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

    def __str__(self) -> str:
        return f"{self.dst} dev {self.dev} table {self.table}"


@dataclass(frozen=True)
class NodeFacts:
    """What the planner needs to know about this node."""

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
    node: NodeFacts,
    paths: Mapping[str, PeerPath] | None = None,
) -> Desired:
    """The desired dataplane of ``node`` (see the module docstring for the rules)."""
    paths = paths or {}
    spec = mesh.spec
    ordered = sorted(peers, key=lambda p: (p.creation_timestamp or "~", p.name))
    own = next((p for p in ordered if p.name == node.name), None)
    own_ip = _mesh_ip(own, mesh)
    skipped: list[Skipped] = []
    dropped: list[Dropped] = []

    others = _valid_identities(ordered, node, mesh, own_ip, skipped)
    mesh_ips = {ip: p.name for p in others if (ip := _mesh_ip(p, mesh)) is not None}
    if own_ip is not None:
        mesh_ips[own_ip] = node.name

    configs: dict[str, WgPeerConfig] = {}
    names: dict[str, str] = {}
    forced: set[str] = set()
    routes: set[Route] = set()
    taken: set[IPNetwork] = set()
    for peer in others:
        if not peer.spec.allowed_ips:
            continue  # passive peer: no WireGuard entry, no routes
        entries = _accepted_entries(peer, mesh, node, own_ip, mesh_ips, taken, dropped)
        if entries is None:
            skipped.append(Skipped(peer.name, _claim_reason(peer, node, own_ip, mesh_ips, mesh.spec.mesh_cidr)))
            continue
        taken.update(entries)
        path = paths.get(peer.name, PeerPath())
        cfg = WgPeerConfig(
            public_key=peer.spec.public_key,
            endpoint=path.endpoint or peer.spec.endpoint,
            allowed_ips=sorted_nets(entries),
            persistent_keepalive=path.keepalive if path.keepalive is not None else peer.spec.persistent_keepalive,
        )
        configs[cfg.public_key] = cfg
        names[cfg.public_key] = peer.name
        if path.endpoint is not None:
            forced.add(cfg.public_key)
        routes.update(Route(net, spec.interface_name) for net in entries)

    return Desired(
        link=LinkConfig(
            ifname=spec.interface_name,
            mtu=spec.mtu,
            address=ipaddress.IPv4Interface(f"{own_ip}/32") if own_ip is not None else None,
        ),
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


def _valid_identities(
    ordered: Sequence[Peer], node: NodeFacts, mesh: Mesh, own_ip: ipaddress.IPv4Address | None, skipped: list[Skipped]
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


def _identity_problem(
    peer: Peer, mesh: Mesh, keys: Mapping[str, str], ips: Mapping[ipaddress.IPv4Address, str]
) -> str:
    try:
        parse_key(peer.spec.public_key)
    except ValueError as e:
        return f"spec.publicKey: {e}"
    if peer.spec.public_key in keys:
        return f"spec.publicKey is the same key as peer {keys[peer.spec.public_key]!r}"
    ip = _mesh_ip(peer, mesh)
    if ip is not None and ip in ips:
        return f"mesh IP {ip} is already claimed by peer {ips[ip]!r}"
    return ""


def _accepted_entries(
    peer: Peer,
    mesh: Mesh,
    node: NodeFacts,
    own_ip: ipaddress.IPv4Address | None,
    mesh_ips: Mapping[ipaddress.IPv4Address, str],
    taken: set[IPNetwork],
    dropped: list[Dropped],
) -> list[IPNetwork] | None:
    """The peer's AllowedIPs after filtering; None when an entry makes the whole peer invalid."""
    if _claim_reason(peer, node, own_ip, mesh_ips, mesh.spec.mesh_cidr):
        return None
    routing = mesh.spec.routing
    accepted: list[IPNetwork] = []
    for entry in peer.spec.allowed_ips:
        reason = _drop_reason(entry, node, routing.allow_default_route, routing.local_subnet_policy, taken)
        if reason:
            dropped.append(Dropped(peer.name, entry, reason))
            continue
        pieces = _subtract(entry, routing.exclude_cidrs)
        if pieces != [entry]:
            dropped.append(Dropped(peer.name, entry, "overlaps routing.excludeCIDRs (only the rest is routed)"))
        accepted.extend(p for p in pieces if p not in taken)
    return accepted


def _claim_reason(
    peer: Peer,
    node: NodeFacts,
    own_ip: ipaddress.IPv4Address | None,
    mesh_ips: Mapping[ipaddress.IPv4Address, str],
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
        if entry.version != 4 or not entry.subnet_of(mesh_cidr):  # type: ignore[arg-type]
            continue
        if own_ip is not None and own_ip in entry:
            return f"{where} contains this node's mesh IP {own_ip}"
        for ip, owner in mesh_ips.items():
            if owner != peer.name and ip in entry and ip != peer_ip:
                return f"{where} contains the mesh IP {ip} of peer {owner!r}"
    return ""


def _drop_reason(
    entry: IPNetwork,
    node: NodeFacts,
    allow_default_route: bool,
    local_policy: LocalSubnetPolicy,
    taken: set[IPNetwork],
) -> str:
    if entry.prefixlen == 0 and not allow_default_route:
        return "a default route needs routing.allowDefaultRoute"
    if any(entry.version == n.version and entry.subnet_of(n) for n in _NEVER_ROUTED):  # type: ignore[arg-type]
        return "loopback, link-local and multicast ranges are never routed"
    if entry.prefixlen == 0:
        return ""  # an allowed default route: the main-table bypass rules keep the API server reachable
    if any(a in entry for a in node.api_server_ips):
        return "contains the API server's address"
    local = (s for s in node.subnets if s.version == entry.version)
    if local_policy is LocalSubnetPolicy.SKIP and any(entry.overlaps(s) for s in local):  # type: ignore[arg-type]
        return "overlaps one of this node's own subnets (routing.localSubnetPolicy=skip)"
    if entry in taken:
        return "already routed to an older peer"
    return ""


def _subtract(entry: IPNetwork, excludes: Sequence[IPNetwork]) -> list[IPNetwork]:
    pieces: list[IPNetwork] = [entry]
    for ex in excludes:
        nxt: list[IPNetwork] = []
        for piece in pieces:
            if piece.version != ex.version or not piece.overlaps(ex):  # type: ignore[arg-type]
                nxt.append(piece)
            elif not piece.subnet_of(ex):  # type: ignore[arg-type]
                nxt.extend(piece.address_exclude(ex))  # type: ignore[arg-type]
        pieces = nxt
    return sorted(pieces, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


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


def _link_ops(want: LinkConfig, have: LinkState) -> list[Op]:
    ops: list[Op] = []
    if have.mtu != want.mtu:
        ops.append(SetMtu(want.mtu))
    for name, value in sorted(want.sysctls.items()):
        if have.sysctls.get(name) != value:
            ops.append(SetSysctl(name, value))
    wanted = {want.address} if want.address is not None else set()
    ops.extend(AddAddress(a) for a in sorted(wanted - have.addresses, key=str))  # type: ignore[operator]
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
    puts: list[Op] = []
    for key in sorted(desired.peers):
        want = desired.peers[key]
        state = have.peers.get(key)
        if state is None:
            puts.append(PutPeer(want, create=True))
            continue
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
        if op.set_endpoint or op.set_allowed_ips or op.set_keepalive:
            puts.append(op)
    removes: list[Op] = [RemovePeer(k) for k in sorted(have.peers) if k not in desired.peers]
    return puts, removes


def _endpoint_needs_write(want: Endpoint | None, have: Endpoint | None, forced: bool, handshake_age: float) -> bool:
    """A roamed endpoint that works (fresh handshake, not loopback) is kept unless forced."""
    if want is None or want == have:
        return False
    if forced or have is None or have.ip.is_loopback:
        return True
    return handshake_age >= HANDSHAKE_FRESH_SECONDS


def _route_ops(want: frozenset[Route], have: Sequence[Route]) -> tuple[list[Op], list[Op]]:
    seen: set[Route] = set()
    dels: list[Op] = []
    for route in have:
        if route not in want or route in seen:
            dels.append(DelRoute(route))
        seen.add(route)
    adds: list[Op] = [AddRoute(r) for r in sorted(want - seen, key=_route_key)]
    return adds, dels


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


def _route_key(r: Route) -> tuple[int, int, int, str]:
    return (r.dst.version, int(r.dst.network_address), r.dst.prefixlen, r.dev)


def _rule_key(r: Rule) -> tuple[int, int, int, int, str]:
    return (r.family, r.priority, r.table, r.fwmark, str(r.dst))


def mesh_ip_claims(peers: Iterable[Peer], mesh: Mesh) -> dict[ipaddress.IPv4Address, str]:
    """Mesh IPs claimed by ``peers`` (for ``ipam.choose_mesh_ip``)."""
    return {ip: p.name for p in peers if (ip := _mesh_ip(p, mesh)) is not None}

