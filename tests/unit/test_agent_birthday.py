"""The agent's birthday-attack wiring: decisions, a round driven by the ticker, the won path, failure."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from tests.fixtures.wait import wait_for
from tests.unit.traversal_fixtures import peer, traversal
from wirekube.agent.birthdayrounds import BIRTHDAY_PENDING
from wirekube.agent.wg.base import WgDeviceState, WgPeerConfig, WgPeerState
from wirekube.models import (
    ANNOTATION_BIRTHDAY,
    BirthdayRound,
    Mesh,
    MeshSpec,
    NatType,
    Peer,
    PeerStatus,
    RelaySpec,
    Toggle,
    Transport,
)
from wirekube.traversal import birthday, birthdaypath
from wirekube.traversal.birthday import Phase

RETRY = 30


def mesh(enabled: bool) -> Mesh:
    return Mesh("default", MeshSpec(birthday_attack=Toggle.ENABLED if enabled else Toggle.DISABLED,
                                    relay=RelaySpec(handshake_timeout_seconds=30, direct_retry_interval_seconds=RETRY)))


def sym(name: str, **kw: Any) -> Peer:
    p = peer(name, NatType.SYMMETRIC, "203.0.113.1", **kw)
    return p


def with_mesh(t: Any, m: Mesh, own: Peer | None = None) -> None:
    t._view.mesh = m
    t._view.own = own
    t._sync_peers()


@pytest.mark.parametrize(("mesh_on", "own_ann", "peer_ann", "on"), [
    (False, "", "", False), (True, "", "", True), (False, "enabled", "", True), (False, "", "enabled", True),
    (True, "disabled", "", False), (True, "", "disabled", False), (False, "enabled", "disabled", False),
])
def test_birthday_is_decided_for_the_pair(mesh_on: bool, own_ann: str, peer_ann: str, on: bool) -> None:
    b = sym("b")
    if peer_ann:
        b = Peer(b.name, b.spec, b.status, annotations={ANNOTATION_BIRTHDAY: peer_ann})
    own = Peer("me", b.spec, annotations={ANNOTATION_BIRTHDAY: own_ann} if own_ann else {})
    t = traversal(NatType.SYMMETRIC, [b])
    with_mesh(t, mesh(mesh_on), own)
    reasons = t.decorate(PeerStatus()).relay_reasons
    assert t.paths()["b"].transport is Transport.RELAY  # relayed while (and unless) a round wins
    if on:
        assert reasons == {"b": BIRTHDAY_PENDING} and "b" in t.birthdays.sessions
    else:
        assert reasons == {"b": "peer symmetric and local symmetric"} and t.birthdays.sessions == {}


def test_birthday_only_for_symmetric_pairs() -> None:
    t = traversal(NatType.SYMMETRIC, [peer("prc", NatType.PORT_RESTRICTED_CONE, "203.0.113.2")])
    with_mesh(t, mesh(True))
    assert t.birthdays.sessions == {} and t.decorate(PeerStatus()).relay_reasons == {
        "prc": "peer port-restricted cone and local symmetric"}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    th = threading.Thread(target=lp.run_forever, daemon=True)
    th.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    th.join(5)
    lp.close()


def leader_round(t: Any, monkeypatch: Any, won: bool, loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
    """Drive one round of "me" (leader: "me" < "peer-b") with fake measurement and probing."""
    b = sym("peer-b")
    t._view.peers = {"peer-b": b}
    t._peers.clear()
    with_mesh(t, mesh(True))
    t._peers["peer-b"].proxy_port = 40123  # as if the relay path had opened its proxy
    t._loop = loop
    spawned: list[threading.Thread] = []
    t._spawn = lambda target, name: spawned.append(threading.Thread(target=target, name=name)) or spawned[-1].start()
    monkeypatch.setattr(birthdaypath, "measure_ports", lambda targets, n, timeout: [20011, 20200, 20090])
    t.stun_servers = lambda m: []
    won_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    won_sock.bind(("127.0.0.1", 0))
    seen: dict[str, Any] = {}

    def fake_run(self: birthdaypath.Prober, start_at: float) -> birthdaypath.ProbeResult:
        seen.update(start=start_at, targets=self.targets, leader=self.leader, round=self.round, ip=self.peer_ip)
        self.stats.sockets, self.stats.flows, self.stats.probes_sent = 64, 512, 1024
        if won:
            return birthdaypath.ProbeResult(True, self.stats, won_sock, ("203.0.113.1", 20150))
        won_sock.close()
        return birthdaypath.ProbeResult(False, self.stats, detail="no aligned flow")

    monkeypatch.setattr(birthdaypath.Prober, "run", fake_run)
    wall = 1_700_000_000.0
    t.tick(1.0, wall)
    assert [th.name for th in spawned] == ["birthday-peer-b"]
    wait_for(lambda: t.birthdays.sessions["peer-b"].session.phase is Phase.PROPOSED, 5, "the leader's proposal")
    entry = t.decorate(PeerStatus()).birthday["peer-b"]
    assert (entry.round, entry.port_min, entry.port_max) == (1, 20011, 20200)
    # The peer joins (its status echoes round and notBefore with its own window).
    joined = Peer(b.name, b.spec, PeerStatus(nat_type=NatType.SYMMETRIC, birthday={
        "me": BirthdayRound(1, entry.not_before, 30000, 30255)}))
    t._view.peers = {"peer-b": joined}
    start = birthday.parse_stamp(entry.not_before)
    t.tick(2.0, start - 0.5)
    assert t.birthdays.sessions["peer-b"].session.phase is Phase.ARMED
    t.tick(3.0, start)
    wait_for(lambda: not t.birthdays.sessions["peer-b"].busy, 5, "the round to finish")
    assert seen["start"] == start and seen["leader"] is True and seen["ip"] == "203.0.113.1"
    aimed = {p for ports in seen["targets"] for p in ports}
    assert aimed == set(range(30000, 30256))  # the peer's published window, all 256 ports
    return t, won_sock


def test_a_won_round_moves_the_peer_onto_the_won_proxy_and_a_stall_hands_it_back(monkeypatch: Any,
                                                                              loop: asyncio.AbstractEventLoop) -> None:
    t = traversal(NatType.SYMMETRIC, [])
    t, won_sock = leader_round(t, monkeypatch, True, loop)
    bd = t.birthdays.sessions["peer-b"]
    assert bd.session.phase is Phase.WON and bd.proxy_port == won_sock.getsockname()[1]
    path = t.paths()["peer-b"]
    assert path.transport is Transport.DIRECT and str(path.endpoint) == f"127.0.0.1:{bd.proxy_port}"
    status = t.decorate(PeerStatus())
    assert status.birthday == {} and "peer-b" not in status.relay_reasons
    # The won path stops receiving: failover to the relay, the proxy closes, a new round later.
    key = t._peers["peer-b"].key
    t._engine_state = lambda: WgDeviceState(peers={key: WgPeerState(WgPeerConfig(key, path.endpoint, ()), rx_bytes=9)})
    import time as _time

    now = _time.monotonic()
    t.tick(now, 1_700_000_100.0)
    # Heartbeats went out and none came back (see test_agent_traversal for the heartbeat side).
    t._peers["peer-b"].live = replace(t._peers["peer-b"].live, suspect_since=now + 0.1, unanswered=3)
    t.tick(now + 5, 1_700_000_105.0)
    assert t.paths()["peer-b"].transport is Transport.RELAY and str(t.paths()["peer-b"].endpoint) == "127.0.0.1:40123"
    assert bd.proxy is None and bd.session.phase is Phase.IDLE
    assert bd.session.next_attempt_at == 1_700_000_105.0 + RETRY
    wait_for(lambda: won_sock.fileno() == -1, 5, "the won socket to be closed")
    assert t._peers["peer-b"].path.relay_by_matrix  # no plain direct probes: rounds do the retrying


def test_a_failed_round_keeps_the_relay_with_the_reason_and_the_retry_interval(monkeypatch: Any,
                                                                               loop: asyncio.AbstractEventLoop) -> None:
    import time as _time

    t = traversal(NatType.SYMMETRIC, [])
    before = _time.time()
    t, _ = leader_round(t, monkeypatch, False, loop)
    bd = t.birthdays.sessions["peer-b"]
    reason = t.decorate(PeerStatus()).relay_reasons["peer-b"]
    assert reason.startswith("birthday attack failed at ") and "round 1: no aligned flow, 512 flows" in reason
    assert "estimated success" in reason and t.paths()["peer-b"].transport is Transport.RELAY
    assert bd.session.phase is Phase.IDLE and bd.session.next_attempt_at >= before + RETRY
    t.tick(10.0, bd.session.next_attempt_at - 1)  # no new round before the retry interval
    assert bd.session.phase is Phase.IDLE and not bd.busy



def test_relay_roam_right_after_a_win_is_the_peer_still_switching_not_a_fallback(monkeypatch: Any,
                                                                               loop: asyncio.AbstractEventLoop) -> None:
    from wirekube.agent.birthdayrounds import BIRTHDAY_SETTLE_SECONDS
    from wirekube.models import Endpoint

    t = traversal(NatType.SYMMETRIC, [])
    t, _ = leader_round(t, monkeypatch, True, loop)
    bd = t.birthdays.sessions["peer-b"]
    key = t._peers["peer-b"].key
    relay_proxy = Endpoint(ipaddress.ip_address("127.0.0.1"), 40123)
    rx = {"v": 100}
    t._engine_state = lambda: WgDeviceState(peers={key: WgPeerState(WgPeerConfig(key, relay_proxy, ()),
                                                                     rx_bytes=rx["v"])})
    switched: list[tuple[str, Endpoint]] = []
    t._fast_switch = lambda k, ep: switched.append((k, ep))
    now = bd.won_at
    for dt in (0.1, 1.0, BIRTHDAY_SETTLE_SECONDS - 0.5):  # the follower has not switched yet
        rx["v"] += 100
        t.tick(now + dt, 1_700_000_000.0)
        assert t.paths()["peer-b"].transport is Transport.DIRECT and bd.session.phase is Phase.WON
        # each time, our WireGuard is pointed back at the won path at once (a late relayed packet
        # roamed it; left there, each side would follow the other back to the relay)
        assert switched[-1] == (key, Endpoint(ipaddress.ip_address("127.0.0.1"), bd.proxy_port))
    assert len(switched) == 3
    rx["v"] += 100
    t.tick(now + BIRTHDAY_SETTLE_SECONDS + 0.1, 1_700_000_010.0)  # still on the relay: it fell back
    assert t.paths()["peer-b"].transport is Transport.RELAY and bd.session.phase is Phase.IDLE
    assert bd.session.next_attempt_at == 1_700_000_010.0 + RETRY and bd.proxy is None

