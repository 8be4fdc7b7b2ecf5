"""The lab's network plan: every namespace, link, address, route, sysctl and rule set, as data.

Pure: :func:`plan_lab` turns a :class:`~wirekube.lab.topology.Topology` and a lab name into a
:class:`LabPlan`; ``wirekube.lab.net`` applies it.  Nothing here runs a command.

Namespaces (all named ``wkl-<lab>.<key>``; lab names never contain ``.``, so the prefix
``wkl-<lab>.`` belongs to exactly one lab):

==========================  ========================================================
key                         what it is
==========================  ========================================================
``internet``                the public segment: core router of 198.18.0.0/15 and the
                            relay/STUN addresses (on ``lo``)
``<site>-router``           one per site: ``wan`` towards the internet, bridge ``lan``
``<node>``                  one per node: ``eth0`` on the site LAN, ``mgmt``, ``eth1``...
                            on private networks, ``pod0``... towards its pods
``<node>.pod<k>``           pods behind a node (``eth0``)
``<host>``                  a plain host on a private network (``eth0``)
``_net-<network>``          the L2 switch (bridge ``br0``) of a private network
``_mgmt``                   the management hub: the API address on ``lo`` and a
                            point-to-point veth per node
==========================  ========================================================

Address plan (fixed, all inside the lab's namespaces, none in the host's namespace):

- ``198.18.0.0/24``: internet services (relay ``198.18.0.2``, STUN ``198.18.0.2``/``.3``).
- ``198.18.<i>.0/24``: WAN link of site number ``i`` (1-based): internet ``.1``, router ``.2``.
  The router's WAN address is the public address of every node behind a NAT.
- ``198.19.<i>.0/24``: default LAN of a ``nat: none`` site (public node addresses), routed by
  the internet namespace to the site's router.
- ``192.168.<i>.0/24``: default LAN of a NAT site; the router is ``.1``, nodes from ``.10``.
- ``10.254.0.0/24``: management: the API server is reached at ``.1``, node ``n`` (global
  order) has ``.10+n``.  Each node has a /32 point-to-point link to the hub; the hub does not
  forward, so nodes cannot reach each other over it.
- private networks and pod CIDRs: as the topology says.

Interface names are at most 15 characters; they need only be unique inside their namespace,
so two labs can use identical names and addresses side by side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from wirekube.lab import nat
from wirekube.lab.topology import (
    DEFAULT_WAN_MTU,
    SERVICES_NET,
    Endpoint,
    Host,
    IPv4,
    NatKind,
    Net4,
    Node,
    PrivateNetwork,
    Site,
    Topology,
)

NETNS_PREFIX = "wkl-"
IFNAMSIZ = 15
LAB_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,22}[a-z0-9])?$")

INTERNET = "internet"
MGMT = "_mgmt"

# Interface names inside namespaces.
IF_WAN = "wan"
IF_LAN_BRIDGE = "lan"
IF_NODE_LAN = "eth0"
IF_MGMT = "mgmt"
IF_SERVICES = "lo"  # relay/STUN addresses (this kernel has no dummy device type)
IF_API = "lo"
IF_SWITCH = "br0"


@dataclass(frozen=True)
class Namespace:
    """One network namespace and what goes in it.

    ``links`` are ``ip -batch`` lines run once every veth exists (devices, enslaving,
    addresses, links up); ``routes`` run after every namespace has its links; ``sysctls`` and
    ``nft`` last.
    """

    key: str
    netns: str
    role: str  # internet | router | node | pod | host | switch | mgmt
    links: tuple[str, ...]
    routes: tuple[str, ...]
    sysctls: tuple[tuple[str, str], ...]
    nft: str | None = None


@dataclass(frozen=True)
class Veth:
    netns_a: str
    ifname_a: str
    netns_b: str
    ifname_b: str


@dataclass(frozen=True)
class PodInfo:
    name: str  # `<node>.pod<k>`
    node: str
    netns: str
    address: IPv4


@dataclass(frozen=True)
class NodeInfo:
    """Where a node sits and every address it has."""

    name: str
    site: str
    nat: NatKind
    netns: str
    lan_ip: IPv4  # on eth0: the node's InternalIP
    lan: Net4
    lan_gateway: IPv4
    public_ip: IPv4  # its own address for `nat: none`, else the router's WAN address
    mgmt_ip: IPv4
    private: Mapping[str, IPv4]  # private network name -> address
    interfaces: Mapping[str, str]  # "lan", "mgmt", network names, pod names -> ifname
    pod_cidr: Net4 | None
    pods: tuple[PodInfo, ...]


@dataclass(frozen=True)
class RouterInfo:
    name: str  # `<site>-router`
    site: str
    nat: NatKind
    netns: str
    wan_ip: IPv4
    lan_ip: IPv4
    lan: Net4


@dataclass(frozen=True)
class HostInfo:
    name: str
    network: str
    netns: str
    address: IPv4


@dataclass(frozen=True)
class LabPlan:
    lab: str
    topology: Topology
    namespaces: tuple[Namespace, ...]
    veths: tuple[Veth, ...]
    nodes: Mapping[str, NodeInfo]
    routers: Mapping[str, RouterInfo]  # by site name
    hosts: Mapping[str, HostInfo]
    pods: Mapping[str, PodInfo]
    relay: Endpoint
    stun: tuple[Endpoint, ...]
    api_address: IPv4
    targets: Mapping[str, str] = field(default_factory=dict)  # exec name -> netns

    @property
    def prefix(self) -> str:
        return netns_prefix(self.lab)

    @property
    def mgmt_netns(self) -> str:
        return netns_name(self.lab, MGMT)

    def netns(self, target: str) -> str:
        """The namespace of an exec target (node, SITE-router, internet, host, NODE.podK)."""
        try:
            return self.targets[target]
        except KeyError:
            raise KeyError(
                f"no {target!r} in lab {self.lab!r}; known: {', '.join(sorted(self.targets))}"
            ) from None


def netns_prefix(lab: str) -> str:
    return f"{NETNS_PREFIX}{lab}."


def netns_name(lab: str, key: str) -> str:
    return f"{netns_prefix(lab)}{key}"


def check_lab_name(lab: str) -> None:
    if not LAB_NAME.match(lab):
        raise ValueError(
            f"lab name {lab!r}: use 1-24 lower-case letters, digits and '-' "
            "(starting and ending with a letter or digit)"
        )


def ifname(*parts: object) -> str:
    """An interface name from parts, cut to the kernel's 15 characters."""
    return "-".join(str(p) for p in parts)[:IFNAMSIZ]


