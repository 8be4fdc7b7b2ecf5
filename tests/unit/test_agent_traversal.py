"""The agent's traversal glue: decisions per peer, overrides for the planner, failover on rx."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.fixtures.keys import public_key
from tests.unit.traversal_fixtures import FakeRelay, peer, traversal
from wirekube.agent.traversal import DIRECT_KEEPALIVE, Traversal
from wirekube.agent.wg.base import WgDeviceState, WgPeerConfig, WgPeerState
from wirekube.models import Endpoint, Mesh, MeshSpec, NatType, PeerStatus, RelayMode, RelaySpec, Transport
from wirekube.traversal import pathsm


def test_matrix_relay_peer_points_at_the_proxy_and_direct_peer_gets_short_keepalive() -> None:
    from wirekube.agent import pathstate

    t = traversal(NatType.SYMMETRIC, [peer("sym", NatType.SYMMETRIC, "203.0.113.1"),
                                      peer("cone", NatType.CONE, "203.0.113.2")])
    paths = t.paths()
    assert paths["sym"].transport is Transport.RELAY and str(paths["sym"].endpoint.ip) == "127.0.0.1"
    assert paths["cone"].transport is Transport.DIRECT and paths["cone"].endpoint is None
    assert paths["cone"].keepalive == pathstate.PUNCH_KEEPALIVE  # still opening the path: 1 s
    t._peers["cone"].path = replace(t._peers["cone"].path, established=True)
    assert t.paths()["cone"].keepalive == DIRECT_KEEPALIVE  # proven: the idle heartbeat keeps NATs open
    status = t.decorate(PeerStatus())
    assert status.relay_reasons == {"sym": "peer symmetric and local symmetric"}
    assert status.nat_type is NatType.SYMMETRIC


def test_a_restarted_agent_keeps_an_inherited_proven_direct_session() -> None:
    """kill -9 and restart: the device still holds a direct session the previous agent proved
    (keepalive 25, fresh handshake), so the new agent starts it proven and rewrites nothing; a
    session still being opened (keepalive 1) or a stale one starts unproven (one at a relay proxy:
    see the next test)."""
    import time

    p = peer("cone", NatType.CONE, "203.0.113.2")
    public = Endpoint(ipaddress.ip_address("203.0.113.2"), 51820)
    now = time.time()
    cases = [((public, DIRECT_KEEPALIVE, now - 30), DIRECT_KEEPALIVE, True),
             ((public, 1, now - 30), 1, False),
             ((public, DIRECT_KEEPALIVE, now - 600), 1, False),
             ((public, DIRECT_KEEPALIVE, 0.0), 1, False)]
    for (endpoint, keepalive, handshake), want_keepalive, proven in cases:
        t = traversal(NatType.CONE, [])
        device = WgDeviceState(peers={p.spec.public_key: WgPeerState(
            WgPeerConfig(p.spec.public_key, endpoint, (), keepalive), rx_bytes=5000, last_handshake=handshake)})
        t._engine_state = lambda device=device: device  # type: ignore[misc]
        t._view = replace(t._view, peers={"cone": p})
        t._sync_peers()
        assert t._peers["cone"].path.established is proven, (endpoint, keepalive, handshake)
        assert t.paths()["cone"].keepalive == want_keepalive, (endpoint, keepalive, handshake)


def test_a_restarted_agent_keeps_an_inherited_relayed_session_on_the_relay() -> None:
    """kill -9 or a rolling restart: the device sends to a peer through a loopback proxy that the
    relay path process kept. Before its first STUN round the new agent knows no NAT type, which
    alone would try direct with every peer and move the endpoint off the working proxy (the e2e
    run that caught it saw a restarted symmetric node report its relayed peers as direct). It keeps
    such a session on the relay instead and probes direct at once; the matrix's verdict, once
    known, takes over; with relay.mode never there is no relay to keep."""
    import time

    from wirekube.agent import pathdecisions, pathstate

    sym = peer("sym", NatType.SYMMETRIC, "203.0.113.1")
    cone = peer("cone", NatType.CONE, "203.0.113.2")
    proxy = Endpoint(ipaddress.ip_address("127.0.0.1"), 40001)

    def restarted(local: NatType, mode: RelayMode = RelayMode.AUTO) -> Traversal:
        t = traversal(local, [], mode)
        device = WgDeviceState(peers={p.spec.public_key: WgPeerState(
            WgPeerConfig(p.spec.public_key, proxy, (), pathstate.RELAY_KEEPALIVE), rx_bytes=5000,
            last_handshake=time.time() - 30) for p in (sym, cone)})
        t._engine_state = lambda device=device: device  # type: ignore[misc]
        t._view = replace(t._view, peers={"sym": sym, "cone": cone})
        t._sync_peers()
        for state in t._peers.values():
            state.proxy_port = proxy.port  # as the relay path process answers `ensure` for a kept proxy
        return t

    t = restarted(NatType.UNKNOWN)
    for name in ("sym", "cone"):
        state = t._peers[name]
        assert state.decision.reason == "NAT type not yet known: trying direct"
        assert state.path.transport is Transport.RELAY and not state.path.relay_by_matrix, name
        assert state.path.reason == pathdecisions.INHERITED_RELAY
        assert state.path.next_probe_at <= time.monotonic()  # probed at the first tick
        path = t.paths()[name]
        assert path.transport is Transport.RELAY and path.endpoint is not None and path.endpoint.ip.is_loopback
    assert t.decorate(PeerStatus()).relay_reasons == {"sym": pathdecisions.INHERITED_RELAY,
                                                      "cone": pathdecisions.INHERITED_RELAY}
    # The first STUN round: symmetric. The matrix relays "sym" for good and leaves "cone" to the probes.
    t.discoverer.found = replace(t.discoverer.found, nat=replace(t.discoverer.found.nat, nat_type=NatType.SYMMETRIC))
    t._sync_peers()
    assert t._peers["sym"].path.relay_by_matrix and t._peers["sym"].path.transport is Transport.RELAY
    assert t._peers["cone"].path.transport is Transport.RELAY and not t._peers["cone"].path.relay_by_matrix
    # Known NAT types from the start: the matrix decides; an inherited proxy still keeps "cone" relayed.
    t = restarted(NatType.SYMMETRIC)
    assert t._peers["sym"].path.reason == "peer symmetric and local symmetric"
    assert t._peers["cone"].path.reason == pathdecisions.INHERITED_RELAY
    # relay.mode never: nothing to keep.
    t = restarted(NatType.UNKNOWN, RelayMode.NEVER)
    assert all(s.path.transport is Transport.DIRECT for s in t._peers.values())


def test_same_public_address_uses_the_lan_endpoint() -> None:
    t = traversal(NatType.PORT_RESTRICTED_CONE,
                  [peer("lan", NatType.PORT_RESTRICTED_CONE, "198.51.100.9", host_endpoints=("192.168.1.6:51820",))])
    assert str(t.paths()["lan"].endpoint) == "192.168.1.6:51820"


def engine(key: str, rx: int) -> WgDeviceState:
    return WgDeviceState(peers={key: WgPeerState(WgPeerConfig(key, None, ()), rx_bytes=rx)})


def unanswered(t: Traversal, start: float, end: float, wall: float = 1e9) -> None:
    """The heartbeat thread (every 0.05 s) and the ticker from ``start`` to ``end``, with the peers
    answering nothing."""
    by_ip = {str(p.mesh_ip): n for n, p in t._view.peers.items() if p.mesh_ip is not None}
    for i in range(round((end - start) / 0.05)):
        now = round(start + i * 0.05, 6)
        t.heartbeats_due(now, by_ip, {})
        t.tick(now, wall)


def test_stalled_direct_peer_fails_over_only_when_a_relay_is_up() -> None:
    for relay_up, expected in ((True, Transport.RELAY), (False, Transport.DIRECT)):
        p = peer("cone", NatType.CONE, "203.0.113.2")
        t = traversal(NatType.CONE, [p], relay_up=relay_up)
        key = p.spec.public_key
        rx = {"v": 0}
        t._engine_state = lambda: engine(key, rx["v"])  # type: ignore[method-assign]
        t.tick(0.0, 1e9)
        rx["v"] = 148
        t.tick(0.5, 1e9)  # established
        t.tick(2.4, 1e9)  # silent for 1.9 s, but nothing was asked of the peer: idle, not dead
        assert t.paths()["cone"].transport is Transport.DIRECT
        unanswered(t, 2.45, 2.9)  # a heartbeat, then verification at the active rate from 0.3 s
        assert t.paths()["cone"].transport is Transport.DIRECT, "0.45 s unanswered is not yet a stall"
        switched: list[tuple[str, str]] = []
        t._fast_switch = lambda k, e: switched.append((k, str(e)))
        unanswered(t, 2.9, 3.1)
        assert t.paths()["cone"].transport is expected, relay_up
        # The failover wrote the relay proxy into WireGuard itself, without waiting for a reconcile.
        proxy = f"127.0.0.1:{t._peers['cone'].proxy_port}"
        assert switched == ([(key, proxy)] if relay_up else []), switched


def test_relay_mode_never_keeps_everyone_direct_and_always_relays_everyone() -> None:
    ps = [peer("sym", NatType.SYMMETRIC, "203.0.113.1")]
    assert traversal(NatType.SYMMETRIC, ps, RelayMode.NEVER).paths()["sym"].transport is Transport.DIRECT
    t = traversal(NatType.OPEN, [peer("open", NatType.OPEN, "203.0.113.3")], RelayMode.ALWAYS)
    assert t.paths()["open"].transport is Transport.RELAY
    assert t.decorate(PeerStatus()).relay_reasons == {"open": "relay.mode is always"}


def test_peer_that_roamed_to_our_proxy_is_followed_to_the_relay() -> None:
    p = peer("cone", NatType.CONE, "203.0.113.2")
    t = traversal(NatType.CONE, [p])
    state = t._peers["cone"]
    roamed = Endpoint(ipaddress.ip_address("127.0.0.1"), state.proxy_port)
    t._engine_state = lambda: WgDeviceState(  # type: ignore[method-assign]
        peers={p.spec.public_key: WgPeerState(WgPeerConfig(p.spec.public_key, roamed, ()), rx_bytes=500)})
    t.tick(0.0, 1e9)
    assert t.paths()["cone"].transport is Transport.RELAY
    assert t.decorate(PeerStatus()).relay_reasons == {"cone": "peer switched to relay"}


def test_transport_changes_are_reported_once() -> None:
    p = peer("cone", NatType.CONE, "203.0.113.2")
    t = traversal(NatType.CONE, [p])
    seen: list[tuple[str, str, str, str]] = []
    t._on_transition = lambda *a: seen.append(a)  # type: ignore[assignment]
    key = p.spec.public_key
    rx = {"v": 0}
    t._engine_state = lambda: engine(key, rx["v"])  # type: ignore[method-assign]
    t._report_transitions()
    assert seen == []  # starting direct is not news
    t.tick(0.0, 1e9)
    rx["v"] = 100
    t.tick(0.5, 1e9)
    unanswered(t, 1.0, 2.0, 1_700_000_000)
    t.tick(2.5, 1_700_000_000)
    t.tick(2.6, 1_700_000_000)
    assert seen == [("cone", "direct", "relay", "direct probe failed at 2023-11-14T22:13:20Z")]


def test_relay_pool_keeps_every_address_of_a_name(monkeypatch: Any) -> None:
    import socket as socketmod

    from wirekube.models import HostPort, RelayProvider

    def fake(host: str, port: int, *args: Any) -> list[Any]:
        assert host == "wirekube-relay-pool.wirekube-system.svc"
        return [(2, 1, 6, "", ("10.0.0.7", port)), (2, 1, 6, "", ("10.0.0.5", port)), (2, 1, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(socketmod, "getaddrinfo", fake)
    t = traversal(NatType.OPEN, [])
    mesh = Mesh("default", MeshSpec(relay=RelaySpec(provider=RelayProvider.EXTERNAL,
                                                    external_endpoint=HostPort(
                                                        "wirekube-relay-pool.wirekube-system.svc", 3478))))
    assert t.relay_addresses(mesh) == [("10.0.0.5", 3478), ("10.0.0.7", 3478)]


def test_a_relayed_peer_probing_us_triggers_a_probe_back() -> None:
    import base64

    p = peer("prc", NatType.PORT_RESTRICTED_CONE, "203.0.113.2")
    t = traversal(NatType.PORT_RESTRICTED_CONE, [p])
    state = t._peers["prc"]
    state.path = pathsm.PeerPath.start_relay(0.0, "direct probe failed", by_matrix=False, timing=pathsm.Timing())
    started: list[str] = []
    t._spawn = lambda target, name: started.append(name)  # type: ignore[method-assign]
    t.failover.peer_probed_us(base64.b64decode(p.spec.public_key))
    assert started == ["probe-back-prc"] and state.probing
    t.failover.peer_probed_us(base64.b64decode(p.spec.public_key))  # already probing: no second probe
    assert started == ["probe-back-prc"]


def test_persisting_eperm_is_a_condition_naming_peers_and_ports_and_clears_to_false() -> None:
    from loguru import logger

    t = traversal(NatType.SYMMETRIC, [peer("sym", NatType.SYMMETRIC, "203.0.113.1"),
                                      peer("cone", NatType.CONE, "203.0.113.2")])
    relay = t._relay
    t._peers["cone"].proxy_port, t._peers["sym"].proxy_port = 40001, 40002
    port = 40002
    logs: list[str] = []
    sink = logger.add(lambda m: logs.append(m.record["message"]), level="INFO")
    try:
        quiet = t.decorate(PeerStatus(), now=1_700_000_000)
        assert quiet.conditions == ()  # never had EPERM: no condition at all
        relay.eperm = [port]  # type: ignore[union-attr]
        first = t.decorate(quiet, now=1_700_000_000)
        (c,) = first.conditions
        assert c["type"] == "RelayProxyEPERM" and c["status"] == "True" and c["reason"] == "SendtoEPERM"
        assert f"sym (127.0.0.1:{port})" in c["message"] and "cone" not in c["message"]
        assert c["lastTransitionTime"] == "2023-11-14T22:13:20Z"
        again = t.decorate(first, now=1_700_000_100)  # still failing: same transition time, logged once
        assert again.conditions[0]["lastTransitionTime"] == "2023-11-14T22:13:20Z"
        relay.eperm = []  # type: ignore[union-attr]
        cleared = t.decorate(again, now=1_700_000_200)
        (c,) = cleared.conditions
        assert c["status"] == "False" and c["reason"] == "Recovered"
        assert c["lastTransitionTime"] == "2023-11-14T22:16:40Z"
        t.decorate(cleared, now=1_700_000_300)
    finally:
        logger.remove(sink)
    assert [m for m in logs if "EPERM" in m] == [f"relay proxy EPERM persists on sym:{port}",
                                                 "relay proxy EPERM cleared"]


def test_relay_reasons_name_a_transport_other_than_raw_tcp() -> None:
    t = traversal(NatType.SYMMETRIC, [peer("sym", NatType.SYMMETRIC, "203.0.113.1")])
    assert t.decorate(PeerStatus()).relay_reasons["sym"] == "peer symmetric and local symmetric"
    t._relay.over = "wss via proxy 198.18.0.9:3128"  # type: ignore[union-attr]
    assert t.decorate(PeerStatus()).relay_reasons["sym"] == (
        "peer symmetric and local symmetric (relay over wss via proxy 198.18.0.9:3128)")


def test_an_unreachable_relay_is_a_condition_and_one_log_line_until_it_is_back() -> None:
    from loguru import logger

    t = traversal(NatType.SYMMETRIC, [peer("sym", NatType.SYMMETRIC, "203.0.113.1")], relay_up=False)
    relay = t._relay
    logs: list[str] = []
    sink = logger.add(lambda m: logs.append(m.record["message"]), level="INFO")
    try:
        assert t.decorate(PeerStatus(), now=1_700_000_000).conditions == ()
        message = ("tcp://198.18.0.2:3478: proxy 198.18.0.9:3128 refused the proxy credentials for CONNECT "
                   "198.18.0.2:3478: 407 Proxy Authentication Required")
        relay.failure = ("ProxyAuthenticationFailed", message)  # type: ignore[union-attr]
        first = t.decorate(PeerStatus(), now=1_700_000_000)
        (c,) = first.conditions
        assert (c["type"], c["status"], c["reason"], c["message"]) == (
            "RelayUnreachable", "True", "ProxyAuthenticationFailed", message)
        t.decorate(first, now=1_700_000_010)
        relay.failure, relay.up, relay.over = None, True, "wss"  # type: ignore[union-attr]
        back = t.decorate(first, now=1_700_000_020)
        (c,) = back.conditions
        assert (c["status"], c["reason"], c["message"]) == ("False", "Connected", "relay connected over wss")
    finally:
        logger.remove(sink)
    assert [m for m in logs if "relay" in m and "reachable" in m] == [
        f"relay unreachable (ProxyAuthenticationFailed): {message}", "relay reachable again"]


def test_eperm_condition_keeps_other_conditions() -> None:
    t = traversal(NatType.SYMMETRIC, [peer("sym", NatType.SYMMETRIC, "203.0.113.1")])
    other = {"type": "Zeta", "status": "True", "reason": "X", "message": "",
             "lastTransitionTime": "2024-01-01T00:00:00Z"}
    t._relay.eperm = [t._peers["sym"].proxy_port]  # type: ignore[union-attr]
    out = t.decorate(PeerStatus(conditions=(other,)), now=1_700_000_000)
    assert [c["type"] for c in out.conditions] == ["RelayProxyEPERM", "Zeta"] and out.conditions[1] == other


def test_eperm_read_racing_a_new_proxy_keeps_the_last_answer() -> None:
    t = traversal(NatType.SYMMETRIC, [peer("sym", NatType.SYMMETRIC, "203.0.113.1")])
    relay = t._relay
    port = t._peers["sym"].proxy_port
    relay.eperm = [port]  # type: ignore[union-attr]
    assert t.decorate(PeerStatus(), now=1_700_000_000).conditions[0]["status"] == "True"

    def racing() -> list[int]:
        raise RuntimeError("dictionary changed size during iteration")

    relay.eperm_active = racing  # type: ignore[union-attr,method-assign]
    (c,) = t.decorate(PeerStatus(), now=1_700_000_001).conditions
    assert c["status"] == "True" and str(port) in c["message"]


def test_ticker_survives_an_unreadable_engine() -> None:
    """wireguard-go's UAPI socket is missing while it (re)starts: that tick fails, the ticker lives on."""
    import threading

    from tests.fixtures.wait import wait_for
    from wirekube.agent.traversal import TraversalSettings
    from wirekube.errors import DataplaneError

    calls: list[int] = []

    def engine_state() -> None:
        calls.append(1)
        if len(calls) <= 3:
            raise DataplaneError("cannot connect to /var/run/wireguard/wire_kube.sock: No such file or directory")

    t = Traversal("me", X25519PrivateKey.generate(), public_key(), engine_state=engine_state, wake=lambda: None,
                  settings=TraversalSettings(tick=0.01))
    runner = threading.Thread(target=t.failover.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: len(calls) >= 6, 10, "ticks after the engine came back")
        assert runner.is_alive()
    finally:
        t._stop.set()
        runner.join(5)


