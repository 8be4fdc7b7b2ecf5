from __future__ import annotations

import copy
import ipaddress
import re
from typing import Any

import pytest

from tests.fixtures.keys import public_key
from wirekube import models
from wirekube.errors import InvalidObject

KEY = public_key()


def peer(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"publicKey": KEY, "allowedIPs": ["10.255.0.7/32"], "endpoint": "192.0.2.1:51820"}
    base.update(spec)
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer", "metadata": {"name": "node-a"}, "spec": base}


def test_peer_round_trip() -> None:
    obj = peer(allowedIPs=["10.255.0.7/32", "10.200.1.0/24"], persistentKeepalive=5)
    obj["status"] = {"connected": True, "natType": "symmetric", "transportMode": "mixed",
                     "peerTransports": {"b": "relay", "a": "direct"}}
    p = models.peer_from_cr(obj)
    assert p.mesh_ip == ipaddress.IPv4Address("10.255.0.7")
    assert p.spec.endpoint == models.Endpoint(ipaddress.ip_address("192.0.2.1"), 51820)
    assert p.status.nat_type is models.NatType.SYMMETRIC
    again = models.peer_from_cr(models.peer_to_cr(p))
    assert again.spec == p.spec and again.status == p.status


def test_peer_defaults() -> None:
    p = models.peer_from_cr(peer(endpoint=None, allowedIPs=None))
    assert p.spec.endpoint is None and p.spec.allowed_ips == () and p.spec.persistent_keepalive == 25
    assert p.mesh_ip is None and p.status == models.PeerStatus()


BAD_PEERS = [
    ({"publicKey": "short"}, "spec.publicKey"),
    ({"publicKey": "!" * 43 + "="}, "spec.publicKey"),
    ({"publicKey": KEY[:-2] + "B="}, "spec.publicKey"),  # non-canonical last character
    ({"publicKey": None}, "spec.publicKey"),
    ({"publicKey": 42}, "spec.publicKey"),
    ({"endpoint": "1.2.3.4"}, "spec.endpoint"),
    ({"endpoint": "1.2.3.4:0"}, "spec.endpoint"),
    ({"endpoint": "1.2.3.4:70000"}, "spec.endpoint"),
    ({"endpoint": "host.example:51820"}, "spec.endpoint"),
    ({"allowedIPs": "10.0.0.0/8"}, "spec.allowedIPs"),
    ({"allowedIPs": ["10.255.0.7/32", "10.0.0.1/24"]}, "spec.allowedIPs[1]"),
    ({"allowedIPs": ["garbage"]}, "spec.allowedIPs[0]"),
    ({"allowedIPs": ["0.0.0.0/0"]}, "spec.allowedIPs[0]"),
    ({"allowedIPs": ["::/0"]}, "spec.allowedIPs[0]"),
    ({"persistentKeepalive": -1}, "spec.persistentKeepalive"),
    ({"persistentKeepalive": "25"}, "spec.persistentKeepalive"),
    ({"persistentKeepalive": True}, "spec.persistentKeepalive"),
]


@pytest.mark.parametrize(("change", "field"), BAD_PEERS)
def test_bad_peer_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject, match=re.escape(f"{field}: ")) as err:
        models.peer_from_cr(peer(**change))
    assert err.value.field == field
    assert str(err.value).startswith(f"WireKubePeer/node-a: {field}: ")


@pytest.mark.parametrize(
    ("status", "field"),
    [({"natType": "weird"}, "status.natType"), ({"connected": "yes"}, "status.connected"),
     ({"peerTransports": {"b": "carrier-pigeon"}}, "status.peerTransports.b"),
     ({"peerTransports": []}, "status.peerTransports"),
     ({"conditions": [{"status": "True"}]}, "status.conditions[0].type"),
     ({"conditions": {"type": "X"}}, "status.conditions"),
     ({"engine": 3}, "status.engine"),
     ({"observedEndpoints": {"b": "198.51.100.7"}}, "status.observedEndpoints.b"),
     ({"birthday": {"b": {"notBefore": "2025-01-01T00:00:00Z"}}}, "status.birthday.b.round"),
     ({"birthday": {"b": {"round": 0, "notBefore": "2025-01-01T00:00:00Z"}}}, "status.birthday.b.round"),
     ({"birthday": {"b": {"round": 1, "notBefore": "tomorrow"}}}, "status.birthday.b.notBefore"),
     ({"birthday": {"b": {"round": 1, "notBefore": "2025-01-01T00:00:00Z", "portMin": 20100, "portMax": 20000}}},
      "status.birthday.b.portMax"),
     ({"birthday": {"b": {"round": 1, "notBefore": "2025-01-01T00:00:00Z", "portMax": 70000}}},
      "status.birthday.b.portMax"),
     ({"birthday": {f"p{i}": {"round": 1, "notBefore": "2025-01-01T00:00:00Z"} for i in range(65)}},
      "status.birthday")],
)
def test_bad_peer_status_names_the_field(status: dict[str, Any], field: str) -> None:
    obj = peer()
    obj["status"] = status
    with pytest.raises(InvalidObject, match=re.escape(f"{field}: ")) as err:
        models.peer_from_cr(obj)
    assert err.value.field == field