def _up(dev: str) -> str:
    return f"link set dev {dev} up"


_NODE_SYSCTLS = (
    ("net.ipv4.conf.all.rp_filter", "2"),
    ("net.ipv4.conf.default.rp_filter", "2"),
)
_ROUTER_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
)
_QUIET_SYSCTLS = (
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
)


def _proxy_of(topology: Topology, site: Site) -> tuple[str, int] | None:
    proxy = topology.internet.proxy
    return (str(proxy.host), proxy.port) if site.nat is NatKind.PROXY_ONLY and proxy is not None else None


RELAY_WSS_PORT = 443
"""The relay's WebSocket-over-TLS port in the lab (with an ``internet.proxy``)."""


def relay_load_balancer_nft(topology: Topology) -> str | None:
    """The relay's "NLB" in the internet namespace, when ``internet.relay`` has replicas: each
    new TCP connection and each new UDP flow (STUN) to the relay's address goes to a replica picked
    at random (``numgen random``), for packets from the sites and from the internet namespace
    itself; UDP the replicas start (the two NAT probes) leaves from the relay's address, as it does
    from a single relay, so a NAT sees the probes' ports, not the replicas' addresses."""
    internet = topology.internet
    replicas = internet.relay_replicas
    if not replicas:
        return None
    lb = internet.relay.host
    pick = f"numgen random mod {len(replicas)} map {{ " + ", ".join(
        f"{i} : {addr}" for i, addr in enumerate(replicas)) + " }"
    udp_ports = sorted({e.port for e in internet.stun if e.host == lb})
    rules = [f"ip daddr {lb} tcp dport {internet.relay.port} dnat to {pick}"]
    if internet.proxy is not None:  # the relay over WSS, behind the same "NLB"
        rules.append(f"ip daddr {lb} tcp dport {RELAY_WSS_PORT} dnat to {pick}")
    rules += [f"ip daddr {lb} udp dport {port} dnat to {pick}" for port in udp_ports]
    body = "\n".join(f"    {r}" for r in rules)
    backends = ", ".join(str(a) for a in replicas)
    return f"""table ip wirekube_lab_lb {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{body}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
{body}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {{ {backends} }} meta l4proto udp snat to {lb}
  }}
}}
"""


