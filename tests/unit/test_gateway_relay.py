"""Relay endpoint discovery from Service and Node objects."""

from __future__ import annotations

from typing import Any

from tests.unit.gateway_fixtures import mesh
from wirekube.gateway.relay import MAX_ENDPOINTS, discover_relay, relay_port

MANAGED = mesh()


def service(kind: str, *, ports: list[dict[str, Any]] | None = None, ingress: list[dict[str, str]] | None = None,
            external_ips: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind, "ports": ports or [{"name": "relay", "port": 3478, "protocol": "TCP",
                                                              "nodePort": 31478}]}
    if external_ips:
        spec["externalIPs"] = external_ips
    return {"metadata": {"name": "wirekube-relay", "namespace": "wirekube-system"}, "spec": spec,
            "status": {"loadBalancer": {"ingress": ingress or []}}}


def node(name: str, *addresses: tuple[str, str], ready: str | None = "True") -> dict[str, Any]:
    status: dict[str, Any] = {"addresses": [{"type": t, "address": a} for t, a in addresses]}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    return {"metadata": {"name": name}, "status": status}


def endpoints(svc: dict[str, Any] | None, nodes: list[dict[str, Any]] = [], m: Any = MANAGED) -> list[str]:  # noqa: B006
    return [str(e) for e in discover_relay(m, svc, nodes, "wirekube-system", "wirekube-relay").endpoints]


def test_load_balancer_ip_and_hostname() -> None:
    svc = service("LoadBalancer", ingress=[{"hostname": "relay-123.elb.us-west-2.amazonaws.com"}, {"ip": "52.1.2.3"}])
    d = discover_relay(MANAGED, svc, [], "wirekube-system", "wirekube-relay")
    assert [str(e) for e in d.endpoints] == ["relay-123.elb.us-west-2.amazonaws.com:3478", "52.1.2.3:3478"]
    assert (d.reason, d.source) == ("LoadBalancer", "LoadBalancer wirekube-system/wirekube-relay")


def test_load_balancer_without_ingress_is_pending_and_publishes_nothing() -> None:
    d = discover_relay(MANAGED, service("LoadBalancer"), [node("n", ("ExternalIP", "1.2.3.4"))], "ns", "svc")
    assert d.endpoints == () and d.reason == "LoadBalancerPending" and not d.ready


def test_node_port_prefers_external_ips_and_skips_unready_nodes() -> None:
    nodes = [
        node("b-int", ("InternalIP", "10.0.0.2")),
        node("a-int", ("InternalIP", "10.0.0.1")),
        node("z-ext", ("InternalIP", "10.0.0.3"), ("ExternalIP", "198.51.100.3")),
        node("down", ("ExternalIP", "198.51.100.9"), ready="False"),
        node("noaddr"),
        node("nocond", ("InternalIP", "10.0.0.4"), ready=None),
    ]
    assert endpoints(service("NodePort"), nodes) == ["198.51.100.3:31478", "10.0.0.1:31478", "10.0.0.2:31478",
                                                     "10.0.0.4:31478"]


def test_node_port_list_is_capped() -> None:
    nodes = [node(f"n{i:02}", ("InternalIP", f"10.0.0.{i}")) for i in range(1, 40)]
    assert len(endpoints(service("NodePort"), nodes)) == MAX_ENDPOINTS


def test_external_ips_are_published_for_any_type() -> None:
    assert endpoints(service("ClusterIP", external_ips=["192.0.2.7"])) == ["192.0.2.7:3478"]
    assert endpoints(service("LoadBalancer", external_ips=["192.0.2.7"])) == ["192.0.2.7:3478"]


def test_cluster_ip_only_is_not_exposed() -> None:
    d = discover_relay(MANAGED, service("ClusterIP"), [], "ns", "svc")
    assert d.reason == "ServiceNotExposed" and d.endpoints == ()


def test_missing_service() -> None:
    d = discover_relay(MANAGED, None, [], "wirekube-system", "wirekube-relay")
    assert d.reason == "ServiceNotFound" and "wirekube-system/wirekube-relay" in d.message


def test_external_provider_publishes_its_endpoint() -> None:
    m = mesh(relay={"provider": "external", "external": {"endpoint": "relay.example.com:443"}})
    assert endpoints(None, m=m) == ["relay.example.com:443"]


def test_port_choice_by_name_then_managed_port_then_first_tcp() -> None:
    named = service("LoadBalancer", ports=[{"name": "metrics", "port": 9090}, {"name": "relay", "port": 4000}])
    assert relay_port(named, 3478)["port"] == 4000
    by_port = service("LoadBalancer", ports=[{"name": "stun", "port": 3478, "protocol": "UDP"},
                                              {"name": "a", "port": 9090}, {"name": "b", "port": 3478}])
    assert relay_port(by_port, 3478)["name"] == "b"
    assert relay_port(service("NodePort", ports=[{"port": 3478, "protocol": "UDP"}]), 3478) is None


def test_ipv6_ingress_is_bracketed() -> None:
    assert endpoints(service("LoadBalancer", ingress=[{"ip": "2001:db8::5"}])) == ["[2001:db8::5]:3478"]