def test_engine_and_conditions_round_trip() -> None:
    cond = {"type": "RelayProxyEPERM", "status": "True", "reason": "SendEPERM", "message": "m",
            "lastTransitionTime": "2026-11-27T00:00:00Z"}
    obj = peer()
    obj["status"] = {"engine": "userspace (no wireguard kernel module)", "conditions": [cond]}
    status = models.peer_from_cr(obj).status
    assert status.engine.startswith("userspace")
    assert models.peer_status_to_cr(status)["conditions"] == [cond]
    # An agent that clears its last condition must say so: the list is written even when empty.
    assert models.peer_status_to_cr(models.PeerStatus())["conditions"] == []


def test_reflection_and_birthday_status_round_trip() -> None:
    obj = peer()
    obj["status"] = {"endpointDiscoveryMethod": "reflection",
                     "observedEndpoints": {"b": "198.51.100.7:40001"},
                     "birthday": {"b": {"round": 3, "notBefore": "2025-01-01T00:00:05.250Z",
                                        "portMin": 20000, "portMax": 20255}}}
    status = models.peer_from_cr(obj).status
    assert status.observed_endpoints == {"b": "198.51.100.7:40001"}
    assert status.birthday == {"b": models.BirthdayRound(3, "2025-01-01T00:00:05.250Z", 20000, 20255)}
    out = models.peer_status_to_cr(status)
    assert out["birthday"] == obj["status"]["birthday"] and out["observedEndpoints"] == {"b": "198.51.100.7:40001"}
    assert models.peer_from_cr({**obj, "status": out}).status == status
    empty = models.peer_status_to_cr(models.PeerStatus())
    assert empty["birthday"] == {} and empty["observedEndpoints"] == {}
    assert models.EndpointDiscovery("reflection") is models.EndpointDiscovery.REFLECTION


def test_crd_mirrors_reflection_and_birthday_limits() -> None:
    from pathlib import Path

    import yaml

    crd_file = Path(__file__).parents[2] / "charts/wirekube/crds/wirekube.io_wirekubepeers.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert "reflection" in status["endpointDiscoveryMethod"]["enum"]
    assert status["birthday"]["maxProperties"] == models.MAX_BIRTHDAY_ROUNDS
    entry = status["birthday"]["additionalProperties"]
    assert entry["required"] == ["round", "notBefore"] and entry["properties"]["round"]["minimum"] == 1
    assert entry["properties"]["notBefore"]["maxLength"] <= 40
    assert status["observedEndpoints"]["additionalProperties"]["maxLength"] == 53


def test_missing_name_and_non_object_spec() -> None:
    with pytest.raises(InvalidObject, match=r"metadata.name: required") as err:
        models.peer_from_cr({"kind": "WireKubePeer", "spec": {"publicKey": KEY}})
    assert err.value.field == "metadata.name"
    obj = peer()
    obj["spec"] = ["not", "a", "map"]
    with pytest.raises(InvalidObject, match="spec: must be an object, got list") as err:
        models.peer_from_cr(obj)
    assert err.value.field == "spec"


def mesh(**spec: Any) -> dict[str, Any]:
    return {"kind": "WireKubeMesh", "metadata": {"name": "default"}, "spec": spec}


def test_mesh_defaults_match_the_crd() -> None:
    m = models.mesh_from_cr(mesh())
    assert m.spec == models.MeshSpec()
    assert m.spec.listen_port == 51820 and m.spec.interface_name == "wire_kube" and m.spec.mtu == 1420
    assert m.spec.relay.mode is models.RelayMode.AUTO and m.spec.relay.handshake_timeout_seconds == 30


