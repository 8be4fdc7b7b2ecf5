"""Which peers route through a gateway, and a peer's own addresses."""

from __future__ import annotations

import ipaddress

from tests.unit.gateway_fixtures import gateway, net, peer_obj
from wirekube.gateway.clients import own_addresses, select_clients

ROUTES = [net("10.100.0.0/16")]


def addrs(*texts: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return frozenset(ipaddress.ip_address(t) for t in texts)


def test_default_clients_exclude_gateway_peers_and_peers_inside_a_route() -> None:
    gw = gateway(["ec2-a", "ec2-b"], ["10.100.0.0/16"])
    peers = ["ec2-a", "ec2-b", "ec2-c", "hybrid-1", "hybrid-2"]
    addresses = {
        "ec2-c": addrs("10.100.3.7", "54.1.2.3"),  # a non-gateway EC2 node in the VPC: reaches it directly
        "hybrid-1": addrs("172.20.0.5", "203.0.113.9"),
        "hybrid-2": addrs("10.20.0.5"),
    }
    assert select_clients(gw, peers, addresses, ROUTES, "ec2-a") == ("hybrid-1", "hybrid-2")


def test_peer_without_known_addresses_is_a_client() -> None:
    gw = gateway(["a"], ["10.100.0.0/16"])
    assert select_clients(gw, ["a", "x"], {}, ROUTES, "a") == ("x",)


def test_client_refs_are_used_as_given_less_the_active_peer_and_unknown_names() -> None:
    gw = gateway(["a", "b"], ["10.100.0.0/16"], client_refs=["b", "h1", "ghost", "in-vpc"])
    addresses = {"in-vpc": addrs("10.100.0.9")}
    # explicit refs win over the address rule; a standby gateway peer may be a client
    assert select_clients(gw, ["a", "b", "h1", "in-vpc"], addresses, ROUTES, "a") == ("b", "h1", "in-vpc")
    assert select_clients(gw, ["a", "b", "h1", "in-vpc"], addresses, ROUTES, "b") == ("h1", "in-vpc")


def test_ipv6_address_does_not_match_an_ipv4_route() -> None:
    gw = gateway(["a"], ["10.100.0.0/16"])
    assert select_clients(gw, ["a", "v6"], {"v6": addrs("2001:db8::1")}, ROUTES, "a") == ("v6",)


def test_own_addresses_come_from_endpoint_host_endpoints_and_node() -> None:
    obj = peer_obj("h1", endpoint="203.0.113.9:51820", host_endpoints=["172.20.0.5:51820", "junk"])
    node = {
        "metadata": {"name": "h1", "annotations": {"wirekube.io/internal-ip": "172.20.9.9"}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "172.20.0.6"},
            {"type": "ExternalIP", "address": "203.0.113.10"},
            {"type": "Hostname", "address": "h1"},
        ]},
    }
    assert own_addresses(obj, node) == addrs("203.0.113.9", "172.20.0.5", "172.20.0.6", "203.0.113.10", "172.20.9.9")
    assert own_addresses(peer_obj("x"), None) == frozenset()
