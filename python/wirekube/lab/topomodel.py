"""The lab topology's data model: frozen dataclasses, fully concrete (every LAN and address known).

What each field means is in :mod:`wirekube.lab.topology`; :mod:`wirekube.lab.topoparse` builds
these from a document, and :meth:`Topology.to_dict` gives a document that parses back to an equal
topology.  Pure module: no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from wirekube.errors import WireKubeError

IPv4 = ipaddress.IPv4Address
Net4 = ipaddress.IPv4Network

# The lab's public address space, and how it is carved (see wirekube.lab.net for the full plan).
PUBLIC_SPACE = Net4("198.18.0.0/15")
SERVICES_NET = Net4("198.18.0.0/24")  # relay and STUN addresses on the internet segment
PUBLIC_LANS = Net4("198.19.0.0/16")  # LANs of `nat: none` sites
DEFAULT_MANAGEMENT = Net4("10.254.0.0/24")
DEFAULT_STUN_PORT = 3478
MAX_SITES = 250  # site i's WAN link is 198.18.<i>.0/24
MAX_PODS_PER_NODE = 16
DEFAULT_WAN_MTU = 1500
MIN_WAN_MTU = 576  # the smallest IPv4 datagram every host must accept (RFC 791)
FIRST_NODE_HOST = 10  # auto-assigned addresses start at .10 (the router/gateway is .1)

class NatKind(str, enum.Enum):
    """How a site's router treats traffic between its LAN and the internet."""

    NONE = "none"  # no NAT: nodes have public addresses
    PORT_RESTRICTED_CONE = "port-restricted-cone"  # masquerade + stateful filter
    FULL_CONE = "full-cone"  # mapping kept; unsolicited inbound to a mapped port allowed
    SYMMETRIC = "symmetric"  # masquerade fully-random: a new port per destination
    UDP_BLOCKED = "udp-blocked"  # only TCP (and ICMP) leaves
    PROXY_ONLY = "proxy-only"  # only TCP to the internet's HTTP proxy leaves (a corporate network)

    def __str__(self) -> str:
        return str(self.value)


class TopologyError(WireKubeError):
    """A topology document has mistakes; ``problems`` lists each as ``(path, message)``."""

    def __init__(self, problems: Sequence[tuple[str, str]], source: str = "topology") -> None:
        self.problems = tuple(problems)
        self.source = source
        lines = [f"  {path}: {message}" if path else f"  {message}" for path, message in problems]
        count = len(self.problems)
        super().__init__(
            f"{source}: {count} problem{'s' if count != 1 else ''}:\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class Endpoint:
    """An IPv4 address and port."""

    host: IPv4
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Internet:
    relay: Endpoint
    """The address nodes use for the relay: the load balancer when there are replicas."""
    stun: tuple[Endpoint, ...]
    relay_replicas: tuple[IPv4, ...] = ()
    """Addresses of the relay replicas behind ``relay`` (a load balancer that picks one replica
    per new connection, TCP and UDP, as an NLB does); empty: one relay at ``relay`` itself."""
    proxy: Endpoint | None = None
    """A real HTTP CONNECT proxy (squid) on the internet segment, allowing CONNECT to port 443 only
    with Basic auth: the only way out of ``proxy-only`` sites.  With it the relay also listens for
    WebSocket over TLS on port 443."""

    @property
    def addresses(self) -> tuple[IPv4, ...]:
        """Every distinct address the internet segment holds for services, in order."""
        seen: dict[IPv4, None] = {self.relay.host: None}
        for endpoint in self.stun:
            seen.setdefault(endpoint.host, None)
        for replica in self.relay_replicas:
            seen.setdefault(replica, None)
        if self.proxy is not None:
            seen.setdefault(self.proxy.host, None)
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"relay": self.relay_dict(), "stun": [str(s) for s in self.stun]}
        if self.proxy is not None:
            out["proxy"] = str(self.proxy)
        return out

    def relay_dict(self) -> str | dict[str, Any]:
        if not self.relay_replicas:
            return str(self.relay)
        return {"address": str(self.relay), "replicas": [str(a) for a in self.relay_replicas]}


NODE_ENGINES = ("userspace", "kernel")
KUBERNETES_MODES = ("processes", "kubelet")


