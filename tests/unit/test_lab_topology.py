"""The lab topology model, its validation messages, the network plan and the NAT rule sets."""

from __future__ import annotations

import copy
import ipaddress
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from wirekube.lab import nat
from wirekube.lab.plan import IFNAMSIZ, check_lab_name, plan_lab
from wirekube.lab.topology import (
    BUILTIN_TOPOLOGIES,
    NatKind,
    TopologyError,
    builtin_topology,
    default_topology,
    parse_topology,
    parse_topology_yaml,
)

MINIMAL: dict[str, Any] = {
    "sites": [
        {"name": "cloud", "nat": "none", "nodes": [{"name": "ec2-a"}, {"name": "ec2-b"}]},
        {"name": "home", "nat": "port-restricted-cone", "nodes": [{"name": "home-1"}]},
    ],
    "networks": [
        {"name": "vpc", "cidr": "10.100.0.0/24", "nodes": ["ec2-a"], "gateway": "ec2-a",
         "hosts": [{"name": "vpc-host", "routes": ["192.168.2.0/24"]}]},
    ],
}


def problems_of(doc: Any) -> dict[str, str]:
    """Every problem's message by path (several messages for one path joined by " | ")."""
    with pytest.raises(TopologyError, match=r"^topology: \d+ problems?:\n") as info:
        parse_topology(doc)
    out: dict[str, str] = {}
    for path, message in info.value.problems:
        out[path] = f"{out[path]} | {message}" if path in out else message
    return out


