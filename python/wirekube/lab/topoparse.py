"""Parsing and checking a topology document (as loaded from YAML) into a :class:`Topology`.

Every field is checked and every mistake is collected with the path of the field
(``sites[2].nodes[0].podCIDR: ...``) before one :class:`TopologyError` lists them all; defaults
are filled in on the way (see :mod:`wirekube.lab.topology` for the format).  Pure module: no I/O
except :func:`load_topology` reading the file it is given.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from wirekube.lab.topomodel import (
    DEFAULT_MANAGEMENT,
    DEFAULT_STUN_PORT,
    DEFAULT_WAN_MTU,
    FIRST_NODE_HOST,
    KUBERNETES_MODES,
    MAX_PODS_PER_NODE,
    MAX_SITES,
    MIN_WAN_MTU,
    NODE_ENGINES,
    PUBLIC_LANS,
    PUBLIC_SPACE,
    SERVICES_NET,
    Attachment,
    Endpoint,
    Host,
    Internet,
    IPv4,
    Management,
    NatKind,
    Net4,
    Node,
    PrivateNetwork,
    Route,
    Site,
    Topology,
    TopologyError,
)

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 40


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))


def _keys(doc: Mapping[str, Any], path: str, allowed: Sequence[str], problems: _Problems) -> None:
    for key in doc:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.add(
                _join(path, str(key)),
                f"unknown key (allowed: {', '.join(allowed)}){hint}",
            )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(value: Any, path: str, problems: _Problems) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    problems.add(path, f"must be a mapping, got {_kind(value)}")
    return None


def _list(value: Any, path: str, problems: _Problems) -> list[Any] | None:
    if isinstance(value, list):
        return value
    problems.add(path, f"must be a list, got {_kind(value)}")
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _name(value: Any, path: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not value:
        problems.add(path, f"must be a non-empty string, got {_kind(value)}")
        return None
    if len(value) > _MAX_NAME or not _NAME.match(value):
        problems.add(
            path,
            f"{value!r} is not a valid name (lower-case letters, digits and '-', starting and "
            f"ending with a letter or digit, at most {_MAX_NAME} characters)",
        )
        return None
    return value


def _network(value: Any, path: str, problems: _Problems) -> Net4 | None:
    if not isinstance(value, str):
        problems.add(path, f"must be an IPv4 CIDR string such as 10.0.0.0/24, got {_kind(value)}")
        return None
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        problems.add(path, f"{value!r} is not a valid IPv4 network: {e}")
        return None
    if not isinstance(net, Net4):
        problems.add(path, f"{value!r}: only IPv4 is supported in the lab")
        return None
    return net


def _address(value: Any, path: str, problems: _Problems) -> IPv4 | None:
    if not isinstance(value, str):
        problems.add(path, f"must be an IPv4 address string, got {_kind(value)}")
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        problems.add(path, f"{value!r} is not a valid IP address")
        return None
    if not isinstance(addr, IPv4):
        problems.add(path, f"{value!r}: only IPv4 is supported in the lab")
        return None
    return addr


def _endpoint(value: Any, path: str, problems: _Problems) -> Endpoint | None:
    if not isinstance(value, str):
        problems.add(path, f"must be a string 'ADDRESS[:PORT]', got {_kind(value)}")
        return None
    host, sep, port_text = value.partition(":")
    port = DEFAULT_STUN_PORT
    if sep:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            problems.add(path, f"{value!r}: port must be a number from 1 to 65535")
            return None
        port = int(port_text)
    addr = _address(host, path, problems)
    if addr is None:
        return None
    if not _is_host_of(addr, SERVICES_NET):
        problems.add(path, f"{addr} must be a host address in the internet's {SERVICES_NET}")
        return None
    return Endpoint(addr, port)


def _is_host_of(addr: IPv4, net: Net4) -> bool:
    return addr in net and addr not in (net.network_address, net.broadcast_address)


class _Allocator:
    """Hands out host addresses of a network in order, skipping reserved and taken ones."""

    def __init__(self, net: Net4, first: int, taken: set[IPv4]) -> None:
        self.net = net
        self.next = first
        self.taken = taken

    def take(self) -> IPv4 | None:
        while self.next < self.net.num_addresses - 1:
            candidate = self.net.network_address + self.next
            self.next += 1
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate
        return None


def parse_topology(doc: Any, source: str = "topology") -> Topology:
    """Check a topology document (as loaded from YAML) and return it with defaults filled in.

    Raises :class:`TopologyError` listing every mistake with its path.
    """
    problems = _Problems()
    topology = _parse(doc, problems)
    if problems.items or topology is None:
        raise TopologyError(problems.items or [("", "empty topology")], source)
    return topology


def load_topology(path: str | Path) -> Topology:
    """Read and check a topology YAML file."""
    text = Path(path).read_text(encoding="utf-8")
    return parse_topology_yaml(text, str(path))


def parse_topology_yaml(text: str, source: str = "topology") -> Topology:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError([("", f"not valid YAML: {e}")], source) from e
    return parse_topology(doc, source)


def _parse(doc: Any, problems: _Problems) -> Topology | None:
    root = _mapping(doc, "", problems) if doc is not None else None
    if root is None:
        if doc is None:
            problems.add("", "the document is empty; it needs at least 'sites'")
        return None
    _keys(root, "", ("internet", "management", "sites", "networks", "kubernetes"), problems)
    kubernetes = root.get("kubernetes", "processes")
    if kubernetes not in KUBERNETES_MODES:
        problems.add("kubernetes", f"must be one of {', '.join(KUBERNETES_MODES)}, not {kubernetes!r}")
        kubernetes = "processes"

    internet = _parse_internet(root.get("internet"), problems)
    management = _parse_management(root.get("management"), problems)
    paths: dict[int, str] = {}  # id(Site, Node or PrivateNetwork) -> path in the document, for messages
    sites = _parse_sites(root, problems, paths)
    names = _check_names(root, sites, paths, problems)
    all_nodes = {node.name for site in sites for node in site.nodes}
    networks = _parse_networks(root, all_nodes, names, problems, paths)

    _check_overlaps(sites, networks, management, paths, problems)
    if management is not None:
        _check_management_size(management, len(all_nodes), problems)
    if internet is None or management is None:
        return None
    if internet.proxy is None and any(site.nat is NatKind.PROXY_ONLY for site in sites):
        if DEFAULT_PROXY.host in internet.addresses:
            problems.add("internet.proxy", f"a proxy-only site needs one; the default {DEFAULT_PROXY} is taken")
            return None
        internet = replace(internet, proxy=DEFAULT_PROXY)
    if kubernetes == "kubelet" and any(node.engine != "userspace" or node.pods
                                       for site in sites for node in site.nodes):
        problems.add("kubernetes", "kubelet nodes run pods of their own: no `pods:` and no `engine: kernel` nodes")
    return Topology(internet, tuple(sites), tuple(networks), management, kubernetes)


def _parse_sites(root: Mapping[str, Any], problems: _Problems, paths: dict[int, str]) -> list[Site]:
    """``sites``: a list of at least one (and at most :data:`MAX_SITES`) site."""
    sites: list[Site] = []
    raw_sites = root.get("sites")
    if raw_sites is None:
        problems.add("sites", "required: a list of at least one site")
        raw_sites = []
    raw_sites = _list(raw_sites, "sites", problems) or []
    if len(raw_sites) > MAX_SITES:
        problems.add("sites", f"at most {MAX_SITES} sites")
    for i, raw in enumerate(raw_sites):
        site = _parse_site(raw, f"sites[{i}]", i + 1, problems, paths)
        if site is not None:
            sites.append(site)
    if root.get("sites") == []:
        problems.add("sites", "needs at least one site")
    return sites


def _parse_networks(root: Mapping[str, Any], all_nodes: set[str], names: set[str], problems: _Problems,
                    paths: dict[int, str]) -> list[PrivateNetwork]:
    """``networks``: optional private networks among the nodes of ``all_nodes``."""
    networks: list[PrivateNetwork] = []
    raw_networks = root.get("networks", []) or []
    raw_networks = _list(raw_networks, "networks", problems) or []
    for i, raw in enumerate(raw_networks):
        net = _parse_network(raw, f"networks[{i}]", all_nodes, names, problems)
        if net is not None:
            paths[id(net)] = f"networks[{i}]"
            networks.append(net)
    return networks


def _check_management_size(management: Management, node_count: int, problems: _Problems) -> None:
    """The management CIDR must hold the API address and one address per node from ``.10``."""
    needed = node_count + FIRST_NODE_HOST + 1
    if management.cidr.num_addresses < needed:
        problems.add(
            "management.cidr",
            f"{management.cidr} is too small for {node_count} nodes "
            f"(needs {needed} addresses)",
        )


def _parse_internet(raw: Any, problems: _Problems) -> Internet | None:
    default_relay = Endpoint(SERVICES_NET.network_address + 2, DEFAULT_STUN_PORT)
    default_stun = (default_relay, Endpoint(SERVICES_NET.network_address + 3, DEFAULT_STUN_PORT))
    if raw is None:
        return Internet(default_relay, default_stun)
    doc = _mapping(raw, "internet", problems)
    if doc is None:
        return None
    _keys(doc, "internet", ("relay", "stun", "proxy"), problems)
    relay = default_relay
    replicas: tuple[IPv4, ...] = ()
    if isinstance(doc.get("relay"), Mapping):
        relay, replicas = _parse_relay_replicas(doc["relay"], default_relay, problems)
    elif "relay" in doc:
        relay = _endpoint(doc["relay"], "internet.relay", problems) or default_relay
    stun: tuple[Endpoint, ...] = default_stun
    if "stun" in doc:
        raw_stun = _list(doc["stun"], "internet.stun", problems) or []
        parsed = [_endpoint(v, f"internet.stun[{i}]", problems) for i, v in enumerate(raw_stun)]
        stun = tuple(e for e in parsed if e is not None)
        if len(raw_stun) < 2:
            problems.add("internet.stun", "needs at least two STUN endpoints (NAT classification)")
        for i, endpoint in enumerate(stun):
            if endpoint in stun[:i]:
                problems.add(f"internet.stun[{i}]", f"{endpoint} is listed twice")
    for i, replica in enumerate(replicas):
        if any(replica == e.host for e in stun):
            problems.add(f"internet.relay.replicas[{i}]", f"{replica} is also a STUN server's address")
    proxy = None
    if doc.get("proxy") is not None:
        proxy = _endpoint(doc["proxy"], "internet.proxy", problems)
        taken = {relay.host, *(e.host for e in stun), *replicas}
        if proxy is not None and proxy.host in taken:
            problems.add("internet.proxy", f"{proxy.host} is already the relay's, a replica's or a STUN server's")
    return Internet(relay, stun, replicas, proxy)


DEFAULT_PROXY = Endpoint(SERVICES_NET.network_address + 9, 3128)
"""Where the HTTP proxy sits when a ``proxy-only`` site needs one and ``internet.proxy`` is not set."""


MAX_RELAY_REPLICAS = 8
FIRST_REPLICA_HOST = 20  # replicas: N puts them at 198.18.0.20, .21, ...


def _parse_relay_replicas(raw: Mapping[str, Any], default: Endpoint,
                          problems: _Problems) -> tuple[Endpoint, tuple[IPv4, ...]]:
    """``relay: {address: LB:PORT, replicas: N | [ADDRESS, ...]}``."""
    path = "internet.relay"
    _keys(raw, path, ("address", "replicas"), problems)
    relay = _endpoint(raw["address"], f"{path}.address", problems) if "address" in raw else default
    relay = relay or default
    value = raw.get("replicas")
    replicas: list[IPv4] = []
    if isinstance(value, bool) or value is None:
        problems.add(f"{path}.replicas", "must be a count or a list of addresses (the load balancer's backends)")
    elif isinstance(value, int):
        if not 1 <= value <= MAX_RELAY_REPLICAS:
            problems.add(f"{path}.replicas", f"must be from 1 to {MAX_RELAY_REPLICAS}, not {value}")
        else:
            replicas = [SERVICES_NET.network_address + FIRST_REPLICA_HOST + i for i in range(value)]
    else:
        items = _list(value, f"{path}.replicas", problems) or []
        if not 1 <= len(items) <= MAX_RELAY_REPLICAS:
            problems.add(f"{path}.replicas", f"needs 1 to {MAX_RELAY_REPLICAS} addresses, not {len(items)}")
        for i, item in enumerate(items):
            addr = _address(item, f"{path}.replicas[{i}]", problems) if isinstance(item, str) else None
            if not isinstance(item, str):
                problems.add(f"{path}.replicas[{i}]", f"must be an address string, got {_kind(item)}")
            elif addr is not None and not _is_host_of(addr, SERVICES_NET):
                problems.add(f"{path}.replicas[{i}]", f"{addr} must be a host address in the internet's {SERVICES_NET}")
            elif addr is not None and addr in replicas:
                problems.add(f"{path}.replicas[{i}]", f"{addr} is listed twice")
            elif addr is not None:
                replicas.append(addr)
    for i, addr in enumerate(replicas):
        if addr == relay.host:
            problems.add(f"{path}.replicas[{i}]", f"{addr} is the load balancer's own address")
    return relay, tuple(replicas)


def _parse_management(raw: Any, problems: _Problems) -> Management | None:
    if raw is None:
        return Management(DEFAULT_MANAGEMENT)
    doc = _mapping(raw, "management", problems)
    if doc is None:
        return None
    _keys(doc, "management", ("cidr",), problems)
    if "cidr" not in doc:
        return Management(DEFAULT_MANAGEMENT)
    cidr = _network(doc["cidr"], "management.cidr", problems)
    return Management(cidr) if cidr is not None else None


def _parse_site(
    raw: Any, path: str, number: int, problems: _Problems, paths: dict[int, str]
) -> Site | None:
    doc = _mapping(raw, path, problems)
    if doc is None:
        return None
    _keys(doc, path, ("name", "nat", "lan", "nodes", "wanMTU", "dropFragments", "blockICMP"), problems)
    name = _name(doc.get("name"), f"{path}.name", problems)
    nat = _parse_nat(doc, path, problems)
    lan = _parse_site_lan(doc, path, nat, number, problems)
    nodes = _parse_site_nodes(doc, path, lan, problems, paths)
    wan_mtu = doc.get("wanMTU", DEFAULT_WAN_MTU)
    if not isinstance(wan_mtu, int) or isinstance(wan_mtu, bool) or not MIN_WAN_MTU <= wan_mtu <= DEFAULT_WAN_MTU:
        problems.add(f"{path}.wanMTU",
                     f"must be a whole number from {MIN_WAN_MTU} to {DEFAULT_WAN_MTU}, not {wan_mtu!r}")
        wan_mtu = DEFAULT_WAN_MTU
    flags = {}
    for key in ("dropFragments", "blockICMP"):
        flags[key] = doc.get(key, False)
        if not isinstance(flags[key], bool):
            problems.add(f"{path}.{key}", f"must be true or false, not {flags[key]!r}")
            flags[key] = False
    if name is None or nat is None or lan is None:
        return None
    site = Site(name, nat, lan, tuple(nodes), wan_mtu=wan_mtu, drop_fragments=flags["dropFragments"],
                block_icmp=flags["blockICMP"])
    paths[id(site)] = path
    return site


def _parse_nat(doc: Mapping[str, Any], path: str, problems: _Problems) -> NatKind | None:
    """A site's required ``nat``, one of :class:`NatKind`'s values."""
    kinds = [k.value for k in NatKind]
    if "nat" not in doc:
        problems.add(f"{path}.nat", f"required: one of {', '.join(kinds)}")
    elif doc["nat"] not in kinds:
        problems.add(f"{path}.nat", f"{doc['nat']!r} is not one of {', '.join(kinds)}")
    else:
        return NatKind(doc["nat"])
    return None


def _parse_site_lan(
    doc: Mapping[str, Any], path: str, nat: NatKind | None, number: int, problems: _Problems
) -> Net4 | None:
    """A site's ``lan``, by default ``198.19.<number>.0/24`` (``nat: none``) or
    ``192.168.<number>.0/24``: public inside :data:`PUBLIC_LANS` exactly when ``nat: none``."""
    lan: Net4 | None
    if "lan" in doc:
        lan = _network(doc["lan"], f"{path}.lan", problems)
    elif nat is NatKind.NONE:
        lan = Net4(f"198.19.{number}.0/24")
    else:
        lan = Net4(f"192.168.{number}.0/24")
    if lan is not None and nat is not None:
        if lan.prefixlen > 29:
            problems.add(f"{path}.lan", f"{lan} is too small (at most /29)")
        if nat is NatKind.NONE and not lan.subnet_of(PUBLIC_LANS):
            problems.add(
                f"{path}.lan",
                f"{lan}: a site with nat: none has a public LAN, inside {PUBLIC_LANS}",
            )
        if nat is not NatKind.NONE and lan.overlaps(PUBLIC_SPACE):
            problems.add(
                f"{path}.lan",
                f"{lan} overlaps the lab's public space {PUBLIC_SPACE}; use a private range",
            )
    return lan


def _parse_site_nodes(
    doc: Mapping[str, Any], path: str, lan: Net4 | None, problems: _Problems, paths: dict[int, str]
) -> list[Node]:
    """A site's ``nodes``: explicit addresses first, so automatic ones (from ``.10``) never take
    them."""
    raw_nodes = doc.get("nodes")
    if raw_nodes is None:
        problems.add(f"{path}.nodes", "required: a list of at least one node")
        raw_nodes = []
    raw_nodes = _list(raw_nodes, f"{path}.nodes", problems) or []
    if doc.get("nodes") == []:
        problems.add(f"{path}.nodes", "needs at least one node")
    parsed: list[tuple[str, dict[str, Any]]] = []
    taken: set[IPv4] = set()
    for j, raw_node in enumerate(raw_nodes):
        npath = f"{path}.nodes[{j}]"
        fields = _parse_node(raw_node, npath, lan, taken, problems)
        if fields is not None:
            parsed.append((npath, fields))
    nodes: list[Node] = []
    if lan is not None:
        allocator = _Allocator(lan, FIRST_NODE_HOST, taken | {lan.network_address + 1})
        for npath, fields in parsed:
            if "address" not in fields:
                addr = allocator.take()
                if addr is None:
                    problems.add(f"{npath}.address", f"no free address left in the LAN {lan}")
                    continue
                fields["address"] = addr
            if fields["name"] is not None:
                node = Node(**fields)
                paths[id(node)] = npath
                nodes.append(node)
    return nodes


def _parse_node(
    raw: Any, npath: str, lan: Net4 | None, taken: set[IPv4], problems: _Problems
) -> dict[str, Any] | None:
    """One node's fields for :class:`Node` (``address`` only when explicit; it joins ``taken``)."""
    node_doc = _mapping(raw, npath, problems)
    if node_doc is None:
        return None
    _keys(node_doc, npath, ("name", "address", "podCIDR", "pods", "engine"), problems)
    fields: dict[str, Any] = {"name": _name(node_doc.get("name"), f"{npath}.name", problems)}
    if "address" in node_doc and lan is not None:
        addr = _address(node_doc["address"], f"{npath}.address", problems)
        if addr is not None:
            if not _is_host_of(addr, lan) or addr == lan.network_address + 1:
                problems.add(
                    f"{npath}.address",
                    f"{addr} must be a host address of the LAN {lan} other than the "
                    f"router's {lan.network_address + 1}",
                )
            elif addr in taken:
                problems.add(f"{npath}.address", f"{addr} is used by another node")
            else:
                taken.add(addr)
                fields["address"] = addr
    fields.update(_parse_node_pods(node_doc, npath, problems))
    engine = node_doc.get("engine", "userspace")
    if engine not in NODE_ENGINES:
        problems.add(f"{npath}.engine", f"must be one of {', '.join(NODE_ENGINES)}, not {engine!r}")
    elif engine == "kernel" and fields["pods"]:
        problems.add(f"{npath}.pods", "a node with engine: kernel (a VM) cannot have pods")
    else:
        fields["engine"] = engine
    return fields