@dataclass(frozen=True)
class Node:
    name: str
    address: IPv4  # on the site LAN (public for `nat: none`)
    pod_cidr: Net4 | None = None
    pods: int = 0
    engine: str = "userspace"
    """``userspace``: a network namespace running wireguard-go; ``kernel``: a qemu guest with a real
    WireGuard module (:mod:`wirekube.lab.vm`), in the same place of the network."""


@dataclass(frozen=True)
class Site:
    name: str
    nat: NatKind
    lan: Net4
    nodes: tuple[Node, ...]
    wan_mtu: int = DEFAULT_WAN_MTU
    """The MTU of the router's WAN link (both ends unless ``block_icmp``)."""
    drop_fragments: bool = False
    """The router drops IPv4 fragments crossing it, either way."""
    block_icmp: bool = False
    """Nothing on this path reports "fragmentation needed": the router drops the ones it makes or
    forwards, and the internet's end of the WAN link keeps 1500, so larger packets towards the
    site vanish at the router's WAN without a word (a PMTUD blackhole)."""

    @property
    def gateway(self) -> IPv4:
        """The router's LAN address: the first host of the LAN."""
        return self.lan.network_address + 1

    @property
    def router(self) -> str:
        """The router's name, as `exec` knows it."""
        return f"{self.name}-router"


@dataclass(frozen=True)
class Route:
    to: Net4
    via: IPv4


@dataclass(frozen=True)
class Host:
    name: str
    address: IPv4
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True)
class Attachment:
    """A node's NIC on a private network."""

    node: str
    address: IPv4


@dataclass(frozen=True)
class PrivateNetwork:
    name: str
    cidr: Net4
    attachments: tuple[Attachment, ...]
    gateway: str | None
    hosts: tuple[Host, ...]


@dataclass(frozen=True)
class Management:
    cidr: Net4

    @property
    def api_address(self) -> IPv4:
        """Where nodes reach the API server (through the lab's management proxy)."""
        return self.cidr.network_address + 1


@dataclass(frozen=True)
class Topology:
    internet: Internet
    sites: tuple[Site, ...]
    networks: tuple[PrivateNetwork, ...] = ()
    management: Management = field(default_factory=lambda: Management(DEFAULT_MANAGEMENT))
    # How WireKube runs on the nodes: "processes" (the lab starts agents and relays itself) or
    # "kubelet" (each node runs containerd + a kubelet; WireKube is installed with helm).
    kubernetes: str = "processes"

    def nodes(self) -> Iterator[tuple[Site, Node]]:
        for site in self.sites:
            for node in site.nodes:
                yield site, node

    def nat_by_site(self) -> dict[str, NatKind]:
        return {site.name: site.nat for site in self.sites}

    def hosts(self) -> Iterator[tuple[PrivateNetwork, Host]]:
        for network in self.networks:
            for host in network.hosts:
                yield network, host

    def to_dict(self) -> dict[str, Any]:
        """A plain document (YAML-ready) that :func:`parse_topology` turns back into ``self``."""
        return {
            "internet": self.internet.to_dict(),
            "management": {"cidr": str(self.management.cidr)},
            **({"kubernetes": self.kubernetes} if self.kubernetes != "processes" else {}),
            "sites": [
                {
                    "name": site.name,
                    "nat": site.nat.value,
                    "lan": str(site.lan),
                    "nodes": [_node_dict(node) for node in site.nodes],
                    **({"wanMTU": site.wan_mtu} if site.wan_mtu != DEFAULT_WAN_MTU else {}),
                    **({"dropFragments": True} if site.drop_fragments else {}),
                    **({"blockICMP": True} if site.block_icmp else {}),
                }
                for site in self.sites
            ],
            "networks": [
                {
                    "name": net.name,
                    "cidr": str(net.cidr),
                    "nodes": [{"name": a.node, "address": str(a.address)} for a in net.attachments],
                    **({"gateway": net.gateway} if net.gateway else {}),
                    "hosts": [
                        {
                            "name": host.name,
                            "address": str(host.address),
                            "routes": [{"to": str(r.to), "via": str(r.via)} for r in host.routes],
                        }
                        for host in net.hosts
                    ],
                }
                for net in self.networks
            ],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _node_dict(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"name": node.name, "address": str(node.address)}
    if node.pod_cidr is not None:
        out["podCIDR"] = str(node.pod_cidr)
    if node.pods:
        out["pods"] = node.pods
    if node.engine != "userspace":
        out["engine"] = node.engine
    return out
