"""The pure planner: desired state from models, and the diff that reaches it."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from tests.unit.plan_fixtures import CIDR, EMPTY, FACTS, NOW, converged, desired, key, mesh, net, peer
from wirekube import ipam
from wirekube.agent import plan as P
from wirekube.agent.plan import LinkState, PeerPath, Route, Rule
from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgPeerState
from wirekube.models import FWMARK, ROUTE_TABLE, Endpoint, LocalSubnetPolicy, Peer, PeerSpec, Transport

# ------------------------------------------------------------------ desired state


def test_interface_rules_and_device() -> None:
    d = desired(peer("b", 2))
    assert d.link.address == ipaddress.IPv4Interface(f"{ipam.mesh_ip('me', CIDR)}/32")
    assert d.link.sysctls == {"disable_xfrm": "1", "disable_policy": "1", "rp_filter": "2"}
    assert d.fwmark == FWMARK == 0x574B
    assert d.rules == {
        Rule(4, 100, 254, fwmark=FWMARK),
        Rule(4, 199, 254, dst=net("203.0.113.10/32")),
        Rule(4, 200, ROUTE_TABLE),
    }
    assert {r.priority for r in d.rules if r.fwmark} == {100}  # below 200


def test_routes_only_for_peer_allowed_ips() -> None:
    b = peer("b", 2, "10.20.0.0/16")
    d = desired(b)
    assert d.routes == {Route(b.spec.allowed_ips[0], "wire_kube"), Route(net("10.20.0.0/16"), "wire_kube")}
    assert d.peers[key(2)].allowed_ips == tuple(sorted(b.spec.allowed_ips, key=lambda n: int(n.network_address)))
    assert d.peers[key(2)].endpoint == Endpoint.parse("192.168.1.2:51820")
    assert key(1) not in d.peers  # never a peer for ourselves


def test_passive_peer_without_allowed_ips_gets_nothing() -> None:
    b = Peer("b", PeerSpec(key(2), None, ()))
    d = desired(b)
    assert d.peers == {} and d.routes == frozenset() and d.skipped == ()


@pytest.mark.parametrize(
    ("name", "bad", "reason"),
    [
        ("bad key", Peer("x", PeerSpec("not-a-key", None, (net("10.255.9.9/32"),))), "spec.publicKey"),
        ("own key", Peer("x", PeerSpec(key(1), None, (net("10.255.9.9/32"),))), "same key"),
        ("contains my mesh IP", peer("x", 5, "10.255.0.0/16"), "this node's mesh IP"),
        ("claims my address", peer("x", 5, "192.168.1.1/32"), "this node's own address"),
        ("contains b's mesh IP", peer("x", 5, f"{ipam.mesh_ip('b', CIDR)}/32"), "mesh IP"),
        ("same mesh IP as older b", peer("x", 5, mesh_ip=f"{ipam.mesh_ip('b', CIDR)}/32"), "already claimed"),
        ("duplicate key of b",
         Peer("x", PeerSpec(key(2), None, (net("10.255.9.9/32"),)), creation_timestamp="2025-02-01T00:00:00Z"),
         "same key"),
    ],
)
def test_invalid_peers_are_skipped_and_the_rest_keeps_working(name: str, bad: Peer, reason: str) -> None:
    b = peer("b", 2)
    d = desired(b, bad)
    assert [s.peer for s in d.skipped] == ["x"], name
    assert reason in d.skipped[0].reason
    assert key(2) in d.peers and Route(b.spec.allowed_ips[0], "wire_kube") in d.routes
    assert all(r.dst not in bad.spec.allowed_ips or r.dst in b.spec.allowed_ips for r in d.routes)


def test_older_peer_wins_a_mesh_ip_conflict_regardless_of_order() -> None:
    ip = f"{ipam.mesh_ip('c', CIDR)}/32"
    old = peer("z-old", 3, mesh_ip=ip, ts="2024-01-01T00:00:00Z")
    new = peer("a-new", 4, mesh_ip=ip, ts="2025-06-01T00:00:00Z")
    for order in ((old, new), (new, old)):
        d = desired(*order)
        assert [s.peer for s in d.skipped] == ["a-new"]
        assert key(3) in d.peers


def test_an_entry_covering_several_mesh_ips_names_the_oldest_owner() -> None:
    b = peer("b", 2, mesh_ip="10.255.200.2/32", ts="2025-01-01T00:00:09Z")
    c = peer("c", 3, mesh_ip="10.255.200.1/32", ts="2025-01-01T00:00:05Z")  # lower address, but older
    x = peer("x", 5, "10.255.200.0/30")
    for order in ((b, c, x), (x, c, b)):
        d = desired(*order)
        assert [(s.peer, s.reason) for s in d.skipped] == [
            ("x", "spec.allowedIPs[1] 10.255.200.0/30 contains the mesh IP 10.255.200.1 of peer 'c'")
        ]
    d = desired(x, b)  # without c, b's address is the one found
    assert d.skipped[0].reason.endswith("contains the mesh IP 10.255.200.2 of peer 'b'")


@pytest.mark.parametrize(
    ("entry", "routing", "routed"),
    [
        ("0.0.0.0/1", {}, ["0.0.0.0/1"]),
        ("192.168.1.0/24", {}, []),  # own LAN, localSubnetPolicy skip
        ("192.168.0.0/16", {}, []),  # contains own LAN
        ("192.168.1.0/24", {"local_subnet_policy": LocalSubnetPolicy.ROUTE}, ["192.168.1.0/24"]),
        ("127.0.0.0/8", {}, []),
        ("169.254.0.0/16", {}, []),
        ("203.0.113.0/24", {}, []),  # contains the API server
        ("10.20.0.0/16", {"exclude_cidrs": (net("10.20.0.0/16"),)}, []),
        ("10.20.0.0/16", {"exclude_cidrs": (net("10.20.128.0/17"),)}, ["10.20.0.0/17"]),
        ("10.20.0.0/16", {"exclude_cidrs": (net("10.20.0.0/18"),)}, ["10.20.64.0/18", "10.20.128.0/17"]),
        ("198.51.100.0/24", {}, ["198.51.100.0/24"]),  # public, but explicit: routed
    ],
)
def test_entry_filtering(entry: str, routing: dict[str, object], routed: list[str]) -> None:
    b = peer("b", 2, entry)
    d = desired(b, m=mesh(**routing))
    own = {Route(b.spec.allowed_ips[0], "wire_kube")}
    assert d.routes - own == {Route(net(x), "wire_kube") for x in routed}
    assert set(d.peers[key(2)].allowed_ips) == {b.spec.allowed_ips[0], *(net(x) for x in routed)}
    assert d.skipped == ()


def test_default_route_only_when_allowed() -> None:
    b = Peer("b", PeerSpec(key(2), None, (net(f"{ipam.mesh_ip('b', CIDR)}/32"), net("0.0.0.0/0"))))
    assert Route(net("0.0.0.0/0"), "wire_kube") not in desired(b).routes
    assert Route(net("0.0.0.0/0"), "wire_kube") in desired(b, m=mesh(allow_default_route=True)).routes


def test_duplicate_entry_goes_to_the_older_peer() -> None:
    b = peer("b", 2, "10.30.0.0/24")
    c = peer("c", 3, "10.30.0.0/24")
    d = desired(c, b)
    assert net("10.30.0.0/24") in d.peers[key(2)].allowed_ips
    assert net("10.30.0.0/24") not in d.peers[key(3)].allowed_ips
    assert any(x.peer == "c" for x in d.dropped)


def test_no_route_ever_covers_own_addresses_or_comes_from_outside_allowed_ips() -> None:
    peers = [peer(f"p{i}", i, f"10.{40 + i}.0.0/16", "192.168.1.0/25") for i in range(2, 9)]
    d = desired(*peers)
    allowed = {n for p in peers for n in p.spec.allowed_ips}
    for r in d.routes:
        assert any(r.dst.subnet_of(a) for a in allowed)  # type: ignore[arg-type]
        assert not any(a in r.dst for a in FACTS.addresses)


def test_path_override_forces_endpoint_and_keepalive() -> None:
    proxy = Endpoint.parse("127.0.0.1:40001")
    d = desired(peer("b", 2), paths={"b": PeerPath(endpoint=proxy, keepalive=1, transport=Transport.RELAY)})
    assert d.peers[key(2)].endpoint == proxy and d.peers[key(2)].persistent_keepalive == 1
    assert key(2) in d.forced_endpoints


def test_ipv6_entries_bring_ipv6_rules() -> None:
    d = desired(peer("b", 2, "fd00:1::/64"))
    assert Route(net("fd00:1::/64"), "wire_kube") in d.routes
    assert Rule(6, 200, ROUTE_TABLE) in d.rules and Rule(6, 100, 254, fwmark=FWMARK) in d.rules


# ------------------------------------------------------------------ diff


def test_first_apply_builds_everything_and_second_is_empty() -> None:
    d = desired(peer("b", 2), peer("c", 3, "10.50.0.0/24"))
    ops = P.diff(d, EMPTY, NOW)
    kinds = [type(o).__name__ for o in ops]
    assert kinds.count("PutPeer") == 2 and kinds.count("AddRoute") == 3 and kinds.count("AddRule") == 3
    assert SetDevice(private_key=True, listen_port=51820, fwmark=FWMARK) in ops
    assert P.diff(d, converged(d), NOW) == ()


def test_unchanged_peer_is_never_rewritten() -> None:
    b, c = peer("b", 2), peer("c", 3)
    before = converged(desired(b, c))
    after = desired(b, replace(c, spec=replace(c.spec, allowed_ips=(*c.spec.allowed_ips, net("10.60.0.0/24")))))
    ops = P.diff(after, before, NOW)
    puts = [o for o in ops if isinstance(o, PutPeer)]
    assert [p.config.public_key for p in puts] == [key(3)]
    assert puts[0].set_allowed_ips and not puts[0].create and not puts[0].set_endpoint and not puts[0].set_keepalive
    assert ops == (puts[0], P.AddRoute(Route(net("10.60.0.0/24"), "wire_kube")))


def test_removed_peer_loses_its_wireguard_entry_and_routes() -> None:
    b, c = peer("b", 2), peer("c", 3, "10.70.0.0/24")
    ops = P.diff(desired(b), converged(desired(b, c)), NOW)
    assert set(ops) == {
        RemovePeer(key(3)),
        P.DelRoute(Route(c.spec.allowed_ips[0], "wire_kube")),
        P.DelRoute(Route(net("10.70.0.0/24"), "wire_kube")),
    }


@pytest.mark.parametrize(
    ("observed_ep", "age", "forced", "rewritten"),
    [
        ("192.168.1.2:51820", 10, False, False),  # same
        ("198.51.100.7:40000", 10, False, False),  # roamed and working: keep
        ("198.51.100.7:40000", 400, False, True),  # roamed but stale: back to the published one
        ("127.0.0.1:40001", 10, False, True),  # leftover relay proxy: never kept unless forced
        (None, 10, False, True),
    ],
)
def test_endpoint_roaming(observed_ep: str | None, age: float, forced: bool, rewritten: bool) -> None:
    d = desired(peer("b", 2))
    obs = converged(d)
    cfg = replace(d.peers[key(2)], endpoint=Endpoint.parse(observed_ep) if observed_ep else None)
    obs = replace(obs, wg=replace(obs.wg, peers={key(2): WgPeerState(cfg, last_handshake=NOW - age)}))
    ops = P.diff(d, obs, NOW)
    assert (ops != ()) is rewritten
    if rewritten:
        assert ops == (PutPeer(d.peers[key(2)], create=False, set_endpoint=True, set_allowed_ips=False,
                               set_keepalive=False),)


def test_only_wirekube_rules_are_removed_and_duplicates_are_collapsed() -> None:
    d = desired(peer("b", 2))
    obs = converged(d)
    foreign = (Rule(4, 150, 100), Rule(4, 200, 254, foreign=True), Rule(4, 199, 254, dst=net("10.0.0.0/8")))
    stale = Rule(4, 199, 254, dst=net("198.51.100.1/32"))
    dup = Rule(4, 200, ROUTE_TABLE)
    ops = P.diff(d, replace(obs, rules=obs.rules + foreign + (stale, dup)), NOW)
    assert set(ops) == {P.DelRule(stale), P.DelRule(dup)}


def test_foreign_routes_in_our_table_are_removed_and_ours_restored() -> None:
    d = desired(peer("b", 2))
    obs = converged(d)
    stray = Route(net("10.99.0.0/24"), "eth0")
    ops = P.diff(d, replace(obs, routes=(stray,)), NOW)
    assert set(ops) == {P.DelRoute(stray), *(P.AddRoute(r) for r in d.routes)}


def test_link_repairs_and_removals_come_last() -> None:
    d = desired(peer("b", 2))
    obs = converged(d)
    wrong = ipaddress.IPv4Interface("10.255.77.77/32")
    obs = replace(obs, link=LinkState(True, 1500, False, frozenset({wrong}), {"rp_filter": "1"}))
    ops = P.diff(d, obs, NOW)
    assert ops[0] == P.SetMtu(1420)
    assert P.AddAddress(d.link.address) in ops and P.SetUp() in ops  # type: ignore[arg-type]
    assert ops[-1] == P.DelAddress(wrong)
    assert {P.SetSysctl("rp_filter", "2"), P.SetSysctl("disable_xfrm", "1"),
            P.SetSysctl("disable_policy", "1")} <= set(ops)


def test_new_private_key_is_installed_when_identity_differs() -> None:
    d = desired(peer("b", 2))
    obs = converged(d)
    ops = P.diff(d, replace(obs, wg=replace(obs.wg, public_key=key(9))), NOW)
    assert ops == (SetDevice(private_key=True),)


def test_rule_ownership() -> None:
    assert P.is_wirekube_rule(Rule(4, 100, 254, fwmark=FWMARK))
    assert P.is_wirekube_rule(Rule(4, 50, ROUTE_TABLE))
    assert not P.is_wirekube_rule(Rule(4, 32766, 254))
    assert not P.is_wirekube_rule(Rule(4, 199, 254, dst=net("10.0.0.0/8")))
    assert not P.is_wirekube_rule(Rule(4, 300, 254, fwmark=FWMARK))
    assert not P.is_wirekube_rule(Rule(4, 100, ROUTE_TABLE, foreign=True))