def _parse_node_pods(node_doc: Mapping[str, Any], npath: str, problems: _Problems) -> dict[str, Any]:
    """A node's ``podCIDR`` and ``pods`` (a count, which needs a podCIDR large enough)."""
    pod_cidr = None
    if "podCIDR" in node_doc:
        pod_cidr = _network(node_doc["podCIDR"], f"{npath}.podCIDR", problems)
    pods = node_doc.get("pods", 0)
    if not isinstance(pods, int) or isinstance(pods, bool) or not 0 <= pods <= MAX_PODS_PER_NODE:
        problems.add(f"{npath}.pods", f"must be a whole number from 0 to {MAX_PODS_PER_NODE}")
        pods = 0
    if pods and "podCIDR" not in node_doc:
        problems.add(f"{npath}.pods", "pods need a podCIDR on the node")
    if pod_cidr is not None and pods and pod_cidr.num_addresses < pods + 2:
        problems.add(f"{npath}.podCIDR", f"{pod_cidr} is too small for {pods} pods")
    return {"pod_cidr": pod_cidr, "pods": pods}


def _check_names(
    root: Mapping[str, Any], sites: list[Site], paths: dict[int, str], problems: _Problems
) -> set[str]:
    """Every name `exec` knows must be unique: nodes, SITE-router, internet, hosts, NODE.podK."""
    owners: dict[str, str] = {"internet": "the internet segment"}
    site_paths: dict[str, str] = {}
    for site in sites:
        path = f"{paths[id(site)]}.name"
        if site.name in site_paths:
            problems.add(path, f"site {site.name!r} is already defined at {site_paths[site.name]}")
            continue
        site_paths[site.name] = path
        _claim(owners, site.router, f"the router of site {site.name!r}", path, problems)
    for site in sites:
        for node in site.nodes:
            path = f"{paths[id(node)]}.name"
            _claim(owners, node.name, path, path, problems)
            for k in range(node.pods):
                _claim(owners, f"{node.name}.pod{k}", f"pod {k} of {node.name}", path, problems)
    raw_networks = root.get("networks") or []
    if isinstance(raw_networks, list):
        for i, raw in enumerate(raw_networks):
            if not isinstance(raw, Mapping) or not isinstance(raw.get("hosts"), list):
                continue
            for j, host in enumerate(raw["hosts"]):
                if isinstance(host, Mapping) and isinstance(host.get("name"), str):
                    path = f"networks[{i}].hosts[{j}].name"
                    _claim(owners, host["name"], path, path, problems)
    return set(owners)


