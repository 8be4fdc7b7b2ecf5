"""Endpoint reflection: the guards (pure) and the agent's two sides (observer, subject)."""

from __future__ import annotations

import ipaddress
import time

import pytest

from tests.fixtures.keys import public_key
from tests.unit.traversal_fixtures import peer, traversal
from wirekube.agent.wg.base import WgDeviceState, WgPeerConfig, WgPeerState
from wirekube.models import Endpoint, EndpointDiscovery, NatType, Peer, PeerSpec, PeerStatus, Transport
from wirekube.traversal import pathsm, reflection
from wirekube.traversal.reflection import observation, reflect


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


PUBLIC = ep("203.0.113.5:51820")
LAN = ep("192.168.1.5:51820")


@pytest.mark.parametrize("bad", ["127.0.0.1:40001", "0.0.0.0:51820", "224.0.0.1:51820", "169.254.1.1:51820",
                                 "[::1]:51820"])
def test_never_loopback_or_otherwise_unusable(bad: str) -> None:
    assert reflect(PUBLIC, [ep(bad)], NatType.CONE)[0] is None
    assert reflect(None, [ep(bad)], NatType.UNKNOWN)[0] is None
    assert observation(PUBLIC, ep(bad), direct=True, healthy=True, lan_path=False) is None


@pytest.mark.parametrize("private", ["192.168.1.5:51820", "10.0.0.5:51820", "172.16.3.4:51820",
                                     "100.64.1.1:51820", "[fd00::5]:51820"])
def test_never_public_to_private(private: str) -> None:
    got, why = reflect(PUBLIC, [ep(private)], NatType.CONE)
    assert got is None and "private" in why


def test_private_to_public_and_public_to_public_are_published() -> None:
    assert reflect(LAN, [ep("203.0.113.5:40001")], NatType.UNKNOWN)[0] == ep("203.0.113.5:40001")
    assert reflect(PUBLIC, [ep("203.0.113.9:51820")], NatType.CONE)[0] == ep("203.0.113.9:51820")
    assert reflect(None, [ep("198.18.2.2:51820")], NatType.UNKNOWN)[0] == ep("198.18.2.2:51820")
    assert not reflection.is_private(ipaddress.ip_address("198.18.2.2"))  # the lab's "internet" is public here
    assert reflect(LAN, [ep("10.0.0.5:51820")], NatType.CONE)[0] == ep("10.0.0.5:51820")  # private -> private


def test_disagreement_symmetric_nat_and_no_change_publish_nothing() -> None:
    assert reflect(LAN, [ep("203.0.113.5:1"), ep("203.0.113.5:2")], NatType.CONE)[1].startswith("peers disagree")
    assert reflect(LAN, [ep("203.0.113.5:1")], NatType.SYMMETRIC)[0] is None
    assert reflect(PUBLIC, [PUBLIC], NatType.CONE) == (None, "already published")
    assert reflect(PUBLIC, [], NatType.CONE)[0] is None
    assert reflect(LAN, [ep("203.0.113.5:1"), ep("203.0.113.5:1")], NatType.CONE)[0] == ep("203.0.113.5:1")


def test_a_stun_answer_is_never_overridden() -> None:
    got, why = reflect(PUBLIC, [ep("203.0.113.5:40001")], NatType.PORT_RESTRICTED_CONE, stun_endpoint=PUBLIC)
    assert got is None and why.startswith("STUN found")
    assert reflect(PUBLIC, [ep("203.0.113.5:40001")], NatType.PORT_RESTRICTED_CONE)[0] == ep("203.0.113.5:40001")


def test_observer_reports_only_healthy_direct_non_lan_paths_that_differ() -> None:
    seen = ep("203.0.113.5:40001")
    assert observation(PUBLIC, seen, direct=True, healthy=True, lan_path=False) == seen
    assert observation(PUBLIC, seen, direct=False, healthy=True, lan_path=False) is None
    assert observation(PUBLIC, seen, direct=True, healthy=False, lan_path=False) is None
    assert observation(PUBLIC, seen, direct=True, healthy=True, lan_path=True) is None
    assert observation(PUBLIC, PUBLIC, direct=True, healthy=True, lan_path=False) is None
    assert observation(PUBLIC, None, direct=True, healthy=True, lan_path=False) is None


# ---- the agent ------------------------------------------------------------------------------------


def test_agent_observes_a_healthy_direct_peer_at_its_roamed_endpoint() -> None:
    p = peer("cone", NatType.CONE, "203.0.113.2")
    t = traversal(NatType.OPEN, [p])
    key = p.spec.public_key
    roamed = ep("203.0.113.2:40999")
    rx = {"v": 0, "ep": roamed}
    t._engine_state = lambda: WgDeviceState(peers={key: WgPeerState(  # type: ignore[method-assign]
        WgPeerConfig(key, rx["ep"], ()), rx_bytes=rx["v"])})
    assert t.decorate(PeerStatus()).observed_endpoints == {}  # not established yet
    now = time.monotonic()
    t.tick(now, 1e9)
    rx["v"] = 100
    t.tick(now + 0.1, 1e9)
    assert t._peers["cone"].path.established
    assert t.decorate(PeerStatus()).observed_endpoints == {"cone": "203.0.113.2:40999"}
    rx["ep"] = ep("127.0.0.1:40001")  # a loopback proxy is never reported
    assert t.decorate(PeerStatus()).observed_endpoints == {}
    rx["ep"] = p.spec.endpoint  # the published one: nothing to report
    assert t.decorate(PeerStatus()).observed_endpoints == {}


