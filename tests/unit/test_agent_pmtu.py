"""The agent's path MTU glue (issue 18): packets, targets, and what the planner and status get."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from tests.unit.plan_fixtures import ME, mesh, peer
from wirekube.agent import pmtu as agent_pmtu
from wirekube.agent.plan import PeerPath
from wirekube.agent.pmtu import PathMtu, Target, echo_request, mss_ruleset, parse_echo_reply, targets_from
from wirekube.agent.wg.base import WgDeviceState, WgPeerConfig, WgPeerState
from wirekube.models import Endpoint, PeerStatus, Transport
from wirekube.traversal import pmtu, rawudp

A, B = peer("a", 2), peer("b", 3)


def test_echo_sizes_and_replies() -> None:
    packet = echo_request(7, 9, 1220)
    assert len(packet) + 20 == 1220 and rawudp.checksum(packet) == 0
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1220, 0, 0, 64, 1, 0, bytes([10, 255, 0, 2]), bytes([10, 255, 0, 1]))
    reply = ip + bytes([0, 0]) + packet[2:]
    assert parse_echo_reply(reply) == ("10.255.0.2", 7, 9, 1220)
    assert parse_echo_reply(ip + packet) is None  # a request, not a reply
    assert parse_echo_reply(b"\x45" + b"\0" * 10) is None
    assert 'oifname "wire_kube" tcp flags syn / syn,rst tcp option maxseg size set rt mtu' in mss_ruleset("wire_kube")


class Snap:
    def __init__(self, m: Any, peers: tuple[Any, ...]) -> None:
        self.mesh, self.peers = m, peers


def wg_with(*peers: Any) -> WgDeviceState:
    return WgDeviceState(peers={p.spec.public_key: WgPeerState(WgPeerConfig(p.spec.public_key, p.spec.endpoint, ()),
                                                               last_handshake=1.0)
                                for p in peers})


def test_targets_are_the_direct_peers_with_an_endpoint_and_none_when_the_mtu_is_fixed() -> None:
    from dataclasses import replace
    m = mesh()
    snap = Snap(m, (ME, A, B))
    got = targets_from(snap, wg_with(A, B), {"b": PeerPath(transport=Transport.RELAY)}, "me")
    assert got is not None and list(got) == ["a"]
    assert got["a"] == Target(str(A.spec.allowed_ips[0].network_address), str(A.spec.endpoint), 1420, 60)
    assert targets_from(Snap(replace(m, spec=replace(m.spec, path_mtu=False)), (ME, A)), wg_with(A), {}, "me") is None
    assert targets_from(None, None, {}, "me") == {}
    v6 = replace(A, spec=replace(A.spec, endpoint=Endpoint.parse("[2001:db8::1]:51820")))
    got6 = targets_from(Snap(m, (ME, v6)), wg_with(v6), {}, "me")
    assert got6 is not None and got6["a"].overhead == 80
    quiet = targets_from(snap, wg_with(A, B), {}, "me", active=lambda name: name != "a")
    assert quiet is not None and not quiet["a"].active and quiet["b"].active  # traversal's liveness decides


class FakeProber:
    """A path that passes inner packets up to ``limit[address]`` bytes."""

    def __init__(self, limit: dict[str, int]) -> None:
        self.limit = limit
        self.rounds = 0

    def round(self, probes: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        self.rounds += 1
        return {(a, s) for a, s in probes if s <= self.limit.get(a, 0)}

    def close(self) -> None:
        pass


def test_a_shrunk_path_is_found_applied_published_and_rechecked(monkeypatch: Any) -> None:
    monkeypatch.setattr(agent_pmtu.nftables, "run", lambda text: None)
    targets = {"a": Target("10.255.0.2", "198.18.1.2:51820", 1420),
               "b": Target("10.255.0.3", "198.19.1.10:51820", 1420)}
    wakes: list[int] = []
    svc = PathMtu(lambda: targets, lambda: wakes.append(1), ifname=lambda: "wire_kube",
                  timing=pmtu.Timing(check_every=5, check_failures=2))
    prober = FakeProber({"10.255.0.2": 1220, "10.255.0.3": 1420})
    now = 0.0
    for _ in range(12):  # a size below the full one is searched twice (confirmed)
        svc.step(prober, now)
    assert svc.measured() == {"a": 1220, "b": 1420} and wakes
    inner = {"a": PeerPath(transport=Transport.DIRECT), "b": PeerPath(transport=Transport.DIRECT)}
    paths = svc.wrap(lambda: inner)()
    assert paths["a"].mtu == 1220 and paths["b"].mtu is None  # b gets the interface's 1420
    assert svc.decorate(PeerStatus()).path_mtu == {"a": 1220}
    # The path to b shrinks: two failed checks, then a new search, within a few checks.
    prober.limit["10.255.0.3"] = 1300
    for t in range(6, 40):
        svc.step(prober, float(t))
        if svc.measured().get("b") == 1300:
            break
    assert svc.measured()["b"] == 1300 and t <= 30
    assert svc.wrap(lambda: {"b": PeerPath(transport=Transport.RELAY)})()["b"].mtu is None  # relayed: full size


def test_a_one_shot_keeps_the_published_path_mtu() -> None:
    from dataclasses import replace

    from tests.unit.once_fixtures import DIRECT, PEERS, SELF
    from tests.unit.once_fixtures import mesh as once_mesh
    from wirekube.agent.main import once_paths
    from wirekube.models import RelayMode
    me = replace(SELF, status=replace(SELF.status, path_mtu={"b": 1216}))
    peers = (me, *[p for p in PEERS if p.name != "a"])
    paths = once_paths(once_mesh(RelayMode.AUTO), peers, "a", WgDeviceState(), lambda ep: False)
    assert paths[DIRECT.name].mtu == 1216 and paths["c"].mtu is None
    fixed = once_mesh(RelayMode.AUTO)
    fixed = replace(fixed, spec=replace(fixed.spec, path_mtu=False))
    assert once_paths(fixed, peers, "a", WgDeviceState(), lambda ep: False)[DIRECT.name].mtu is None


class LossyOnce(FakeProber):
    """Loses every answer of the first search's later rounds: that search ends too low."""

    def round(self, probes: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        got = super().round(probes)
        return got if self.rounds != 2 else set()


def test_a_low_answer_is_confirmed_and_the_larger_wins(monkeypatch: Any) -> None:
    monkeypatch.setattr(agent_pmtu.nftables, "run", lambda text: None)
    targets = {"a": Target("10.255.0.2", "198.18.1.2:51820", 1420)}
    svc = PathMtu(lambda: targets, lambda: None, ifname=lambda: "wire_kube")
    prober = LossyOnce({"10.255.0.2": 1216})
    for _ in range(12):
        svc.step(prober, 0.0)
    assert svc.measured() == {"a": 1216}