def _claim(owners: dict[str, str], name: str, owner: str, path: str, problems: _Problems) -> None:
    if name in owners:
        problems.add(path, f"the name {name!r} is already taken by {owners[name]}")
    else:
        owners[name] = owner


def _parse_network(
    raw: Any, path: str, all_nodes: set[str], names: set[str], problems: _Problems
) -> PrivateNetwork | None:
    doc = _mapping(raw, path, problems)
    if doc is None:
        return None
    _keys(doc, path, ("name", "cidr", "nodes", "gateway", "hosts"), problems)
    name = _name(doc.get("name"), f"{path}.name", problems)
    cidr = _parse_network_cidr(doc, path, problems)
    taken: set[IPv4] = set()
    wanted = _parse_attachments(doc, path, all_nodes, (cidr, taken), problems)
    gateway = doc.get("gateway")
    if gateway is not None and gateway not in [n for _, n, _ in wanted]:
        problems.add(f"{path}.gateway", f"{gateway!r} is not one of this network's nodes")
        gateway = None
    host_docs = _parse_host_docs(doc, path, (cidr, taken), problems)
    if cidr is None or name is None:
        return None
    allocator = _Allocator(cidr, FIRST_NODE_HOST, taken)
    attachments: list[Attachment] = []
    for epath, node_name, explicit in wanted:
        addr = explicit or allocator.take()
        if addr is None:
            problems.add(epath, f"no free address left in {cidr}")
            continue
        attachments.append(Attachment(node_name, addr))
    by_node = {a.node: a.address for a in attachments}

    hosts: list[Host] = []
    for hpath, host_doc, explicit in host_docs:
        addr = explicit or allocator.take()
        if addr is None:
            problems.add(hpath, f"no free address left in {cidr}")
            continue
        routes = _parse_routes(host_doc.get("routes", []), f"{hpath}.routes", cidr, by_node,
                               gateway, problems)
        host_name = host_doc.get("name")
        if isinstance(host_name, str) and _NAME.match(host_name):
            hosts.append(Host(host_name, addr, routes))
    return PrivateNetwork(name, cidr, tuple(attachments), gateway, tuple(hosts))