def test_mesh_full() -> None:
    m = models.mesh_from_cr(
        mesh(
            meshCIDR="100.96.0.0/12", listenPort=51822, stunServers=["relay.wirekube:3478", "198.51.100.1:3479"],
            relay={"mode": "always", "provider": "external", "external": {"endpoint": "relay.example.com:3478"}},
            routing={"excludeCIDRs": ["10.100.0.0/16"], "allowDefaultRoute": True},
            natTraversal={"birthdayAttack": "enabled"}, podCIDRSync="cilium", engine="userspace",
        )
    )
    assert m.spec.relay.external_endpoint == models.HostPort("relay.example.com", 3478)
    assert m.spec.stun_servers[1] == models.HostPort("198.51.100.1", 3479)
    assert m.spec.pod_cidr_sync is models.PodCIDRSync.CILIUM and m.spec.routing.allow_default_route


BAD_MESHES = [
    ({"meshCIDR": "10.0.0.0/31"}, "spec.meshCIDR"),
    ({"meshCIDR": "fd00::/64"}, "spec.meshCIDR"),
    ({"listenPort": 0}, "spec.listenPort"),
    ({"listenPort": 65536}, "spec.listenPort"),
    ({"mtu": 1279}, "spec.mtu"),
    ({"interfaceName": "this-name-is-too-long"}, "spec.interfaceName"),
    ({"stunServers": ["only-one:3478"]}, "spec.stunServers"),
    ({"stunServers": ["a:3478", "no-port"]}, "spec.stunServers[1]"),
    ({"relay": {"mode": "sometimes"}}, "spec.relay.mode"),
    ({"relay": {"provider": "external"}}, "spec.relay.external.endpoint"),
    ({"relay": {"handshakeTimeoutSeconds": 0}}, "spec.relay.handshakeTimeoutSeconds"),
    ({"routing": {"excludeCIDRs": ["10.1.1.1/8"]}}, "spec.routing.excludeCIDRs[0]"),
    ({"natTraversal": {"birthdayAttack": "yes"}}, "spec.natTraversal.birthdayAttack"),
    ({"engine": "ebpf"}, "spec.engine"),
]


@pytest.mark.parametrize(("spec", "field"), BAD_MESHES)
def test_bad_mesh_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject, match=re.escape(f"{field}: ")) as err:
        models.mesh_from_cr(mesh(**spec))
    assert err.value.field == field


GATEWAY = {
    "kind": "WireKubeGateway",
    "metadata": {"name": "vgw", "generation": 3},
    "spec": {
        "peerRefs": ["ec2-a", "ec2-b"],
        "routes": [{"cidr": "10.100.0.0/16", "description": "VPC"}],
        "snat": {"enabled": True, "sourceIP": "10.100.0.10"},
        "healthCheck": {"enabled": True, "target": "10.100.0.2:443", "intervalSeconds": 1, "timeoutSeconds": 1,
                        "failureThreshold": 2},
    },
}


def test_gateway_parses() -> None:
    g = models.gateway_from_cr(GATEWAY)
    assert g.spec.peer_refs == ("ec2-a", "ec2-b")
    assert g.spec.health_check.target_host == "10.100.0.2" and g.spec.health_check.target_port == 443
    assert g.generation == 3


def test_health_target_without_port_is_icmp() -> None:
    obj = copy.deepcopy(GATEWAY)
    obj["spec"]["healthCheck"]["target"] = "10.100.0.2"
    hc = models.gateway_from_cr(obj).spec.health_check
    assert hc.target_port is None and hc.target_host == "10.100.0.2"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("peerRefs",), [], "spec.peerRefs"),
        (("routes", 0, "cidr"), "10.100.0.1/16", "spec.routes[0].cidr"),
        (("snat", "sourceIP"), "not-an-ip", "spec.snat.sourceIP"),
        (("healthCheck", "timeoutSeconds"), 5, "spec.healthCheck.timeoutSeconds"),
        (("healthCheck", "target"), "", "spec.healthCheck.target"),
        (("healthCheck", "failureThreshold"), 0, "spec.healthCheck.failureThreshold"),
    ],
)
def test_bad_gateway_names_the_field(path: tuple[Any, ...], value: Any, field: str) -> None:
    obj = copy.deepcopy(GATEWAY)
    target: Any = obj["spec"]
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(InvalidObject, match=re.escape(f"{field}: ")) as err:
        models.gateway_from_cr(obj)
    assert err.value.field == field


@pytest.mark.parametrize("text", ["1.2.3.4:1", "[2001:db8::1]:51820", "255.255.255.255:65535"])
def test_endpoint_round_trip(text: str) -> None:
    assert str(models.Endpoint.parse(text)) == text