def plan_lab(topology: Topology, lab: str) -> LabPlan:
    check_lab_name(lab)
    builder = _PlanBuilder(topology, lab)
    for site_number, site in enumerate(topology.sites, start=1):
        builder.add_site(site_number, site)
    for network in topology.networks:
        builder.add_network(network)
    return builder.finish()


PrivateNic = tuple[str, IPv4, Net4]
"""A node's NIC on a private network: interface name, address, the network's CIDR."""


def _private_nics(topology: Topology) -> dict[str, dict[str, PrivateNic]]:
    """Each node's private-network NICs (``eth1``, ``eth2``... in the order of the networks), by
    node and network name."""
    node_private: dict[str, dict[str, PrivateNic]] = {}
    for network in topology.networks:
        for attachment in network.attachments:
            node_private.setdefault(attachment.node, {})
            index = len(node_private[attachment.node]) + 1
            node_private[attachment.node][network.name] = (
                f"eth{index}", attachment.address, network.cidr)
    return node_private


@dataclass
class _NodeParts:
    """What one node namespace collects while it is planned: its ``ip -batch`` lines and the
    names of its interfaces."""

    links: list[str]
    routes: list[str]
    interfaces: dict[str, str]


class _PlanBuilder:
    """Collects a :class:`LabPlan` while :func:`plan_lab` walks the topology: the internet and
    the management hub first (their lines grow with every site and node), then each site with its
    router, nodes and pods, then each private network with its switch and hosts.  The order of
    every list is the order the lab creates things in."""

    def __init__(self, topology: Topology, lab: str) -> None:
        self.topology = topology
        self.lab = lab
        self.namespaces: list[Namespace] = []
        self.veths: list[Veth] = []
        self.targets: dict[str, str] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.routers: dict[str, RouterInfo] = {}
        self.pods: dict[str, PodInfo] = {}
        self.hosts: dict[str, HostInfo] = {}
        self.api = topology.management.api_address
        # Internet.
        self.inet = self.ns(INTERNET)
        self.targets[INTERNET] = self.inet
        self.inet_links = [_up("lo")]
        self.inet_links += [f"addr add {a}/32 dev {IF_SERVICES}" for a in topology.internet.addresses]
        self.inet_routes: list[str] = []
        # Management hub.
        self.mgmt = self.ns(MGMT)
        self.mgmt_links = [_up("lo"), f"addr add {self.api}/32 dev {IF_API}"]
        self.mgmt_routes: list[str] = []
        # Nodes' private-network pieces, used while walking the sites and the networks.
        self.node_private = _private_nics(topology)
        self.node_number = 0

    def ns(self, key: str) -> str:
        return netns_name(self.lab, key)

    def add_site(self, site_number: int, site: Site) -> None:
        """The site's WAN link to the internet, its router (bridge ``lan``, NAT rules) and its nodes."""
        wan_net = Net4(f"198.18.{site_number}.0/24")
        inet_side, router_wan = wan_net.network_address + 1, wan_net.network_address + 2
        router = self.ns(site.router)
        self.targets[site.router] = router
        inet_if = ifname(f"r{site_number}", site.name)
        self.veths.append(Veth(self.inet, inet_if, router, IF_WAN))
        self.inet_links += [f"addr add {inet_side}/24 dev {inet_if}", _up(inet_if)]
        if site.wan_mtu != DEFAULT_WAN_MTU and not site.block_icmp:
            self.inet_links.append(f"link set dev {inet_if} mtu {site.wan_mtu}")
        if site.nat is NatKind.NONE:
            self.inet_routes.append(f"route add {site.lan} via {router_wan} dev {inet_if}")
        router_links = [
            _up("lo"),
            f"link add name {IF_LAN_BRIDGE} type bridge",
            f"addr add {router_wan}/24 dev {IF_WAN}",
            f"addr add {site.gateway}/{site.lan.prefixlen} dev {IF_LAN_BRIDGE}",
            *([f"link set dev {IF_WAN} mtu {site.wan_mtu}"] if site.wan_mtu != DEFAULT_WAN_MTU else []),
            _up(IF_WAN),
            _up(IF_LAN_BRIDGE),
        ]
        self.routers[site.name] = RouterInfo(site.router, site.name, site.nat, router, router_wan,
                                             site.gateway, site.lan)
        for index_in_site, node in enumerate(site.nodes):
            port = ifname(f"n{index_in_site}", node.name)
            router_links += [f"link set dev {port} master {IF_LAN_BRIDGE}", _up(port)]
            self.add_node(site, node, (router, port), router_wan)
        self.namespaces.append(Namespace(
            key=site.router,
            netns=router,
            role="router",
            links=tuple(router_links),
            routes=(f"route add default via {inet_side} dev {IF_WAN}",),
            sysctls=_QUIET_SYSCTLS + _ROUTER_SYSCTLS,
            nft=nat.router_ruleset(site.nat, IF_WAN, proxy=_proxy_of(self.topology, site)) + nat.path_ruleset(
                drop_fragments=site.drop_fragments, block_icmp=site.block_icmp, wan=IF_WAN),
        ))

    def add_node(self, site: Site, node: Node, router_port: tuple[str, str], router_wan: IPv4) -> None:
        """A node: its LAN veth to the router's bridge port ``router_port`` (namespace, ifname),
        its point-to-point link to the management hub, its private-network NICs and its pods."""
        node_ns = self.ns(node.name)
        self.targets[node.name] = node_ns
        mgmt_ip = self.topology.management.cidr.network_address + 10 + self.node_number
        self.veths.append(Veth(node_ns, IF_NODE_LAN, *router_port))
        hub_port = ifname(f"m{self.node_number}", node.name)
        self.veths.append(Veth(node_ns, IF_MGMT, self.mgmt, hub_port))
        self.mgmt_links.append(_up(hub_port))
        self.mgmt_routes.append(f"route add {mgmt_ip}/32 dev {hub_port} src {self.api}")
        self.node_number += 1

        parts = _NodeParts(
            links=[
                _up("lo"),
                f"addr add {node.address}/{site.lan.prefixlen} dev {IF_NODE_LAN}",
                _up(IF_NODE_LAN),
                f"addr add {mgmt_ip}/32 peer {self.api}/32 dev {IF_MGMT}",
                _up(IF_MGMT),
            ],
            routes=[f"route add default via {site.gateway} dev {IF_NODE_LAN}"],
            interfaces={"lan": IF_NODE_LAN, "mgmt": IF_MGMT},
        )
        private: dict[str, IPv4] = {}
        for net_name, (dev, address, cidr) in self.node_private.get(node.name, {}).items():
            parts.links += [f"addr add {address}/{cidr.prefixlen} dev {dev}", _up(dev)]
            parts.interfaces[net_name] = dev
            private[net_name] = address
        node_pods = self.add_pods(node, node_ns, parts)
        forwarding = (("net.ipv4.ip_forward", "1" if node.pods else "0"),)
        self.namespaces.append(Namespace(
            key=node.name,
            netns=node_ns,
            role="node",
            links=tuple(parts.links),
            routes=tuple(parts.routes),
            sysctls=_QUIET_SYSCTLS + _NODE_SYSCTLS + forwarding,
        ))
        self.nodes[node.name] = NodeInfo(
            name=node.name,
            site=site.name,
            nat=site.nat,
            netns=node_ns,
            lan_ip=node.address,
            lan=site.lan,
            lan_gateway=site.gateway,
            public_ip=node.address if site.nat is NatKind.NONE else router_wan,
            mgmt_ip=mgmt_ip,
            private=private,
            interfaces=parts.interfaces,
            pod_cidr=node.pod_cidr,
            pods=tuple(node_pods),
        )

    def add_pods(self, node: Node, node_ns: str, parts: _NodeParts) -> list[PodInfo]:
        """The pod namespaces behind a node, each on a ``pod<k>`` veth whose node end holds the
        pod CIDR's first address; the node's lines for them go to ``parts``."""
        node_pods: list[PodInfo] = []
        if not node.pods:
            return node_pods
        assert node.pod_cidr is not None
        pod_gw = node.pod_cidr.network_address + 1
        for k in range(node.pods):
            pod_name = f"{node.name}.pod{k}"
            pod_ns = self.ns(pod_name)
            self.targets[pod_name] = pod_ns
            pod_ip = node.pod_cidr.network_address + 2 + k
            dev = f"pod{k}"
            self.veths.append(Veth(node_ns, dev, pod_ns, "eth0"))
            parts.links += [f"addr add {pod_gw}/32 dev {dev}", _up(dev)]
            parts.routes.append(f"route add {pod_ip}/32 dev {dev} src {pod_gw}")
            parts.interfaces[pod_name] = dev
            pod = PodInfo(pod_name, node.name, pod_ns, pod_ip)
            self.pods[pod_name] = pod
            node_pods.append(pod)
            self.namespaces.append(Namespace(
                key=pod_name,
                netns=pod_ns,
                role="pod",
                links=(_up("lo"), f"addr add {pod_ip}/32 dev eth0", _up("eth0")),
                routes=(f"route add {pod_gw}/32 dev eth0 scope link",
                        f"route add default via {pod_gw} dev eth0 onlink"),
                sysctls=_QUIET_SYSCTLS,
            ))
        return node_pods

    def add_network(self, network: PrivateNetwork) -> None:
        """A private network: a switch namespace (bridge ``br0``), the attached nodes' NICs and
        the plain hosts behind it."""
        switch = self.ns(f"_net-{network.name}")
        switch_links = [_up("lo"), f"link add name {IF_SWITCH} type bridge", _up(IF_SWITCH)]
        for number, attachment in enumerate(network.attachments):
            port = ifname(f"n{number}", attachment.node)
            dev = self.node_private[attachment.node][network.name][0]
            self.veths.append(Veth(self.ns(attachment.node), dev, switch, port))
            switch_links += [f"link set dev {port} master {IF_SWITCH}", _up(port)]
        for number, host in enumerate(network.hosts):
            port = ifname(f"h{number}", host.name)
            switch_links += [f"link set dev {port} master {IF_SWITCH}", _up(port)]
            self.add_host(network, host, (switch, port))
        self.namespaces.append(Namespace(
            key=f"_net-{network.name}",
            netns=switch,
            role="switch",
            links=tuple(switch_links),
            routes=(),
            sysctls=_QUIET_SYSCTLS + (("net.ipv4.ip_forward", "0"),),
        ))

    def add_host(self, network: PrivateNetwork, host: Host, switch_port: tuple[str, str]) -> None:
        """A plain host on a private network, on a veth to the switch port ``switch_port``
        (namespace, ifname), with the routes the topology gives it."""
        host_ns = self.ns(host.name)
        self.targets[host.name] = host_ns
        self.veths.append(Veth(host_ns, "eth0", *switch_port))
        self.namespaces.append(Namespace(
            key=host.name,
            netns=host_ns,
            role="host",
            links=(_up("lo"), f"addr add {host.address}/{network.cidr.prefixlen} dev eth0",
                   _up("eth0")),
            routes=tuple(f"route add {r.to} via {r.via} dev eth0" for r in host.routes),
            sysctls=_QUIET_SYSCTLS + (("net.ipv4.ip_forward", "0"),),
        ))
        self.hosts[host.name] = HostInfo(host.name, network.name, host_ns, host.address)

    def finish(self) -> LabPlan:
        """The plan, with the internet and the management hub first among the namespaces."""
        topology = self.topology
        namespaces = [
            Namespace(
                key=INTERNET,
                netns=self.inet,
                role="internet",
                links=tuple(self.inet_links),
                routes=tuple(self.inet_routes),
                sysctls=_QUIET_SYSCTLS + _ROUTER_SYSCTLS,
                nft=relay_load_balancer_nft(topology),
            ),
            Namespace(
                key=MGMT,
                netns=self.mgmt,
                role="mgmt",
                links=tuple(self.mgmt_links),
                routes=tuple(self.mgmt_routes),
                sysctls=_QUIET_SYSCTLS + (("net.ipv4.ip_forward", "0"),),
            ),
            *self.namespaces,
        ]
        assert all(a in SERVICES_NET for a in topology.internet.addresses)
        return LabPlan(
            lab=self.lab,
            topology=topology,
            namespaces=tuple(namespaces),
            veths=tuple(self.veths),
            nodes=self.nodes,
            routers=self.routers,
            hosts=self.hosts,
            pods=self.pods,
            relay=topology.internet.relay,
            stun=topology.internet.stun,
            api_address=self.api,
            targets=self.targets,
        )