def _parse_network_cidr(doc: Mapping[str, Any], path: str, problems: _Problems) -> Net4 | None:
    """A private network's required ``cidr``: at most a /29, outside the lab's public space."""
    if "cidr" not in doc:
        problems.add(f"{path}.cidr", "required: the network's IPv4 CIDR")
        return None
    cidr = _network(doc["cidr"], f"{path}.cidr", problems)
    if cidr is not None and cidr.prefixlen > 29:
        problems.add(f"{path}.cidr", f"{cidr} is too small (at most /29)")
        cidr = None
    if cidr is not None and cidr.overlaps(PUBLIC_SPACE):
        problems.add(f"{path}.cidr", f"{cidr} overlaps the lab's public space {PUBLIC_SPACE}")
    return cidr


_Addresses = tuple[Net4 | None, set[IPv4]]
"""A private network's CIDR (None when it is wrong) and the explicit addresses taken in it so far."""


def _parse_attachments(
    doc: Mapping[str, Any], path: str, all_nodes: set[str], addresses: _Addresses, problems: _Problems
) -> list[tuple[str, str, IPv4 | None]]:
    """A private network's ``nodes`` (names, or ``{name, address}``), each a node of some site,
    attached once: ``(path, node, explicit address)``."""
    cidr, taken = addresses
    wanted: list[tuple[str, str, IPv4 | None]] = []
    raw_nodes = doc.get("nodes")
    if raw_nodes is None:
        problems.add(f"{path}.nodes", "required: the nodes attached to this network")
        raw_nodes = []
    for j, entry in enumerate(_list(raw_nodes, f"{path}.nodes", problems) or []):
        epath = f"{path}.nodes[{j}]"
        node_name: Any = entry
        explicit: IPv4 | None = None
        if isinstance(entry, Mapping):
            _keys(entry, epath, ("name", "address"), problems)
            node_name = entry.get("name")
            if "address" in entry and cidr is not None:
                explicit = _address(entry["address"], f"{epath}.address", problems)
                explicit = _own_address(explicit, cidr, taken, f"{epath}.address", problems)
            epath = f"{epath}.name"
        if not isinstance(node_name, str) or node_name not in all_nodes:
            problems.add(epath, f"{node_name!r} is not a node of any site")
            continue
        if any(node_name == n for _, n, _ in wanted):
            problems.add(epath, f"{node_name!r} is attached twice")
            continue
        wanted.append((epath, node_name, explicit))
    if not wanted and isinstance(raw_nodes, list) and raw_nodes == []:
        problems.add(f"{path}.nodes", "needs at least one node")
    return wanted