def test_our_own_move_back_to_direct_is_not_mistaken_for_the_peer_going_to_the_relay() -> None:
    """Found with agents in emulated VMs: right after a direct probe succeeded, WireGuard's endpoint
    still pointed at our relay proxy until our reconcile pass rewrote it, so the next tick 'followed
    the peer to the relay', and the pair flapped between relay and direct every retry interval."""
    import time as time_mod

    p = peer("cone", NatType.CONE, "203.0.113.2")
    t = traversal(NatType.CONE, [p])
    state = t._peers["cone"]
    key = p.spec.public_key
    proxy = Endpoint(ipaddress.ip_address("127.0.0.1"), state.proxy_port)
    seen = {"endpoint": proxy}
    t._engine_state = lambda: WgDeviceState(  # type: ignore[method-assign]
        peers={key: WgPeerState(WgPeerConfig(key, seen["endpoint"], ()), rx_bytes=500)})
    state.path = pathsm.follow_to_relay(state.path, time_mod.monotonic(), t._timing(t._view.mesh))  # type: ignore[arg-type]
    assert t.paths()["cone"].transport is Transport.RELAY

    class Listener:
        def ping(self, *_: Any) -> bool:
            return True

    t._listener = Listener()  # type: ignore[assignment]
    t.failover.probe("cone")
    assert t.paths()["cone"].transport is Transport.DIRECT
    t.tick(time_mod.monotonic(), 1e9)  # endpoint still at our proxy: our own lag
    assert t.paths()["cone"].transport is Transport.DIRECT
    seen["endpoint"] = p.spec.endpoint  # type: ignore[assignment]  # reconcile wrote the direct endpoint
    t.tick(time_mod.monotonic(), 1e9)
    assert t.paths()["cone"].transport is Transport.DIRECT
    seen["endpoint"] = proxy  # now the peer's packets come through the relay: follow it
    t.tick(time_mod.monotonic(), 1e9)
    assert t.paths()["cone"].transport is Transport.RELAY


