"""The planner's vocabulary: this node's facts, the desired and the observed dataplane, and the
operations that move one towards the other (see :mod:`wirekube.agent.plan`).

Pure data: frozen dataclasses, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from wirekube.agent.wg.base import WgDeviceState, WgOp, WgPeerConfig
from wirekube.models import ROUTE_TABLE, Endpoint, IPAddress, IPNetwork, Transport

MAIN_TABLE = 254
RULE_PRIORITY_FWMARK = 100
RULE_PRIORITY_BYPASS = 199
RULE_PRIORITY_TABLE = 200
HANDSHAKE_FRESH_SECONDS = 180.0
"""WireGuard's REJECT_AFTER_TIME: a session younger than this is alive."""

INTERFACE_SYSCTLS: Mapping[str, str] = {"disable_xfrm": "1", "disable_policy": "1", "rp_filter": "2"}


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