def _parse_host_docs(
    doc: Mapping[str, Any], path: str, addresses: _Addresses, problems: _Problems
) -> list[tuple[str, Mapping[str, Any], IPv4 | None]]:
    """A private network's ``hosts``, checked as far as they can be before addresses are handed
    out: ``(path, document, explicit address)``."""
    cidr, taken = addresses
    raw_hosts = _list(doc.get("hosts", []) or [], f"{path}.hosts", problems) or []
    host_docs: list[tuple[str, Mapping[str, Any], IPv4 | None]] = []
    for j, raw_host in enumerate(raw_hosts):
        hpath = f"{path}.hosts[{j}]"
        host_doc = _mapping(raw_host, hpath, problems)
        if host_doc is None:
            continue
        _keys(host_doc, hpath, ("name", "address", "routes"), problems)
        _name(host_doc.get("name"), f"{hpath}.name", problems)
        explicit = None
        if "address" in host_doc and cidr is not None:
            explicit = _address(host_doc["address"], f"{hpath}.address", problems)
            explicit = _own_address(explicit, cidr, taken, f"{hpath}.address", problems)
        host_docs.append((hpath, host_doc, explicit))
    return host_docs


def _own_address(
    addr: IPv4 | None, cidr: Net4, taken: set[IPv4], path: str, problems: _Problems
) -> IPv4 | None:
    if addr is None:
        return None
    if not _is_host_of(addr, cidr):
        problems.add(path, f"{addr} must be a host address of {cidr}")
        return None
    if addr in taken:
        problems.add(path, f"{addr} is used twice in {cidr}")
        return None
    taken.add(addr)
    return addr


