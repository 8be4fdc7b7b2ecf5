"""The path MTU search and schedule (issue 18), pure."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wirekube.traversal.pmtu import Schedule, Search, Timing


def run(search: Search, passes: object) -> int | None:
    while not search.done:
        sizes = search.sizes()
        assert sizes, "a search that is not done always has something to probe"
        search.feed([s for s in sizes if passes(s)])  # type: ignore[operator]
        assert search.rounds <= 10
    return search.result


@given(low=st.integers(500, 1400), span=st.integers(0, 1000), truth=st.integers(0, 3000),
       per_round=st.integers(2, 32))
def test_a_lossless_search_finds_the_exact_size(low: int, span: int, truth: int, per_round: int) -> None:
    high = low + span
    result = run(Search(low, high, per_round), lambda s: s <= truth)
    assert result == (None if truth < low else min(truth, high))


@given(truth=st.integers(516, 1440), seed=st.integers(0, 2**32), loss=st.floats(0.0, 0.9))
@settings(max_examples=300)
def test_loss_only_ever_makes_the_answer_smaller(truth: int, seed: int, loss: float) -> None:
    rng = random.Random(seed)
    result = run(Search(516, 1420), lambda s: s <= truth and rng.random() >= loss)
    assert result is None or result <= truth


def test_rounds_are_few() -> None:
    search = Search(516, 1420)
    run(search, lambda s: s <= 1220)
    assert search.result == 1220 and search.rounds <= 4
    top = Search(516, 1420)
    run(top, lambda s: True)
    assert top.rounds == 1  # the common case: the full size passes at once


def test_bad_ranges() -> None:
    with pytest.raises(ValueError, match='need 0 < low <= high, got 1400\\.\\.1300'):
        Search(1400, 1300)
    with pytest.raises(ValueError, match='per_round must be at least 2'):
        Search(100, 200, per_round=1)


def test_schedule_searches_new_moved_and_shrunk_paths() -> None:
    s = Schedule(Timing(check_every=5, check_failures=2, research_every=600, retry_unreachable=10))
    s.follow({"a": "1.1.1.1:1", "b": "2.2.2.2:2"})
    assert s.to_search(0) == ["a", "b"]
    s.searched("a", 1420, 0)
    s.searched("b", 1220, 0)
    assert s.to_search(1) == [] and s.to_check(1) == []
    assert s.to_check(5) == [("a", 1420), ("b", 1220)]
    s.checked("b", False, 5)
    assert s.to_search(6) == [] and ("b", 1220) in s.to_check(6)  # an unanswered check is repeated sooner
    s.checked("b", False, 10)
    assert s.to_search(10) == ["b"] and ("b", 1220) not in s.to_check(20)  # two misses: search again
    s.searched("b", 1180, 11)
    assert s.mtus() == {"a": 1420, "b": 1180}
    s.follow({"a": "1.1.1.1:9"})  # a moved, b is no longer direct
    assert s.to_search(12) == ["a"] and s.mtus() == {"a": 1420}  # the last size stays until re-measured
    assert s.to_search(600) == ["a"]


def test_a_search_without_any_answer_keeps_the_size_after_failed_checks_and_retries_soon() -> None:
    s = Schedule(Timing(check_every=5, check_failures=2, research_every=600, retry_unreachable=10))
    s.follow({"a": "1.1.1.1:1"})
    s.searched("a", None, 0)
    assert s.mtus() == {} and s.to_search(9) == [] and s.to_search(10) == ["a"]
    s.searched("a", 1300, 10)
    s.checked("a", False, 15)
    s.checked("a", False, 20)
    s.searched("a", None, 21)  # the peer is down, not a smaller path
    assert s.mtus() == {"a": 1300} and s.to_search(31) == ["a"]


def test_wireguard_padding_is_counted() -> None:
    from wirekube.traversal.pmtu import largest_inner, wire_size
    assert largest_inner(1280, 60) == 1216 and wire_size(1216, 60) == 1276 and wire_size(1217, 60) == 1292
    assert largest_inner(1500, 60) == 1440 and wire_size(1420, 60, link_mtu=1420) == 1480
    assert largest_inner(1280, 80) == 1200


def test_idle_peers_are_checked_rarely_and_at_once_when_they_carry_traffic_again() -> None:
    """The check's cost follows use like the heartbeat's: an idle peer every idle_check_every,
    and a peer that becomes active is checked on the next pass if its last check is older than
    check_every (a path that shrank while nobody used it is found within seconds of use)."""
    s = Schedule(Timing(check_every=3, idle_check_every=30, check_failures=2, research_every=600))
    s.follow({"busy": "1.1.1.1:1", "quiet": "2.2.2.2:2"}, idle=["quiet"])
    s.searched("busy", 1420, 0)
    s.searched("quiet", 1420, 0)
    checks = []
    for now in range(1, 61):
        due = s.to_check(now)
        checks.extend(name for name, _ in due)
        for name, _ in due:
            s.checked(name, True, now)
    assert checks.count("busy") == 20 and checks.count("quiet") == 2
    s.follow({"busy": "1.1.1.1:1", "quiet": "2.2.2.2:2"}, idle=[])  # traffic to quiet again
    assert ("quiet", 1420) in s.to_check(65)  # its last check was at 60 s: due again at once
    s.checked("quiet", True, 65)
    assert ("quiet", 1420) not in s.to_check(66)
