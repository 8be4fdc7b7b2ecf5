from __future__ import annotations

import pytest

from wirekube.models import NatType, RelayMode, Transport
from wirekube.traversal import nat, pathsm
from wirekube.traversal.nat import NodeFacts, Path, StunSample

LOCAL = ["192.168.1.10", "203.0.113.5"]


def s(server: str, ip: str, port: int) -> StunSample:
    return StunSample(server, ip, port)


@pytest.mark.parametrize(
    ("samples", "probe", "expected"),
    [
        ([s("a:3478", "203.0.113.5", 51820), s("b:3478", "203.0.113.5", 51820)], None, NatType.OPEN),
        ([s("a:3478", "198.51.100.1", 51820), s("b:3478", "198.51.100.1", 51820)], True, NatType.CONE),
        ([s("a:3478", "198.51.100.1", 51820), s("b:3478", "198.51.100.1", 51820)], None, NatType.CONE),
        ([s("a:3478", "198.51.100.1", 51820), s("b:3478", "198.51.100.1", 51820)], False,
         NatType.PORT_RESTRICTED_CONE),
        ([s("a:3478", "198.51.100.1", 40001), s("b:3478", "198.51.100.1", 40003)], None, NatType.SYMMETRIC),
        ([s("a:3478", "198.51.100.1", 40001), s("b:3478", "198.51.100.2", 40001)], None, NatType.SYMMETRIC),
        ([s("a:3478", "198.51.100.1", 51820)], None, NatType.UNKNOWN),
        ([s("a:3478", "198.51.100.1", 51820), s("a:3478", "198.51.100.1", 51821)], None, NatType.UNKNOWN),
        ([], None, NatType.UNKNOWN),
    ],
)
def test_classify(samples: list[StunSample], probe: bool | None, expected: NatType) -> None:
    assert nat.classify(samples, 51820, LOCAL, unsolicited_probe_received=probe).nat_type is expected


def test_public_ip_but_translated_port_is_not_open() -> None:
    c = nat.classify([s("a:1", "203.0.113.5", 40000), s("b:1", "203.0.113.5", 40000)], 51820, LOCAL)
    assert c.nat_type is NatType.CONE


def test_symmetric_records_port_step() -> None:
    c = nat.classify([s("a:1", "198.51.100.1", 40001), s("b:1", "198.51.100.1", 40003),
                      s("c:1", "198.51.100.1", 40005)], 51820, LOCAL)
    assert c.port_step == 2 and c.public_port == 40001


def test_port_step_random_allocator_is_zero() -> None:
    assert nat.port_step([40001, 12000, 61000, 33000]) == 0
    assert nat.port_step([5000, 5000]) == 0
    assert nat.port_step([5000, 5001, 5002]) == 1


def test_predict_ports_nearest_first_and_bounded() -> None:
    ports = nat.predict_ports(40001, 2, 5)
    assert ports == [40003, 40004, 40002, 40005, 40001]
    assert len(nat.predict_ports(65534, 1, 10)) == 10
    assert all(1024 <= p <= 65535 for p in nat.predict_ports(65534, 1, 10))


O, C, P, S, U = NatType.OPEN, NatType.CONE, NatType.PORT_RESTRICTED_CONE, NatType.SYMMETRIC, NatType.UNKNOWN  # noqa: E741 - the table below reads best by initial


@pytest.mark.parametrize(
    ("local", "remote", "path"),
    [
        (O, S, Path.DIRECT), (S, O, Path.DIRECT), (O, P, Path.DIRECT),
        (C, C, Path.DIRECT), (C, P, Path.DIRECT), (S, C, Path.DIRECT), (C, S, Path.DIRECT_WAIT),
        (P, P, Path.DIRECT), (P, S, Path.RELAY), (S, P, Path.RELAY), (S, S, Path.RELAY),
        (U, S, Path.DIRECT),
    ],
)
def test_matrix(local: NatType, remote: NatType, path: Path) -> None:
    d = nat.choose_path(NodeFacts(local, "198.51.100.1"), NodeFacts(remote, "198.51.100.2"),
                        relay_mode=RelayMode.AUTO, birthday=False)
    assert d.path is path
    if path is Path.RELAY:
        assert d.reason.startswith("peer ")


def test_matrix_reasons_and_overrides() -> None:
    sym = NodeFacts(S, "198.51.100.1")
    assert nat.choose_path(sym, NodeFacts(S, "198.51.100.2"), relay_mode=RelayMode.AUTO, birthday=False).reason == \
        "peer symmetric and local symmetric"
    assert nat.choose_path(sym, NodeFacts(S, "198.51.100.2"), relay_mode=RelayMode.AUTO,
                           birthday=True).path is Path.BIRTHDAY
    assert nat.choose_path(NodeFacts(O), NodeFacts(O), relay_mode=RelayMode.ALWAYS, birthday=False).path is Path.RELAY
    assert nat.choose_path(sym, NodeFacts(S), relay_mode=RelayMode.NEVER, birthday=False).path is Path.DIRECT
    blocked = nat.choose_path(NodeFacts(U, udp_blocked=True), NodeFacts(O), relay_mode=RelayMode.AUTO, birthday=False)
    assert blocked.path is Path.RELAY and blocked.reason == "udp blocked (local)"
    same = nat.choose_path(NodeFacts(P, "198.51.100.1"), NodeFacts(P, "198.51.100.1", has_host_endpoint=True),
                           relay_mode=RelayMode.AUTO, birthday=False)
    assert same.path is Path.DIRECT_LAN