def test_a_stale_proxy_endpoint_is_followed_after_the_grace_period() -> None:
    from wirekube.agent import failover

    p = peer("cone", NatType.CONE, "203.0.113.2")
    t = traversal(NatType.CONE, [p])
    state = t._peers["cone"]
    key = p.spec.public_key
    proxy = Endpoint(ipaddress.ip_address("127.0.0.1"), state.proxy_port)
    t._engine_state = lambda: WgDeviceState(  # type: ignore[method-assign]
        peers={key: WgPeerState(WgPeerConfig(key, proxy, ()), rx_bytes=500)})
    state.awaiting_direct_since = 100.0
    t.tick(100.0 + failover.DIRECT_WRITE_GRACE_SECONDS / 2, 1e9)
    assert t.paths()["cone"].transport is Transport.DIRECT
    t.tick(100.0 + failover.DIRECT_WRITE_GRACE_SECONDS + 1, 1e9)
    assert t.paths()["cone"].transport is Transport.RELAY


def test_a_relayed_peer_that_reaches_us_directly_makes_us_probe_at_once() -> None:
    """Two agents whose retry timers are out of phase chased each other: each came back to direct
    alone and followed the other to the relay again.  A peer seen directly (WireGuard roamed off
    our proxy) is probed at once, at most every ROAM_PROBE_MIN_INTERVAL_SECONDS."""
    import time as time_mod

    from wirekube.agent import failover

    p = peer("cone", NatType.CONE, "203.0.113.2")
    t = traversal(NatType.CONE, [p])
    state = t._peers["cone"]
    key = p.spec.public_key
    proxy = Endpoint(ipaddress.ip_address("127.0.0.1"), state.proxy_port)
    seen = {"endpoint": proxy}
    t._engine_state = lambda: WgDeviceState(  # type: ignore[method-assign]
        peers={key: WgPeerState(WgPeerConfig(key, seen["endpoint"], ()), rx_bytes=500)})
    now = time_mod.monotonic()
    state.path = pathsm.follow_to_relay(state.path, now, t._timing(t._view.mesh))  # type: ignore[arg-type]
    answers: list[bool] = []
    targets: list[tuple[str, int]] = []

    class Listener:
        def ping(self, _key: Any, ip: str, port: int) -> bool:
            answers.append(True)
            targets.append((ip, port))
            return True

    t._listener = Listener()  # type: ignore[assignment]
    t._spawn = lambda target, name: target()  # type: ignore[method-assign]
    t.tick(now + 0.1, 1e9)  # still at our proxy: nothing before the retry interval
    assert answers == [] and t.paths()["cone"].transport is Transport.RELAY
    # The peer's packets arrive directly, from a port its published endpoint does not name (a
    # symmetric NAT's mapping for us): the probe goes where they came from.
    seen["endpoint"] = Endpoint(ipaddress.ip_address("203.0.113.2"), 40123)
    t.tick(now + 0.2, 1e9)
    assert answers == [True] and t.paths()["cone"].transport is Transport.DIRECT
    assert targets == [("203.0.113.2", 40123)]
    state.path = pathsm.follow_to_relay(state.path, now + 0.3, t._timing(t._view.mesh))  # type: ignore[arg-type]
    t.tick(now + 0.4, 1e9)  # rate limited
    assert answers == [True]
    t.tick(now + 0.3 + failover.ROAM_PROBE_MIN_INTERVAL_SECONDS, 1e9)
    assert answers == [True, True]


