"""Gateway peer health (threshold, staleness on an injected clock) and election/handover."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.gateway_fixtures import HC, gateway, peer
from wirekube.gateway.contract import stale_after
from wirekube.gateway.election import HandoverState, elect, handover, update_healthy_since
from wirekube.gateway.health import ReportSeen, Verdict, observe_reports, peer_verdict
from wirekube.models import HealthCheck, HealthReport

HC_ON = gateway(["a"], ["10.100.0.0/16"], health=HC).spec.health_check  # interval 1, timeout 1, threshold 2
HC_OFF = HealthCheck()
OK = Verdict("healthy", "HealthCheckPassing", "ok")
BAD = Verdict("unhealthy", "HealthCheckFailing", "a fails")


def report(failures: int = 0, at: str = "2026-01-01T00:00:00.000001Z") -> HealthReport:
    return HealthReport(last_check=at, consecutive_failures=failures)


# ---- health ------------------------------------------------------------------------------------


def test_stale_after_is_threshold_times_interval_plus_timeout() -> None:
    assert stale_after(HC_ON) == 2 * 1 + 1
    assert stale_after(HealthCheck(enabled=True, target="x", interval_seconds=30, timeout_seconds=5,
                                   failure_threshold=3)) == 95


def test_missing_or_invalid_peer_is_unhealthy() -> None:
    v = peer_verdict("a", None, "", HC_OFF, None, None, 0.0)
    assert (v.state, v.reason) == ("unhealthy", "PeerNotFound")
    v = peer_verdict("a", None, "spec.publicKey: bad", HC_OFF, None, None, 0.0)
    assert v.reason == "PeerInvalid" and "spec.publicKey" in v.message


def test_disconnected_peer_is_unhealthy_even_with_a_passing_check() -> None:
    seen = ReportSeen(("t", 0), 100.0)
    v = peer_verdict("a", peer("a", connected=False), "", HC_ON, report(), seen, 100.0)
    assert v.reason == "PeerNotConnected" and not v.healthy


def test_health_check_disabled_means_connected_is_enough() -> None:
    assert peer_verdict("a", peer("a"), "", HC_OFF, None, None, 0.0).healthy


def test_no_report_yet_is_unknown() -> None:
    v = peer_verdict("a", peer("a"), "", HC_ON, None, None, 0.0)
    assert (v.state, v.reason) == ("unknown", "NoHealthReport")


@pytest.mark.parametrize(("failures", "healthy"), [(0, True), (1, True), (2, False), (7, False)])
def test_failure_threshold_is_honoured(failures: int, healthy: bool) -> None:
    seen = ReportSeen(("t", failures), 100.0)
    v = peer_verdict("a", peer("a"), "", HC_ON, report(failures), seen, 100.5)
    assert v.healthy is healthy
    if not healthy:
        assert v.reason == "HealthCheckFailing" and f"failed {failures} times" in v.message


def test_report_turns_stale_on_the_controller_clock() -> None:
    seen = observe_reports({}, {"a": report()}, now=1000.0)
    p = peer("a")
    assert peer_verdict("a", p, "", HC_ON, report(), seen["a"], 1002.9).healthy
    v = peer_verdict("a", p, "", HC_ON, report(), seen["a"], 1003.0)
    assert (v.state, v.reason) == ("unknown", "HealthReportStale")


def test_unchanged_report_keeps_its_first_seen_time_and_a_new_one_resets_it() -> None:
    first = observe_reports({}, {"a": report(at="t1")}, now=10.0)
    again = observe_reports(first, {"a": report(at="t1")}, now=20.0)
    assert again["a"].seen_at == 10.0  # the agent's heartbeat did not move: no fresher
    newer = observe_reports(again, {"a": report(at="t2")}, now=21.0)
    assert newer["a"].seen_at == 21.0
    assert observe_reports(newer, {}, now=22.0) == {}  # report removed: forgotten


def test_agent_clock_skew_does_not_matter() -> None:
    # lastCheck far in the past (agent clock behind by a day) is fresh when it keeps changing.
    seen = observe_reports({}, {"a": report(at="2020-01-01T00:00:00.000001Z")}, now=5000.0)
    assert peer_verdict("a", peer("a"), "", HC_ON, report(at="2020-01-01T00:00:00.000001Z"), seen["a"], 5001).healthy


# ---- election -----------------------------------------------------------------------------------


def test_first_healthy_entry_of_peer_refs_is_elected() -> None:
    e = elect(["a", "b", "c"], {"a": BAD, "b": OK, "c": OK}, "", {}, 0.0, 30)
    assert (e.target, e.reason) == ("b", "Elected")


def test_failover_from_unhealthy_active_is_immediate() -> None:
    e = elect(["a", "b"], {"a": BAD, "b": OK}, "a", {"b": 99.0}, 100.0, 30)
    assert (e.target, e.reason) == ("b", "Failover")
    assert "a fails" in e.message


def test_no_healthy_peer_keeps_no_target() -> None:
    e = elect(["a", "b"], {"a": BAD, "b": BAD}, "a", {}, 0.0, 30)
    assert (e.target, e.reason) == ("", "NoHealthyPeer")


def test_failback_waits_until_the_preferred_peer_was_healthy_long_enough() -> None:
    verdicts = {"a": OK, "b": OK}
    e = elect(["a", "b"], verdicts, "b", {"a": 100.0, "b": 0.0}, 110.0, 30)
    assert (e.target, e.reason, e.recheck_at) == ("b", "FailbackPending", 130.0)
    e = elect(["a", "b"], verdicts, "b", {"a": 100.0, "b": 0.0}, 130.0, 30)
    assert (e.target, e.reason) == ("a", "Failback")


def test_healthy_since_restarts_after_a_break() -> None:
    since = update_healthy_since({}, {"a": OK}, 10.0)
    since = update_healthy_since(since, {"a": OK}, 20.0)
    assert since == {"a": 10.0}
    since = update_healthy_since(since, {"a": BAD}, 30.0)
    assert update_healthy_since(since, {"a": OK}, 40.0) == {"a": 40.0}


@given(st.lists(st.booleans(), min_size=1, max_size=6), st.integers(min_value=-1, max_value=5))
def test_election_target_is_always_the_first_healthy_unless_failback_pending(health: list[bool], cur: int) -> None:
    names = [f"p{i}" for i in range(len(health))]
    verdicts = {n: OK if h else BAD for n, h in zip(names, health, strict=True)}
    current = names[cur] if 0 <= cur < len(names) else ""
    e = elect(names, verdicts, current, {n: 0.0 for n in names}, 1000.0, 30)
    healthy = [n for n in names if verdicts[n].healthy]
    assert e.target == (healthy[0] if healthy else "")


# ---- handover (make-before-break) --------------------------------------------------------------


def test_handover_prepares_the_new_peer_before_clients_move() -> None:
    step = handover("b", "a", acked=set(), active_healthy=False, memory=HandoverState(), now=100.0, timeout=10)
    assert (step.active, step.pending, step.started, step.switched) == ("a", "b", True, False)
    assert step.recheck_at == 110.0
    step2 = handover("b", "a", acked={"b"}, active_healthy=False, memory=step.state, now=100.4, timeout=10)
    assert (step2.active, step2.pending, step2.switched, step2.forced, step2.started) == ("b", "", True, False, False)


def test_handover_is_forced_after_the_timeout_only_when_the_old_peer_is_unhealthy() -> None:
    state = HandoverState("b", 100.0)
    waiting = handover("b", "a", acked=set(), active_healthy=True, memory=state, now=500.0, timeout=10)
    assert (waiting.active, waiting.pending, waiting.forced) == ("a", "b", False)
    forced = handover("b", "a", acked=set(), active_healthy=False, memory=state, now=110.0, timeout=10)
    assert (forced.active, forced.pending, forced.forced) == ("b", "", True)
    early = handover("b", "a", acked=set(), active_healthy=False, memory=state, now=109.9, timeout=10)
    assert (early.active, early.forced) == ("a", False)


def test_handover_to_another_peer_restarts_the_timer() -> None:
    step = handover("c", "a", acked=set(), active_healthy=False, memory=HandoverState("b", 0.0), now=100.0, timeout=10)
    assert step.state == HandoverState("c", 100.0) and step.started


def test_no_target_keeps_the_active_peer_and_cancels_a_handover() -> None:
    step = handover("", "a", acked={"b"}, active_healthy=False, memory=HandoverState("b", 0.0), now=1.0, timeout=10)
    assert (step.active, step.pending, step.state) == ("a", "", HandoverState())
