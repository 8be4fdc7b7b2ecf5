"""CIDR overlap checks: gateway routes, and pod CIDR sync into peers' AllowedIPs."""

from __future__ import annotations

from tests.unit.gateway_fixtures import gateway, mesh, net, peer
from wirekube.gateway.cidrs import OwnedCIDR, effective_routes
from wirekube.gateway.podcidr import (
    ANNOTATION_POD_CIDRS,
    cilium_pod_cidrs,
    managed_entries,
    node_pod_cidrs,
    plan_pod_cidrs,
)

# ---- gateway routes -----------------------------------------------------------------------------


def test_routes_overlapping_the_mesh_cidr_are_rejected() -> None:
    gw = gateway(["a"], ["10.100.0.0/16", "10.0.0.0/8"])
    accepted, rejected = effective_routes(gw, mesh(), [], {})
    assert accepted == (net("10.100.0.0/16"),)
    assert [(str(r.cidr), r.reason) for r in rejected] == [("10.0.0.0/8", "overlaps the mesh CIDR 10.255.0.0/16")]


def test_default_route_needs_allow_default_route() -> None:
    gw = gateway(["a"], ["0.0.0.0/0"])
    assert effective_routes(gw, mesh(), [], {})[0] == ()
    assert effective_routes(gw, mesh(routing={"allowDefaultRoute": True}), [], {})[0] == (net("0.0.0.0/0"),)


def test_route_of_a_gateway_with_precedence_wins() -> None:
    gw = gateway(["b"], ["10.100.1.0/24", "10.101.0.0/16"], name="younger")
    older = [OwnedCIDR(net("10.100.0.0/16"), "WireKubeGateway older")]
    accepted, rejected = effective_routes(gw, mesh(), older, {})
    assert accepted == (net("10.101.0.0/16"),)
    assert "10.100.0.0/16 of WireKubeGateway older" in rejected[0].reason


def test_route_equal_to_another_peers_entry_is_rejected_but_not_the_gateway_peers_own() -> None:
    gw = gateway(["a"], ["10.200.0.0/24", "10.100.0.0/16"])
    entries = {"h1": [net("10.200.0.0/24")], "a": [net("10.100.0.0/16")]}
    accepted, rejected = effective_routes(gw, mesh(), [], entries)
    assert accepted == (net("10.100.0.0/16"),)
    assert rejected[0].reason == "is already an AllowedIPs entry of WireKubePeer h1"


def test_duplicate_routes_are_dropped() -> None:
    gw = gateway(["a"], ["10.100.0.0/16", "10.100.0.0/16"])
    accepted, rejected = effective_routes(gw, mesh(), [], {})
    assert accepted == (net("10.100.0.0/16"),) and rejected[0].reason == "duplicate route"


# ---- pod CIDR sources ---------------------------------------------------------------------------


def test_pod_cidrs_from_node_and_ciliumnode_objects() -> None:
    assert node_pod_cidrs({"spec": {"podCIDRs": ["10.200.0.0/24", "fd00::/64"]}}) == (net("10.200.0.0/24"),
                                                                                    net("fd00::/64"))
    assert node_pod_cidrs({"spec": {"podCIDR": "10.200.1.0/24"}}) == (net("10.200.1.0/24"),)
    assert node_pod_cidrs({"spec": {}}) == ()
    assert cilium_pod_cidrs({"spec": {"ipam": {"podCIDRs": ["10.200.2.0/25", "bogus"]}}}) == (net("10.200.2.0/25"),)


# ---- pod CIDR plan ------------------------------------------------------------------------------

SYNC = mesh(podCIDRSync="node", serviceCIDRs=["172.16.0.0/16"])


def test_pod_cidrs_are_appended_after_agent_and_user_entries() -> None:
    h1 = peer("h1", ["10.255.0.1/32", "172.20.0.5/32", "192.168.50.0/24"])
    plan = plan_pod_cidrs(SYNC, [h1], {"h1": [net("10.200.0.0/25")]}, [])
    (update,) = plan.updates
    assert [str(n) for n in update.allowed_ips] == ["10.255.0.1/32", "172.20.0.5/32", "192.168.50.0/24",
                                                     "10.200.0.0/25"]
    patch = update.merge_patch()
    assert patch["metadata"]["annotations"] == {ANNOTATION_POD_CIDRS: "10.200.0.0/25"}
    assert patch["metadata"]["resourceVersion"] == "1"  # optimistic: never clobber a concurrent agent write