def test_an_inconclusive_nat_probe_keeps_the_last_conclusive_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay rollout makes the relay's unsolicited probe inconclusive for a while: the node stays
    port-restricted (same mapping) instead of flapping to cone; a new mapping is classified afresh."""
    from wirekube.traversal import rawudp
    from wirekube.traversal.nat import StunSample

    t = traversal(NatType.UNKNOWN, [])
    mesh = t._view.mesh
    assert mesh is not None
    t._wake = lambda: None  # type: ignore[method-assign]
    mapped = {"ip": "198.51.100.20"}
    monkeypatch.setattr(rawudp, "resolve", lambda servers: [rawudp.StunTarget("a", "198.18.0.2", 3478)] * 2)
    monkeypatch.setattr(rawudp, "stun_probe", lambda targets, port, timeout: [
        StunSample("a", mapped["ip"], 40001), StunSample("b", mapped["ip"], 40001)])
    t.stun_servers = lambda m: ["198.18.0.2:3478", "198.18.0.3:3478"]  # type: ignore[method-assign]
    probe: dict[str, bool | None] = {"v": False}
    t.discoverer.nat_probe = lambda first: probe["v"]  # type: ignore[method-assign]
    assert t.discover(mesh, ("192.168.1.5",)).nat.nat_type is NatType.PORT_RESTRICTED_CONE
    probe["v"] = None  # relay connection gone: no probe possible
    assert t.discover(mesh, ("192.168.1.5",)).nat.nat_type is NatType.PORT_RESTRICTED_CONE
    mapped["ip"] = "198.51.100.21"  # a new mapping: nothing to carry over
    assert t.discover(mesh, ("192.168.1.5",)).nat.nat_type is NatType.CONE
    probe["v"] = True
    assert t.discover(mesh, ("192.168.1.5",)).nat.nat_type is NatType.CONE


def test_a_relay_outage_keeps_the_nat_finding_and_endpoint_and_retries_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every relay replica down (the relays are the STUN servers): no STUN answer and no relay
    connection say nothing new, so the node keeps its NAT type and endpoint (publishing unknown
    would flip every peer's path) and tries again within seconds, not a whole stun_interval.
    A STUN silence while the relay's TCP port answers is news: UDP-blocked, type unknown."""
    from wirekube.traversal import rawudp
    from wirekube.traversal.nat import StunSample

    t = traversal(NatType.UNKNOWN, [])
    mesh = t._view.mesh
    assert mesh is not None
    t._wake = lambda: None  # type: ignore[method-assign]
    answers: list[StunSample] = [StunSample("a", "198.51.100.20", 40001), StunSample("b", "198.51.100.20", 40001)]
    monkeypatch.setattr(rawudp, "resolve", lambda servers: [rawudp.StunTarget("a", "198.18.0.2", 3478)] * 2)
    monkeypatch.setattr(rawudp, "stun_probe", lambda targets, port, timeout: list(answers))
    t.stun_servers = lambda m: ["198.18.0.2:3478", "198.18.0.3:3478"]  # type: ignore[method-assign]
    t.discoverer.nat_probe = lambda first: False if answers else None  # type: ignore[method-assign]
    found = t.discover(mesh, ("192.168.1.5",))
    assert found.nat.nat_type is NatType.PORT_RESTRICTED_CONE and t.discoverer.retry == 0.0
    answers.clear()
    t._relay = FakeRelay(False)  # type: ignore[assignment]
    outage = t.discover(mesh, ("192.168.1.5",))
    assert outage.nat == found.nat and outage.endpoint == found.endpoint and not outage.udp_blocked
    assert 0 < t.discoverer.retry < t.settings.stun_interval
    first_retry = t.discoverer.retry
    t.discover(mesh, ("192.168.1.5",))
    assert first_retry < t.discoverer.retry <= t.settings.stun_interval  # backs off
    answers.append(StunSample("a", "198.51.100.20", 40001))  # one replica back: one answer, same mapping
    assert t.discover(mesh, ("192.168.1.5",)).nat.nat_type is NatType.PORT_RESTRICTED_CONE
    answers.append(StunSample("b", "198.51.100.20", 40001))
    assert t.discover(mesh, ("192.168.1.5",)).nat.nat_type is NatType.PORT_RESTRICTED_CONE
    assert t.discoverer.retry == 0.0  # conclusive again: back to the normal interval
    answers.clear()
    t._relay = FakeRelay(True)  # relay over TCP fine, STUN silent: UDP is blocked here
    blocked = t.discover(mesh, ("192.168.1.5",))
    assert blocked.udp_blocked and blocked.nat.nat_type is NatType.UNKNOWN and blocked.endpoint is None


def test_heartbeats_are_fast_only_where_a_path_is_being_proven() -> None:
    """relay.mode auto: an unproven direct peer gets 10/s until it answers; never/always: nothing
    is proven or failed over, so every peer gets the idle rate (one per 10 s)."""
    for mode, expected in ((RelayMode.AUTO, 10), (RelayMode.NEVER, 1), (RelayMode.ALWAYS, 1)):
        p = peer("cone", NatType.CONE, "203.0.113.2")
        t = traversal(NatType.CONE, [p], mode)
        by_ip = {str(p.mesh_ip): "cone"}
        sent = sum(len(t.heartbeats_due(round(i * 0.05, 6), by_ip, {})) for i in range(20))  # 1 s
        assert sent == expected, (mode, sent)