T = pathsm.Timing(handshake_timeout=30, stall_after=1.5, direct_retry_interval=120)


def test_direct_established_then_stall_fails_over_within_threshold() -> None:
    st = pathsm.PeerPath.start_direct(0.0)
    st, a = pathsm.tick(st, 0.0, 0, T)
    st, a = pathsm.tick(st, 0.5, 148, T)
    assert st.established and a is pathsm.Action.NONE
    st, a = pathsm.tick(st, 1.5, 296, T)  # keepalive arrives
    st, a = pathsm.tick(st, 2.9, 296, T)  # 1.4 s silent: not yet
    assert a is pathsm.Action.NONE and st.transport is Transport.DIRECT
    st, a = pathsm.tick(st, 3.1, 296, T, wall=1_700_000_000)
    assert a is pathsm.Action.USE_RELAY and st.transport is Transport.RELAY
    assert st.failovers == 1 and 1.5 <= st.last_failover_detect_s < 2.0
    assert st.reason == "direct probe failed at 2023-11-14T22:13:20Z"


def test_no_handshake_goes_relay_after_timeout() -> None:
    st = pathsm.PeerPath.start_direct(0.0)
    st, _ = pathsm.tick(st, 0.0, 0, T)
    st, a = pathsm.tick(st, 29.0, 0, T)
    assert a is pathsm.Action.NONE
    st, a = pathsm.tick(st, 30.0, 0, T)
    assert a is pathsm.Action.USE_RELAY and st.reason == "no direct handshake within 30s" and st.failovers == 0


def test_relayed_peer_probes_on_schedule_and_recovers() -> None:
    st = pathsm.PeerPath.start_relay(0.0, "direct probe failed", by_matrix=False, timing=T)
    st, a = pathsm.tick(st, 119.0, 10, T)
    assert a is pathsm.Action.NONE
    st, a = pathsm.tick(st, 120.0, 20, T)
    assert a is pathsm.Action.PROBE_DIRECT
    st2, a2 = pathsm.probe_result(st, 121.0, ok=False)
    assert a2 is pathsm.Action.NONE and st2.transport is Transport.RELAY
    st, a = pathsm.tick(st2, 200.0, 30, T)
    assert a is pathsm.Action.NONE  # next probe at 240
    st, a = pathsm.tick(st, 240.0, 40, T)
    assert a is pathsm.Action.PROBE_DIRECT
    st, a = pathsm.probe_result(st, 241.0, ok=True)
    assert a is pathsm.Action.USE_DIRECT and st.transport is Transport.DIRECT and st.established


def test_matrix_relay_never_probes() -> None:
    st = pathsm.PeerPath.start_relay(0.0, "peer symmetric and local symmetric", by_matrix=True, timing=T)
    for t in (120.0, 240.0, 10_000.0):
        st, a = pathsm.tick(st, t, 0, T)
        assert a is pathsm.Action.NONE


PRC = nat.Classification(NatType.PORT_RESTRICTED_CONE, "198.51.100.20", 40001)
SAME = [StunSample("a", "198.51.100.20", 40001), StunSample("b", "198.51.100.20", 40001)]


@pytest.mark.parametrize(("fresh", "samples", "probed", "want", "conclusive"), [
    # conclusive rounds replace what was known, whatever it was
    (nat.Classification(NatType.SYMMETRIC, "198.51.100.20", 40001, 1),
     [StunSample("a", "198.51.100.20", 40001), StunSample("b", "198.51.100.20", 40002)], False, "fresh", True),
    (nat.Classification(NatType.CONE, "198.51.100.20", 40001), SAME, True, "fresh", True),
    # the relay's probe impossible, same mapping: the last finding stands
    (nat.Classification(NatType.CONE, "198.51.100.20", 40001), SAME, False, "last", False),
    # nobody answered (every relay replica down): no news
    (nat.Classification(NatType.UNKNOWN), [], False, "last", False),
    # one of two answered, same mapping: no news
    (nat.Classification(NatType.UNKNOWN), SAME[:1], False, "last", False),
    # a new mapping is new information, even when inconclusive
    (nat.Classification(NatType.CONE, "198.51.100.21", 40001),
     [StunSample("a", "198.51.100.21", 40001)] * 2, False, "fresh", False),
    (nat.Classification(NatType.UNKNOWN), [StunSample("a", "198.51.100.21", 40001)], False, "fresh", False),
])
def test_settle_keeps_the_last_finding_only_when_a_round_learned_nothing_new(
        fresh: nat.Classification, samples: list[StunSample], probed: bool, want: str, conclusive: bool) -> None:
    got, was_conclusive = nat.settle(PRC, fresh, samples, probed=probed)
    assert got == (fresh if want == "fresh" else PRC)
    assert was_conclusive is conclusive


def test_settle_with_nothing_known_publishes_the_fresh_round() -> None:
    unknown = nat.Classification(NatType.UNKNOWN)
    cone = nat.Classification(NatType.CONE, "198.51.100.20", 40001)
    assert nat.settle(unknown, cone, SAME, probed=False) == (cone, False)
    assert nat.settle(unknown, unknown, [], probed=False) == (unknown, False)