def _parse_routes(
    raw: Any,
    path: str,
    cidr: Net4,
    by_node: Mapping[str, IPv4],
    gateway: str | None,
    problems: _Problems,
) -> tuple[Route, ...]:
    routes: list[Route] = []
    for k, entry in enumerate(_list(raw or [], path, problems) or []):
        rpath = f"{path}[{k}]"
        to_raw: Any = entry
        via_raw: Any = None
        if isinstance(entry, Mapping):
            _keys(entry, rpath, ("to", "via"), problems)
            to_raw, via_raw = entry.get("to"), entry.get("via")
            if "to" not in entry:
                problems.add(f"{rpath}.to", "required: the destination CIDR")
                continue
            to = _network(to_raw, f"{rpath}.to", problems)
        else:
            to = _network(to_raw, rpath, problems)
        if to is None:
            continue
        if to.overlaps(cidr):
            problems.add(rpath, f"{to} overlaps the host's own network {cidr}")
            continue
        via: IPv4 | None = None
        if via_raw is None:
            if gateway is None:
                problems.add(rpath, "no 'via' and the network has no 'gateway'")
                continue
            via = by_node.get(gateway)
        elif isinstance(via_raw, str) and via_raw in by_node:
            via = by_node[via_raw]
        else:
            candidate = None
            try:
                candidate = ipaddress.ip_address(via_raw) if isinstance(via_raw, str) else None
            except ValueError:
                candidate = None
            if isinstance(candidate, IPv4) and _is_host_of(candidate, cidr):
                via = candidate
            else:
                problems.add(
                    f"{rpath}.via",
                    f"{via_raw!r} is neither a node attached to this network nor an address "
                    f"in {cidr}",
                )
                continue
        if via is not None:
            routes.append(Route(to, via))
    return tuple(routes)


def _check_overlaps(
    sites: list[Site],
    networks: list[PrivateNetwork],
    management: Management | None,
    paths: dict[int, str],
    problems: _Problems,
) -> None:
    claimed: list[tuple[Net4, str]] = []
    if management is not None:
        if management.cidr.overlaps(PUBLIC_SPACE):
            problems.add("management.cidr", f"{management.cidr} overlaps the lab's public space")
        claimed.append((management.cidr, "management.cidr"))
    for site in sites:
        claimed.append((site.lan, f"{paths[id(site)]}.lan"))
    for net in networks:
        claimed.append((net.cidr, f"{paths[id(net)]}.cidr"))
    for site in sites:
        for node in site.nodes:
            if node.pod_cidr is not None:
                path = f"{paths[id(node)]}.podCIDR"
                if node.pod_cidr.overlaps(PUBLIC_SPACE):
                    problems.add(path, f"{node.pod_cidr} overlaps the lab's public space")
                claimed.append((node.pod_cidr, path))
    for a, (net_a, path_a) in enumerate(claimed):
        for net_b, path_b in claimed[:a]:
            if net_a.overlaps(net_b):
                problems.add(path_a, f"{net_a} overlaps {net_b} ({path_b})")