def mutated(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL with the value at a dotted path (``sites.0.nat``) replaced (deleted if ``...``)."""
    doc = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    target: Any = doc
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    key: Any = int(last) if last.isdigit() else last
    if value is ...:
        del target[key]
    else:
        target[key] = value
    return doc


# ---------------------------------------------------------------- the built-in topologies


def test_default_topology_mirrors_the_eks_hybrid_picture_with_every_nat_kind() -> None:
    topology = default_topology()
    kinds = Counter(site.nat for site in topology.sites)
    assert kinds == {NatKind.NONE: 1, NatKind.PORT_RESTRICTED_CONE: 1, NatKind.FULL_CONE: 1,
                     NatKind.SYMMETRIC: 2, NatKind.UDP_BLOCKED: 1}
    nodes_per_kind = Counter(site.nat for site, _ in topology.nodes())
    assert nodes_per_kind[NatKind.NONE] == 2  # two "EC2" nodes
    assert nodes_per_kind[NatKind.PORT_RESTRICTED_CONE] == 2  # two behind one NAT
    assert nodes_per_kind[NatKind.FULL_CONE] == 1
    assert nodes_per_kind[NatKind.UDP_BLOCKED] == 1
    (vpc,) = topology.networks
    cloud = next(s for s in topology.sites if s.nat is NatKind.NONE)
    assert {a.node for a in vpc.attachments} == {n.name for n in cloud.nodes}
    assert vpc.gateway in {n.name for n in cloud.nodes}
    (host,) = vpc.hosts
    gateway_address = next(a.address for a in vpc.attachments if a.node == vpc.gateway)
    routed = {r.to for r in host.routes}
    hybrid_lans = {s.lan for s in topology.sites if s.nat is not NatKind.NONE}
    (hybrid_pods,) = routed - hybrid_lans  # one more route: the hybrid pod CIDRs' supernet
    assert hybrid_lans < routed
    assert all(n.pod_cidr is not None and n.pod_cidr.subnet_of(hybrid_pods)
               for s, n in topology.nodes() if s.nat is not NatKind.NONE)
    assert all(r.via == gateway_address for r in host.routes)
    assert len(topology.internet.stun) >= 2
    assert len({s.host for s in topology.internet.stun}) >= 2  # two STUN addresses


def test_eks_hybrid_topology_has_pods_behind_every_node_and_two_onprem_subnets() -> None:
    topology = builtin_topology("eks-hybrid")
    assert all(node.pods >= 1 and node.pod_cidr for _, node in topology.nodes())
    onprem = [s for s in topology.sites if s.nat is not NatKind.NONE]
    assert len(onprem) == 2 and onprem[0].lan != onprem[1].lan
    (vpc,) = topology.networks
    assert len(vpc.attachments) == 2 and vpc.gateway == "ec2-a"
    (host,) = vpc.hosts
    assert {str(r.to) for r in host.routes} >= {str(s.lan) for s in onprem}


@pytest.mark.parametrize("name", sorted(BUILTIN_TOPOLOGIES))
def test_builtin_topologies_round_trip_through_yaml(name: str) -> None:
    topology = builtin_topology(name)
    assert parse_topology_yaml(topology.to_yaml()) == topology
    assert parse_topology(yaml.safe_load(yaml.safe_dump(topology.to_dict()))) == topology


def test_unknown_builtin_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="no built-in topology 'nope'"):
        builtin_topology("nope")


# ---------------------------------------------------------------- defaults


def test_defaults_fill_every_address() -> None:
    topology = parse_topology(MINIMAL)
    cloud, home = topology.sites
    assert str(cloud.lan) == "198.19.1.0/24" and str(home.lan) == "192.168.2.0/24"
    assert [str(n.address) for n in cloud.nodes] == ["198.19.1.10", "198.19.1.11"]
    assert str(home.gateway) == "192.168.2.1"
    assert [str(s) for s in topology.internet.stun] == ["198.18.0.2:3478", "198.18.0.3:3478"]
    assert str(topology.internet.relay) == "198.18.0.2:3478"
    assert str(topology.management.api_address) == "10.254.0.1"
    (vpc,) = topology.networks
    assert str(vpc.attachments[0].address) == "10.100.0.10"
    assert str(vpc.hosts[0].address) == "10.100.0.11"
    assert str(vpc.hosts[0].routes[0].via) == "10.100.0.10"


def test_explicit_addresses_are_kept_and_never_reused() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["sites"][0]["nodes"][1]["address"] = "198.19.1.10"
    topology = parse_topology(doc)
    assert [str(n.address) for n in topology.sites[0].nodes] == ["198.19.1.11", "198.19.1.10"]


# ---------------------------------------------------------------- every mistake is named

MISTAKES = [
    ("sites", ..., "sites", "required"),
    ("sites", [], "sites", "at least one site"),
    ("sites", "x", "sites", "must be a list"),
    ("sites.0.name", "Cloud_1", "sites[0].name", "not a valid name"),
    ("sites.0.name", "a" * 41, "sites[0].name", "at most 40"),
    ("sites.0.nat", "cone", "sites[0].nat", "'cone' is not one of none, port-restricted-cone"),
    ("sites.0.nat", ..., "sites[0].nat", "required"),
    ("sites.0.natt", "none", "sites[0].natt", "did you mean 'nat'"),
    ("sites.0.lan", "10.0.0.0/24", "sites[0].lan", "nat: none has a public LAN"),
    ("sites.1.lan", "198.18.9.0/24", "sites[1].lan", "overlaps the lab's public space"),
    ("sites.1.lan", "192.168.2.1/24", "sites[1].lan", "has host bits set"),
    ("sites.1.lan", "192.168.2.0/30", "sites[1].lan", "too small"),
    ("sites.1.lan", "fd00::/64", "sites[1].lan", "only IPv4"),
    ("sites.1.nodes", [], "sites[1].nodes", "at least one node"),
    ("sites.1.nodes.0.name", "ec2-a", "sites[1].nodes[0].name", "already taken by sites[0]"),
    ("sites.1.name", "cloud", "sites[1].name", "already defined at sites[0].name"),
    ("sites.1.nodes.0.address", "192.168.2.1", "sites[1].nodes[0].address", "other than the router"),
    ("sites.1.nodes.0.address", "10.9.9.9", "sites[1].nodes[0].address", "host address of the LAN"),
    ("sites.1.nodes.0.address", "banana", "sites[1].nodes[0].address", "not a valid IP"),
    ("sites.1.nodes.0.pods", 2, "sites[1].nodes[0].pods", "need a podCIDR"),
    ("sites.1.nodes.0.pods", -1, "sites[1].nodes[0].pods", "whole number from 0 to 16"),
    ("sites.1.nodes.0.podCIDR", "10.100.0.0/25", "sites[1].nodes[0].podCIDR",
     "overlaps 10.100.0.0/24 (networks[0].cidr)"),
    ("sites.1.nodes.0.podCIDR", "10.254.0.0/24", "sites[1].nodes[0].podCIDR",
     "overlaps 10.254.0.0/24 (management.cidr)"),
    ("sites.1.nodes.0.nmae", "x", "sites[1].nodes[0].nmae", "did you mean 'name'"),
    ("internet.stun", ["198.18.0.2"], "internet.stun", "at least two STUN endpoints"),
    ("internet.stun", ["198.18.0.2", "198.18.0.2:3478"], "internet.stun[1]", "listed twice"),
    ("internet.stun", ["198.18.0.2", "8.8.8.8"], "internet.stun[1]", "in the internet's 198.18.0.0/24"),
    ("internet.relay", "198.18.0.2:99999", "internet.relay", "port must be a number"),
    ("internet", [], "internet", "must be a mapping"),
    ("management.cidr", "198.18.0.0/24", "management.cidr", "overlaps the lab's public space"),
    ("management.cidr", "10.254.0.0/29", "management.cidr", "too small for 3 nodes"),
    ("networks.0.cidr", "192.168.2.0/25", "networks[0].cidr", "overlaps 192.168.2.0/24 (sites[1].lan)"),
    ("networks.0.cidr", ..., "networks[0].cidr", "required"),
    ("networks.0.nodes", ["ghost"], "networks[0].nodes[0]", "'ghost' is not a node of any site"),
    ("networks.0.nodes", ["ec2-a", "ec2-a"], "networks[0].nodes[1]", "attached twice"),
    ("networks.0.gateway", "ec2-b", "networks[0].gateway", "not one of this network's nodes"),
    ("networks.0.hosts.0.name", "ec2-b", "networks[0].hosts[0].name", "already taken"),
    ("networks.0.hosts.0.address", "10.100.1.5", "networks[0].hosts[0].address",
     "host address of 10.100.0.0/24"),
    ("networks.0.hosts.0.routes", [{"to": "10.0.0.0/8"}], "networks[0].hosts[0].routes[0]",
     "overlaps the host's own network"),
    ("networks.0.hosts.0.routes", [{"to": "172.16.0.0/12", "via": "home-1"}],
     "networks[0].hosts[0].routes[0].via", "neither a node attached to this network"),
    ("networks.0.hosts.0.routes", [{"via": "ec2-a"}], "networks[0].hosts[0].routes[0].to", "required"),
]


@pytest.mark.parametrize(("path", "value", "where", "message"), MISTAKES,
                         ids=[f"{m[0]}={m[1]!r}"[:60] for m in MISTAKES])
def test_each_mistake_is_reported_at_its_path(path: str, value: Any, where: str, message: str) -> None:
    problems = problems_of(mutated(path, value))
    assert where in problems, problems
    assert message in problems[where], problems


def test_every_mistake_is_reported_at_once_with_the_source() -> None:
    doc = mutated("sites.0.nat", "cone")
    doc["sites"][1]["nodes"][0]["pods"] = 2
    doc["networks"][0]["gateway"] = "nobody"
    with pytest.raises(TopologyError, match=r"^lab\.yaml: \d+ problems:\n") as info:
        parse_topology(doc, source="lab.yaml")
    paths = [path for path, _ in info.value.problems]
    assert {"sites[0].nat", "sites[1].nodes[0].pods", "networks[0].gateway"} <= set(paths)
    text = str(info.value)
    assert text.startswith("lab.yaml: ") and "sites[0].nat: 'cone'" in text


def test_paths_keep_document_indices_when_an_earlier_entry_is_broken() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["sites"].insert(0, {"name": "BAD", "nat": "none", "nodes": [{"name": "x"}]})
    doc["sites"][2]["nodes"].append({"name": "home-1"})
    problems = problems_of(doc)
    assert "sites[0].name" in problems
    assert "already taken by sites[2].nodes[0].name" in problems["sites[2].nodes[1].name"]


@pytest.mark.parametrize(("text", "says"), [("sites: [", "not valid YAML"),
                                            ("42", "must be a mapping, got int"),
                                            ("", "the document is empty"),
                                            ("- a\n- b", "must be a mapping, got a list")])
def test_documents_that_are_not_topologies(text: str, says: str) -> None:
    with pytest.raises(TopologyError, match=f"^t\\.yaml: 1 problem:\n  {says}"):
        parse_topology_yaml(text, "t.yaml")


def test_names_of_exec_targets_must_be_unique() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["sites"][1]["nodes"][0]["name"] = "cloud-router"
    assert "router of site 'cloud'" in problems_of(doc)["sites[1].nodes[0].name"]
    doc = mutated("sites.1.nodes.0.name", "internet")
    assert "internet segment" in problems_of(doc)["sites[1].nodes[0].name"]


# ---------------------------------------------------------------- the plan


def _check_plan_invariants(lab: str, topology: Any) -> None:
    plan = plan_lab(topology, lab)
    netns = [n.netns for n in plan.namespaces]
    assert len(set(netns)) == len(netns)
    assert all(n.startswith(f"wkl-{lab}.") for n in netns)
    names_in: dict[str, set[str]] = {n: {"lo"} for n in netns}
    for veth in plan.veths:
        for ns_name, dev in ((veth.netns_a, veth.ifname_a), (veth.netns_b, veth.ifname_b)):
            assert ns_name in names_in, ns_name
            assert len(dev) <= IFNAMSIZ
            assert dev not in names_in[ns_name], (ns_name, dev)
            names_in[ns_name].add(dev)
    for namespace in plan.namespaces:
        for line in namespace.links:
            if line.startswith("link add name "):
                dev = line.split()[3]
                assert len(dev) <= IFNAMSIZ and dev not in names_in[namespace.netns]
                names_in[namespace.netns].add(dev)
    addresses = [n.lan_ip for n in plan.nodes.values()] + [n.mgmt_ip for n in plan.nodes.values()]
    addresses += [r.wan_ip for r in plan.routers.values()]
    assert len(set(addresses)) == len(addresses)
    assert set(plan.targets) >= set(plan.nodes) | {"internet"} | {r.name for r in plan.routers.values()}
    for info in plan.nodes.values():
        router = plan.routers[info.site]
        assert info.public_ip == (info.lan_ip if info.nat is NatKind.NONE else router.wan_ip)
        assert info.mgmt_ip in topology.management.cidr


@pytest.mark.parametrize("name", sorted(BUILTIN_TOPOLOGIES))
def test_plan_of_builtin_topologies(name: str) -> None:
    _check_plan_invariants("default", builtin_topology(name))


def test_plan_addresses_of_the_default_topology() -> None:
    plan = plan_lab(default_topology(), "t1")
    prc1 = plan.nodes["prc-1"]
    assert (str(prc1.lan_ip), str(prc1.public_ip), str(prc1.mgmt_ip)) == (
        "192.168.2.10", "198.18.2.2", "10.254.0.12")
    assert prc1.netns == "wkl-t1.prc-1" and plan.netns("prc-router") == "wkl-t1.prc-router"
    assert str(plan.nodes["ec2-a"].private["vpc"]) == "10.100.0.10"
    assert plan.nodes["ec2-a"].interfaces["vpc"] == "eth1"
    assert str(plan.hosts["vpc-host"].address) == "10.100.0.100"
    internet = plan.namespaces[0]
    assert internet.key == "internet" and not any("default" in r for r in internet.routes)
    with pytest.raises(KeyError, match="no 'nope' in lab 't1'"):
        plan.netns("nope")


def test_pods_get_addresses_from_the_pod_cidr() -> None:
    plan = plan_lab(builtin_topology("eks-hybrid"), "t1")
    pod = plan.pods["hybrid-a2.pod0"]
    assert str(pod.address) == "10.200.0.130" and pod.netns == "wkl-t1.hybrid-a2.pod0"
    node_ns = next(n for n in plan.namespaces if n.key == "hybrid-a2")
    assert ("net.ipv4.ip_forward", "1") in node_ns.sysctls


def test_two_labs_never_share_a_namespace() -> None:
    a = {n.netns for n in plan_lab(default_topology(), "a").namespaces}
    ab = {n.netns for n in plan_lab(default_topology(), "a-b").namespaces}
    assert not a & ab
    assert not any(n.startswith("wkl-a.") for n in ab)


@pytest.mark.parametrize("name", ["", "A", "a.b", "-a", "a" * 25, "a_b"])
def test_bad_lab_names(name: str) -> None:
    with pytest.raises(ValueError, match="lab name"):
        check_lab_name(name)


_kinds = st.sampled_from([k.value for k in NatKind])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_kinds, st.integers(1, 3), st.integers(3, 33)), min_size=1, max_size=8),
       st.sampled_from(["x", "lab-with-a-long-name-24c"]))
def test_plan_invariants_hold_for_any_topology(sites: list[tuple[str, int, int]], lab: str) -> None:
    doc = {"sites": [
        {"name": f"site{i}-" + "s" * length, "nat": kind,
         "nodes": [{"name": f"n{i}-{j}-" + "n" * length} for j in range(count)]}
        for i, (kind, count, length) in enumerate(sites)
    ]}
    _check_plan_invariants(lab, parse_topology(doc))


# ---------------------------------------------------------------- NAT rule sets


def test_a_router_without_nat_only_routes() -> None:
    rules = nat.router_ruleset(NatKind.NONE)
    assert "masquerade" not in rules and "drop" not in rules
    assert "chain impair" in rules


def test_cut_rules() -> None:
    assert nat.cut_rules("udp", None) == (
        'add rule ip wklab impair oifname "wan" meta l4proto udp counter drop\n'
        'add rule ip wklab impair iifname "wan" meta l4proto udp counter drop\n')
    assert nat.cut_rules("all", "198.18.4.2") == (
        "add rule ip wklab impair ip daddr 198.18.4.2 counter drop\n"
        "add rule ip wklab impair ip saddr 198.18.4.2 counter drop\n")
    with pytest.raises(ValueError, match="protocol 'sctp'"):
        nat.cut_rules("sctp", None)


@pytest.mark.parametrize("kind", [k for k in NatKind if k is not NatKind.NONE])
def test_every_nat_drops_unsolicited_inbound_in_input_and_forward(kind: NatKind) -> None:
    rules = nat.router_ruleset(kind, proxy=("198.18.0.9", 3128) if kind is NatKind.PROXY_ONLY else None)
    assert "\n" in rules  # multi-line for `nft -f -`
    for hook in ("hook input priority filter;", "hook forward priority filter;"):
        chain = rules.split(hook, 1)[1].split("}", 1)[0]
        established = chain.index('iifname "wan" ct state established,related accept')
        assert established < chain.index('iifname "wan" counter name "unsolicited" drop')
    assert ("fully-random" in rules) is (kind is NatKind.SYMMETRIC)
    assert ("@fullcone" in rules) is (kind is NatKind.FULL_CONE)
    assert ("l4proto udp counter name \"udp_blocked\" drop" in rules) is (kind is NatKind.UDP_BLOCKED)
    assert "fwd" not in rules.split()  # a reserved word in nft 1.0.6
    assert ('counter name "blocked" drop' in rules) is (kind is NatKind.PROXY_ONLY)


def test_a_proxy_only_router_lets_out_only_tcp_to_the_proxy() -> None:
    rules = nat.router_ruleset(NatKind.PROXY_ONLY, proxy=("198.18.0.9", 3128))
    chain = rules.split("hook forward priority filter;", 1)[1].split("}", 1)[0]
    allow = chain.index('oifname "wan" ip daddr 198.18.0.9 tcp dport 3128 accept')
    assert allow < chain.index('oifname "wan" counter name "blocked" drop')
    with pytest.raises(ValueError, match="proxy-only router needs the proxy"):
        nat.router_ruleset(NatKind.PROXY_ONLY)
    with pytest.raises(ValueError, match="proxy-only router needs the proxy"):
        nat.router_ruleset(NatKind.UDP_BLOCKED, proxy=("198.18.0.9", 3128))


def test_a_proxy_only_site_gets_the_default_proxy_and_round_trips() -> None:
    topo = parse_topology_yaml("sites: [{name: corp, nat: proxy-only, nodes: [{name: c1}]}]")
    assert str(topo.internet.proxy) == "198.18.0.9:3128"
    assert ipaddress.ip_address("198.18.0.9") in topo.internet.addresses
    assert parse_topology_yaml(topo.to_yaml()) == topo
    plain = parse_topology_yaml("sites: [{name: s, nat: none, nodes: [{name: n1}]}]")
    assert plain.internet.proxy is None and "proxy" not in plain.to_dict()["internet"]
    with pytest.raises(TopologyError, match=r"internet.proxy: 198.18.0.2 is already the relay's"):
        parse_topology_yaml("internet: {relay: 198.18.0.2:3478, stun: [198.18.0.2:3478, 198.18.0.3:3478], "
                            "proxy: 198.18.0.2:3128}\nsites: [{name: s, nat: none, nodes: [{name: n1}]}]")
