"""The lab's relay replicas behind one load-balancer address: topology and the nftables "NLB"."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from wirekube.lab.plan import plan_lab, relay_load_balancer_nft
from wirekube.lab.topology import TopologyError, builtin_topology, parse_topology

SITES = [{"name": "a", "nat": "none", "nodes": [{"name": "n1"}]}]


def topo(internet: dict[str, Any]) -> Any:
    return parse_topology({"internet": internet, "sites": SITES})


@pytest.mark.parametrize("name", ["default", "eks-hybrid"])
def test_the_built_in_topologies_put_two_replicas_behind_one_address(name: str) -> None:
    internet = builtin_topology(name).internet
    assert str(internet.relay) == "198.18.0.2:3478"
    assert [str(a) for a in internet.relay_replicas] == ["198.18.0.20", "198.18.0.21"]


def test_replicas_as_a_count_or_a_list_round_trip() -> None:
    by_count = topo({"relay": {"address": "198.18.0.2:3478", "replicas": 3}})
    assert [str(a) for a in by_count.internet.relay_replicas] == ["198.18.0.20", "198.18.0.21", "198.18.0.22"]
    by_list = topo({"relay": {"address": "198.18.0.9:4000", "replicas": ["198.18.0.40", "198.18.0.41"]}})
    assert by_list.internet.relay.port == 4000
    assert parse_topology(by_list.to_dict()) == by_list
    single = topo({"relay": "198.18.0.2:3478"})
    assert single.internet.relay_replicas == () and single.to_dict()["internet"]["relay"] == "198.18.0.2:3478"


@pytest.mark.parametrize(("relay", "message"), [
    ({"address": "198.18.0.2:3478", "replicas": 0}, "internet.relay.replicas: must be from 1 to 8, not 0"),
    ({"address": "198.18.0.2:3478", "replicas": True}, "internet.relay.replicas: must be a count or a list"),
    ({"address": "198.18.0.2:3478", "replicas": ["10.1.1.1"]}, "internet.relay.replicas[0]: 10.1.1.1 must be a host"),
    ({"address": "198.18.0.2:3478", "replicas": ["198.18.0.2"]}, "198.18.0.2 is the load balancer's own address"),
    ({"address": "198.18.0.2:3478", "replicas": ["198.18.0.3"]}, "198.18.0.3 is also a STUN server's address"),
    ({"address": "198.18.0.2:3478", "replicas": ["198.18.0.30", "198.18.0.30"]}, "198.18.0.30 is listed twice"),
    ({"address": "198.18.0.2:3478", "replicas": 2, "mode": "x"}, "internet.relay.mode: unknown key"),
])
def test_bad_replicas_are_named_by_path(relay: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError, match=re.escape(message)) as err:
        topo({"relay": relay})
    assert message in str(err.value)


def test_the_load_balancer_picks_a_replica_per_connection_for_tcp_and_stun_and_probes_leave_from_its_address() -> None:
    topology = builtin_topology("default")
    rules = relay_load_balancer_nft(topology)
    assert rules is not None
    pick = "numgen random mod 2 map { 0 : 198.18.0.20, 1 : 198.18.0.21 }"
    assert rules.count(f"ip daddr 198.18.0.2 tcp dport 3478 dnat to {pick}") == 2  # from the sites and locally
    assert rules.count(f"ip daddr 198.18.0.2 udp dport 3478 dnat to {pick}") == 2
    assert "ip saddr { 198.18.0.20, 198.18.0.21 } meta l4proto udp snat to 198.18.0.2" in rules
    internet = next(n for n in plan_lab(topology, "t").namespaces if n.role == "internet")
    assert internet.nft == rules
    addresses = {ipaddress.ip_address(line.split()[2].split("/")[0]) for line in internet.links if "addr add" in line}
    assert {ipaddress.ip_address("198.18.0.20"), ipaddress.ip_address("198.18.0.21")} <= addresses
    assert relay_load_balancer_nft(topo({"relay": "198.18.0.2:3478"})) is None
