"""The node's own WireKubePeer (registration) and its status, as pure functions."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import replace

from wirekube import ipam
from wirekube.agent import plan as P
from wirekube.agent.plan import PeerPath
from wirekube.agent.registration import (
    ANNOTATION_AUTO_ALLOWED_IPS,
    NodeInfo,
    desired_registration,
    first_discovered,
    new_peer_body,
    node_info_from_obj,
    update_patch,
)
from wirekube.agent.status import own_status
from wirekube.agent.wg.base import WgDeviceState, WgPeerState
from wirekube.models import (
    Endpoint,
    EndpointDiscovery,
    Mesh,
    MeshSpec,
    NatType,
    Peer,
    PeerSpec,
    PeerStatus,
    Transport,
    TransportMode,
    peer_from_cr,
)

CIDR = ipaddress.IPv4Network("10.255.0.0/16")
MESH = Mesh("default", MeshSpec(mesh_cidr=CIDR))
MESH_INTERNAL = Mesh("default", MeshSpec(mesh_cidr=CIDR, include_node_internal_ip=True))
KEY = base64.b64encode(b"\x01" * 32).decode()
NODE_OBJ = {
    "metadata": {"name": "n1", "uid": "u-1", "annotations": {}},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.10"},
                             {"type": "ExternalIP", "address": "203.0.113.5"},
                             {"type": "Hostname", "address": "n1"}]},
}


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def test_new_registration_uses_hash_address_external_endpoint_and_owner() -> None:
    node = node_info_from_obj(NODE_OBJ)
    reg = desired_registration(node, MESH, KEY, None, [])
    assert reg.spec.allowed_ips == (net(f"{ipam.mesh_ip('n1', CIDR)}/32"),)
    assert reg.spec.endpoint == Endpoint.parse("203.0.113.5:51820")
    assert reg.endpoint_method is EndpointDiscovery.EXTERNAL_IP
    body = new_peer_body(node, reg)
    assert body["metadata"]["labels"] == {"wirekube.io/node": "n1"}
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "u-1"}]
    assert peer_from_cr(body).spec == reg.spec


def test_endpoint_annotation_wins_and_bare_ip_gets_listen_port() -> None:
    for text, want in (("198.51.100.1", "198.51.100.1:51820"), ("198.51.100.1:4500", "198.51.100.1:4500")):
        node = replace(node_info_from_obj(NODE_OBJ), annotations={"wirekube.io/endpoint": text})
        reg = desired_registration(node, MESH, KEY, None, [])
        assert reg.spec.endpoint == Endpoint.parse(want) and reg.endpoint_method is EndpointDiscovery.ANNOTATION
    bad = replace(node_info_from_obj(NODE_OBJ), annotations={"wirekube.io/endpoint": "nonsense:x"})
    reg = desired_registration(bad, MESH, KEY, None, [])
    assert reg.problems and reg.spec.endpoint == Endpoint.parse("203.0.113.5:51820")


def test_internal_ip_only_when_enabled_private_and_overridable() -> None:
    node = node_info_from_obj(NODE_OBJ)
    assert len(desired_registration(node, MESH, KEY, None, []).spec.allowed_ips) == 1
    assert desired_registration(node, MESH_INTERNAL, KEY, None, []).spec.allowed_ips[1] == net("192.168.5.10/32")
    public_only = NodeInfo("n1", internal_ips=(ipaddress.ip_address("203.0.113.9"),))
    assert len(desired_registration(public_only, MESH_INTERNAL, KEY, None, []).spec.allowed_ips) == 1
    override = replace(node, annotations={"wirekube.io/internal-ip": "172.16.0.4"})
    assert desired_registration(override, MESH_INTERNAL, KEY, None, []).spec.allowed_ips[1] == net("172.16.0.4/32")


def existing(allowed: tuple[str, ...], auto: str = "", ts: str = "2025-01-01T00:00:00Z") -> Peer:
    return Peer("n1", PeerSpec(KEY, None, tuple(net(a) for a in allowed), 7),
                annotations={ANNOTATION_AUTO_ALLOWED_IPS: auto} if auto else {}, creation_timestamp=ts)


def test_mesh_ip_is_sticky_and_user_entries_are_kept() -> None:
    node = node_info_from_obj(NODE_OBJ)
    old = existing(("10.255.42.42/32", "192.168.4.4/32", "10.77.0.0/16"), auto="192.168.4.4/32")
    reg = desired_registration(node, MESH_INTERNAL, KEY, old, [])
    assert reg.spec.allowed_ips == (net("10.255.42.42/32"), net("192.168.5.10/32"), net("10.77.0.0/16"))
    assert reg.spec.persistent_keepalive == 7  # user's value kept
    patch = update_patch(node, reg, old, {"metadata": {}})
    assert patch["spec"]["allowedIPs"] == ["10.255.42.42/32", "192.168.5.10/32", "10.77.0.0/16"]
    assert patch["metadata"]["annotations"] == {ANNOTATION_AUTO_ALLOWED_IPS: "192.168.5.10/32"}
    assert patch["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_up_to_date_peer_needs_no_patch() -> None:
    node = node_info_from_obj(NODE_OBJ)
    reg = desired_registration(node, MESH, KEY, None, [])
    body = new_peer_body(node, reg)
    body["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    desired = desired_registration(node, MESH, KEY, peer_from_cr(body), [])
    assert update_patch(node, desired, peer_from_cr(body), body) == {}


def test_conflicting_mesh_ip_moves_only_the_younger_claim() -> None:
    node = node_info_from_obj(NODE_OBJ)
    mine = existing(("10.255.42.42/32",), ts="2025-01-02T00:00:00Z")
    older = Peer("zz", PeerSpec(KEY, None, (net("10.255.42.42/32"),)), creation_timestamp="2025-01-01T00:00:00Z")
    younger = replace(older, creation_timestamp="2025-01-03T00:00:00Z")
    assert desired_registration(node, MESH, KEY, mine, [younger]).spec.allowed_ips[0] == net("10.255.42.42/32")
    moved = desired_registration(node, MESH, KEY, mine, [older]).spec.allowed_ips[0]
    assert moved != net("10.255.42.42/32") and moved.subnet_of(CIDR)


def test_new_node_probes_past_claimed_hash_address() -> None:
    hashed = ipam.mesh_ip("n1", CIDR)
    other = Peer("other", PeerSpec(KEY, None, (net(f"{hashed}/32"),)))
    got = desired_registration(node_info_from_obj(NODE_OBJ), MESH, KEY, None, [other]).spec.allowed_ips[0]
    assert got.network_address == hashed + 1


def test_status_from_engine_view() -> None:
    k2, k3 = base64.b64encode(b"\x02" * 32).decode(), base64.b64encode(b"\x03" * 32).decode()
    peers = [Peer("b", PeerSpec(k2, None, (net("10.255.0.2/32"),))),
             Peer("c", PeerSpec(k3, None, (net("10.255.0.3/32"),)))]
    d = P.plan(MESH, peers, P.LocalFacts("a", KEY))
    now = 1_700_000_000.0
    wg = WgDeviceState(KEY, 51820, 0x574B, {k2: WgPeerState(d.peers[k2], last_handshake=now - 30),
                                            k3: WgPeerState(d.peers[k3])})
    prev = PeerStatus(nat_type=NatType.CONE, endpoint_discovery_method="stun")
    st = own_status(d, wg, {"c": PeerPath(transport=Transport.RELAY)}, now, prev)
    assert st.connected and st.last_handshake == "2023-11-14T22:12:50Z"
    assert st.peer_transports == {"b": Transport.DIRECT, "c": Transport.RELAY}
    assert st.transport_mode is TransportMode.MIXED
    assert (st.nat_type, st.endpoint_discovery_method) == (NatType.CONE, "stun")
    stale = own_status(d, wg, {}, now + 1000, prev)
    assert not stale.connected and stale.transport_mode is TransportMode.DIRECT


STUN = (Endpoint.parse("198.51.100.7:40123"), EndpointDiscovery.STUN)
IMDS = (Endpoint(ipaddress.IPv4Address("3.120.0.7"), 0), EndpointDiscovery.IMDS)
NOTHING = (None, None)


def _endpoint(node_obj: dict, *candidates: tuple) -> tuple[str, EndpointDiscovery | None]:
    reg = desired_registration(node_info_from_obj(node_obj), MESH, KEY, None, [], first_discovered(*candidates))
    return str(reg.spec.endpoint), reg.endpoint_method


def test_endpoint_chain_annotation_stun_imds_external_internal() -> None:
    annotated = {**NODE_OBJ, "metadata": {**NODE_OBJ["metadata"], "annotations": {"wirekube.io/endpoint": "192.0.2.9"}}}
    internal_only = {**NODE_OBJ, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.10"}]}}
    assert _endpoint(annotated, STUN, IMDS) == ("192.0.2.9:51820", EndpointDiscovery.ANNOTATION)
    assert _endpoint(NODE_OBJ, STUN, IMDS) == ("198.51.100.7:40123", EndpointDiscovery.STUN)
    # IMDS gives an address only: published with the mesh listen port.
    assert _endpoint(NODE_OBJ, NOTHING, IMDS) == ("3.120.0.7:51820", EndpointDiscovery.IMDS)
    assert _endpoint(NODE_OBJ, NOTHING, NOTHING) == ("203.0.113.5:51820", EndpointDiscovery.EXTERNAL_IP)
    assert _endpoint(internal_only, NOTHING, NOTHING) == ("192.168.5.10:51820", EndpointDiscovery.INTERNAL_IP)


def test_a_loopback_discovery_is_skipped_for_the_next_in_the_chain() -> None:
    loopback = (Endpoint.parse("127.0.0.1:40000"), EndpointDiscovery.STUN)
    assert first_discovered(loopback, IMDS) == IMDS
    assert first_discovered(loopback, NOTHING) == NOTHING
    assert _endpoint(NODE_OBJ, loopback, NOTHING) == ("203.0.113.5:51820", EndpointDiscovery.EXTERNAL_IP)