def test_agent_publishes_what_peers_see_and_keeps_it_until_discovery_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    me = Peer("me", PeerSpec(public_key(), LAN, (ipaddress.ip_network("10.255.0.1/32"),)))
    seen = "198.51.100.9:40001"
    watcher = peer("open", NatType.OPEN, "203.0.113.3", observed_endpoints={"me": seen})
    t = traversal(NatType.UNKNOWN, [watcher])
    wakes: list[int] = []
    t._wake = lambda: wakes.append(1)  # type: ignore[method-assign]
    mesh = t._view.mesh
    assert mesh is not None
    t._ensure_io = lambda m: None  # type: ignore[method-assign]
    t.relays.sync = lambda m: None  # type: ignore[method-assign]
    t.update_view(mesh, (me, watcher), ("192.168.1.5",))
    d = t.discovery()
    assert str(d.endpoint) == seen and d.method is EndpointDiscovery.REFLECTION and wakes
    assert t.decorate(PeerStatus()).endpoint_discovery_method == "reflection"
    # Published now: the observer stops reporting, the reflection stands.
    me2 = Peer("me", PeerSpec(me.spec.public_key, ep(seen), me.spec.allowed_ips))
    quiet = peer("open", NatType.OPEN, "203.0.113.3")
    t.update_view(mesh, (me2, Peer(quiet.name, watcher.spec, quiet.status)), ("192.168.1.5",))
    assert str(t.discovery().endpoint) == seen
    # A private observation never replaces the now public endpoint.
    lan_seen = Peer(quiet.name, watcher.spec, PeerStatus(nat_type=NatType.OPEN, observed_endpoints={"me": str(LAN)}))
    t.update_view(mesh, (me2, lan_seen), ("192.168.1.5",))
    assert str(t.discovery().endpoint) == seen
    # STUN answers again (STUN servers back): its finding replaces the reflection.
    from wirekube.traversal import rawudp
    from wirekube.traversal.nat import StunSample

    monkeypatch.setattr(rawudp, "resolve", lambda servers: [rawudp.StunTarget("a", "198.18.0.2", 3478)] * 2)
    monkeypatch.setattr(rawudp, "stun_probe", lambda targets, port, timeout: [
        StunSample("a", "198.51.100.20", 51820), StunSample("b", "198.51.100.20", 51820)])
    t.stun_servers = lambda m: ["198.18.0.2:3478", "198.18.0.3:3478"]  # type: ignore[method-assign]
    before = len(wakes)
    t.discover(mesh, ("192.168.1.5",))
    d = t.discovery()
    assert str(d.endpoint) == "198.51.100.20:51820" and d.method is EndpointDiscovery.STUN and len(wakes) > before


def test_agent_with_a_stun_endpoint_ignores_observations() -> None:
    from dataclasses import replace

    me = Peer("me", PeerSpec(public_key(), PUBLIC, (ipaddress.ip_network("10.255.0.1/32"),)))
    watcher = peer("open", NatType.OPEN, "203.0.113.3", observed_endpoints={"me": "203.0.113.5:40001"})
    t = traversal(NatType.PORT_RESTRICTED_CONE, [watcher])
    t.discoverer.found = replace(t.discoverer.found, endpoint=PUBLIC, method=EndpointDiscovery.STUN)
    t._ensure_io = lambda m: None  # type: ignore[method-assign]
    t.relays.sync = lambda m: None  # type: ignore[method-assign]
    assert t._view.mesh is not None
    t.update_view(t._view.mesh, (me, watcher), ("192.168.1.5",))
    d = t.discovery()
    assert d.endpoint == PUBLIC and d.method is EndpointDiscovery.STUN


def test_relayed_and_lan_peers_are_not_observed() -> None:
    lan = peer("lan", NatType.PORT_RESTRICTED_CONE, "198.51.100.9", host_endpoints=("192.168.1.6:51820",))
    sym = peer("sym", NatType.SYMMETRIC, "203.0.113.1")
    t = traversal(NatType.SYMMETRIC, [lan, sym])
    assert t._peers["sym"].path.transport is Transport.RELAY
    states = {lan.spec.public_key: ep("192.168.1.6:51820"), sym.spec.public_key: ep("203.0.113.1:999")}
    t._engine_state = lambda: WgDeviceState(peers={k: WgPeerState(  # type: ignore[method-assign]
        WgPeerConfig(k, e, ()), rx_bytes=1) for k, e in states.items()})
    t._peers["lan"].path = pathsm.PeerPath(Transport.DIRECT, 0.0, established=True, last_rx_at=time.monotonic())
    assert t.decorate(PeerStatus()).observed_endpoints == {}