def test_changed_pod_cidr_replaces_only_the_synced_entry() -> None:
    h1 = peer("h1", ["10.255.0.1/32", "192.168.50.0/24", "10.200.0.0/25"],
              annotations={ANNOTATION_POD_CIDRS: "10.200.0.0/25"})
    assert managed_entries(h1) == (net("10.200.0.0/25"),)
    (update,) = plan_pod_cidrs(SYNC, [h1], {"h1": [net("10.200.0.128/25")]}, []).updates
    assert [str(n) for n in update.allowed_ips] == ["10.255.0.1/32", "192.168.50.0/24", "10.200.0.128/25"]


def test_in_sync_peer_needs_no_update_and_sync_none_removes_only_synced_entries() -> None:
    h1 = peer("h1", ["10.255.0.1/32", "192.168.50.0/24", "10.200.0.0/25"],
              annotations={ANNOTATION_POD_CIDRS: "10.200.0.0/25"})
    assert plan_pod_cidrs(SYNC, [h1], {"h1": [net("10.200.0.0/25")]}, []).updates == ()
    (update,) = plan_pod_cidrs(mesh(podCIDRSync="none"), [h1], {"h1": [net("10.200.0.0/25")]}, []).updates
    assert [str(n) for n in update.allowed_ips] == ["10.255.0.1/32", "192.168.50.0/24"]
    assert update.merge_patch()["metadata"]["annotations"] == {ANNOTATION_POD_CIDRS: None}


def test_manually_added_pod_cidr_stays_the_users() -> None:
    h1 = peer("h1", ["10.255.0.1/32", "10.200.0.0/25"])  # the guide's manual step 5b, before sync was on
    plan = plan_pod_cidrs(SYNC, [h1], {"h1": [net("10.200.0.0/25")]}, [])
    assert plan.updates == () and plan.refused == ()


def test_unregistered_peer_gets_nothing_yet() -> None:
    plan = plan_pod_cidrs(SYNC, [peer("h1", [])], {"h1": [net("10.200.0.0/25")]}, [])
    assert plan.updates == () and plan.refused == ()


def refusal_reasons(plan_refused: tuple) -> dict[str, str]:  # type: ignore[type-arg]
    return {f"{r.peer} {r.cidr}": r.reason for r in plan_refused}


def test_overlaps_are_refused_with_reasons() -> None:
    peers = [peer("h1", ["10.255.0.1/32"]), peer("ec2", ["10.255.0.2/32", "10.100.0.7/32"])]
    sources = {"h1": [net("10.255.128.0/24"), net("172.16.5.0/24"), net("10.100.0.0/16"), net("10.50.0.0/24"),
                      net("10.200.0.0/25")]}
    routes = [OwnedCIDR(net("10.50.0.0/16"), "WireKubeGateway vpc")]
    plan = plan_pod_cidrs(SYNC, peers, sources, routes)
    assert refusal_reasons(plan.refused) == {
        "h1 10.255.128.0/24": "overlaps the mesh CIDR 10.255.0.0/16",
        "h1 172.16.5.0/24": "overlaps a service CIDR 172.16.0.0/16",
        "h1 10.100.0.0/16": "overlaps AllowedIPs entry 10.100.0.7/32 of WireKubePeer ec2",
        "h1 10.50.0.0/24": "overlaps WireKubeGateway vpc 10.50.0.0/16",
    }
    (update,) = plan.updates
    assert update.managed == (net("10.200.0.0/25"),)


def test_overlapping_pod_cidrs_of_two_nodes_go_to_the_holder_then_the_older() -> None:
    old = peer("old", ["10.255.0.1/32"], created="2026-01-01T00:00:00Z")
    new = peer("new", ["10.255.0.2/32"], created="2026-02-01T00:00:00Z")
    sources = {"old": [net("10.200.0.0/24")], "new": [net("10.200.0.0/25")]}
    plan = plan_pod_cidrs(SYNC, [new, old], sources, [])
    assert refusal_reasons(plan.refused) == {"new 10.200.0.0/25": "overlaps pod CIDR 10.200.0.0/24 of node old"}
    holder = peer("new", ["10.255.0.2/32", "10.200.0.0/25"], created="2026-02-01T00:00:00Z",
                  annotations={ANNOTATION_POD_CIDRS: "10.200.0.0/25"})
    plan = plan_pod_cidrs(SYNC, [holder, old], sources, [])
    assert refusal_reasons(plan.refused) == {"old 10.200.0.0/24": "overlaps pod CIDR 10.200.0.0/25 of node new"}


def test_plan_applied_twice_yields_no_updates() -> None:
    h1 = peer("h1", ["10.255.0.1/32"])
    (update,) = plan_pod_cidrs(SYNC, [h1], {"h1": [net("10.200.0.0/25")]}, []).updates
    after = peer("h1", [str(n) for n in update.allowed_ips],
                 annotations={ANNOTATION_POD_CIDRS: ",".join(map(str, update.managed))})
    assert plan_pod_cidrs(SYNC, [after], {"h1": [net("10.200.0.0/25")]}, []).updates == ()
