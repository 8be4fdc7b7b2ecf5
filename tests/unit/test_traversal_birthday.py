"""Birthday attack: bounds, maths, planning, coordination (injected clock) and the prober on loopback."""

from __future__ import annotations

import math
import random
import re
import socket
import threading
from dataclasses import replace

import pytest

from tests.fixtures.wait import wait_until
from wirekube.models import BirthdayRound
from wirekube.traversal import birthday, birthdaypath, probe
from wirekube.traversal.birthday import BirthdaySettings, Do, Phase, Session

S = BirthdaySettings()
RETRY = 120.0
T0 = 1_700_000_000.0


# ---- bounds -----------------------------------------------------------------------------------------


def test_defaults_are_within_the_hard_bounds() -> None:
    assert S.sockets == 64 and S.flows == 512 and S.passes == 2 and S.budget == 10.0
    assert S.sockets <= birthday.MAX_SOCKETS and S.flows <= birthday.MAX_FLOWS
    assert S.budget <= birthday.MAX_BUDGET_S < 30  # below conntrack's 30 s for unanswered UDP
    assert S.max_probes == 512 * 2 + 64 + 5 * 3


@pytest.mark.parametrize(("change", "says"), [
    ({"sockets": 257}, "sockets must be 1..256"), ({"sockets": 0}, "sockets must be 1..256"),
    ({"sockets": 256, "ports_per_socket": 9}, "sockets x ports_per_socket must be at most 2048"),
    ({"passes": 4}, "passes must be 1..3"), ({"budget": 26.0}, "budget must be at most 25.0s"),
    ({"budget": 1.0}, "passes must fit the budget"),
    ({"candidates": 4, "ports_per_socket": 8}, "ports_per_socket must be 1..candidates"),
    ({"window_samples": 1}, "window_samples must be 2..32"), ({"lead": 0.5}, "lead must exceed min_notice"),
    ({"max_replies": 1000}, "reply and choice limits out of range"),
])
def test_settings_outside_the_bounds_are_refused(change: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        BirthdaySettings(**change)  # type: ignore[arg-type]


def test_send_schedule_is_bounded_paced_and_inside_the_budget() -> None:
    targets = birthday.plan_targets(S.sockets, S.ports_per_socket, list(range(20000, 20256)))
    schedule = birthday.send_schedule(S, targets)
    assert len(schedule) == S.flows * S.passes <= S.max_probes
    assert max(t for t, _, _ in schedule) < S.pass_interval + S.pass_spread < S.budget
    first_pass = [t for t, _, _ in schedule[: S.flows]]
    assert first_pass == sorted(first_pass) and first_pass[-1] < S.pass_spread
    assert len({(s, p) for _, s, p in schedule}) == S.flows  # every flow distinct
    assert {s for _, s, _ in schedule[:S.sockets]} == set(range(S.sockets))  # sockets interleaved


def test_plan_targets_distinct_per_socket_and_even_over_candidates() -> None:
    cands = list(range(20000, 20256))
    targets = birthday.plan_targets(64, 8, cands)
    assert all(len(set(t)) == 8 for t in targets)
    counts = {p: 0 for p in cands}
    for t in targets:
        for p in t:
            counts[p] += 1
    assert set(counts.values()) == {2}  # 512 flows over 256 ports
    assert birthday.plan_targets(4, 8, [5000, 5001]) == [(5000, 5001)] * 4


# ---- the maths ----------------------------------------------------------------------------------------


def test_success_probability_of_the_defaults() -> None:
    p256 = birthday.success_probability(512, 512, 256, 256)
    assert p256 == pytest.approx(1 - math.exp(-4)) and 0.98 < p256 < 0.99
    assert birthday.success_probability(512, 512, 64512, 64512) < 1e-4
    assert birthday.success_probability(0, 512, 256, 256) == 0.0


def simulate(flows: int, pool: int, trials: int, rng: random.Random) -> float:
    """The matching model itself: A's flow (mapped a, aimed g) and B's (mapped b, aimed h) align
    when g == b and a == h; mapped ports are uniform in the pool, aims spread over the pool."""
    wins = 0
    for _ in range(trials):
        a_side = {(rng.randrange(pool), i % pool) for i in range(flows)}  # (mapped a, aimed g)
        wins += any((h, b) in a_side for b, h in ((rng.randrange(pool), j % pool) for j in range(flows)))
    return wins / trials


@pytest.mark.parametrize(("flows", "pool"), [(128, 256), (256, 256), (64, 128)])
def test_formula_matches_a_simulation_of_the_matching_model(flows: int, pool: int) -> None:
    rng = random.Random(flows * 1000 + pool)
    measured = simulate(flows, pool, 1500, rng)
    expected = birthday.success_probability(flows, flows, pool, pool)
    assert abs(measured - expected) < 0.05, (measured, expected)


def test_pool_estimate_extends_the_sample_span() -> None:
    assert birthday.pool_estimate(20010, 20240, 8) == round(230 * 9 / 7) + 1
    assert birthday.pool_estimate(0, 0, 8) == 64512


# ---- where to aim -------------------------------------------------------------------------------------


def test_own_window_random_sequential_and_unknown() -> None:
    assert birthday.own_window([20123, 20007, 20250, 20081], 512) == (20007, 20250)
    assert birthday.own_window([40001, 40002, 40003, 40004], 512) == (40005, 40516)
    assert birthday.own_window([40001], 512) == (0, 0)
    assert birthday.own_window([65000, 65001, 65002], 1024) == (65003, 65535)


def test_candidate_ports_are_the_centre_of_the_window() -> None:
    ports = birthday.candidate_ports((20000, 20255), 256, fallback=1)
    assert sorted(ports) == list(range(20000, 20256)) and ports[0] == 20127
    wide = birthday.candidate_ports((1024, 65535), 256, fallback=1)
    assert len(wide) == 256 and max(wide) - min(wide) == 255 and 33279 in wide
    narrow = birthday.candidate_ports((40005, 40010), 256, fallback=1)
    assert sorted(narrow) == list(range(40005, 40011))
    around = birthday.candidate_ports((0, 0), 16, fallback=40000)
    assert len(around) == 16 and all(39992 <= p <= 40008 for p in around)


# ---- coordination with an injected clock --------------------------------------------------------------


class Pair:
    """Two sessions whose published entries reach each other after ``delay`` seconds."""

    def __init__(self, delay: float = 0.3) -> None:
        self.lead, self.join = Session(leader=True), Session(leader=False)
        self.delay = delay
        self.published: dict[str, list[tuple[float, BirthdayRound | None]]] = {"lead": [], "join": []}

    def seen(self, who: str, now: float) -> BirthdayRound | None:
        entries = [e for t, e in self.published[who] if t + self.delay <= now]
        return entries[-1] if entries else None

    def run(self, start: float, until: float, *, joiner_alive: bool = True,
            dt: float = 0.1) -> list[tuple[str, Do, float]]:
        events: list[tuple[str, Do, float]] = []
        now = start
        while now < until:
            for who in ("lead", "join"):
                if who == "join" and not joiner_alive:
                    continue
                s = self.lead if who == "lead" else self.join
                other = "join" if who == "lead" else "lead"
                s, do = birthday.step(s, now, self.seen(other, now), S, RETRY)
                if do is Do.PREPARE:
                    s = birthday.prepared(s, now + 0.4, (20000, 20255), S)  # measuring took 0.4 s
                if do is not Do.NONE:
                    events.append((who, do, now))
                if who == "lead":
                    self.lead = s
                else:
                    self.join = s
                if not self.published[who] or self.published[who][-1][1] != s.own:
                    self.published[who].append((now, s.own))
            now += dt
        return events


def test_both_sides_probe_at_the_same_notbefore() -> None:
    pair = Pair()
    events = pair.run(T0, T0 + 8)
    probes = [(who, t) for who, do, t in events if do is Do.PROBE]
    assert [w for w, _ in probes] == ["lead", "join"]
    assert pair.lead.not_before == pair.join.not_before == pytest.approx(T0 + 0.4 + S.lead, abs=0.001)
    assert all(t - pair.lead.not_before < 0.11 for _, t in probes)  # within one tick of notBefore
    assert pair.lead.phase is Phase.PROBING and pair.join.phase is Phase.PROBING
    assert pair.lead.round == pair.join.round == 1
    assert pair.published["join"][1][1] == BirthdayRound(1, birthday.stamp(pair.lead.not_before), 20000, 20255)


def test_leader_gives_up_when_the_peer_never_joins_and_waits_the_retry_interval() -> None:
    pair = Pair()
    events = pair.run(T0, T0 + 10, joiner_alive=False)
    assert [(w, d) for w, d, _ in events] == [("lead", Do.PREPARE), ("lead", Do.GAVE_UP)]
    s = pair.lead
    assert s.phase is Phase.IDLE and s.own is None and s.rounds_failed == 1
    assert s.reason.startswith("birthday attack failed at 2023-11-14T22:13:2")
    assert "peer did not join round 1" in s.reason
    assert s.next_attempt_at >= pair.lead.not_before + RETRY
    assert birthday.step(s, s.next_attempt_at - 0.01, None, S, RETRY)[1] is Do.NONE
    s2, do = birthday.step(s, s.next_attempt_at, None, S, RETRY)
    assert do is Do.PREPARE and s2.round == 2


def test_a_failed_round_is_retried_no_sooner_than_the_retry_interval() -> None:
    pair = Pair()
    pair.run(T0, T0 + 7)
    end = T0 + 7 + S.budget
    pair.lead = birthday.finished(pair.lead, end, False, RETRY, "round 1: no aligned flow")
    pair.join = birthday.finished(pair.join, end, False, RETRY, "round 1: no aligned flow")
    assert pair.lead.reason.startswith("birthday attack failed at ") and pair.lead.reason.endswith("no aligned flow)")
    events = pair.run(end, end + RETRY + 8)
    prepares = [(w, t) for w, d, t in events if d is Do.PREPARE]
    assert prepares[0] == ("lead", pytest.approx(end + RETRY, abs=0.11))
    assert [w for w, d, _ in events if d is Do.PROBE] == ["lead", "join"]
    assert pair.lead.round == pair.join.round == 2


def test_follower_refuses_late_or_too_early_rounds_and_follows_its_joined_round() -> None:
    join = Session(leader=False)
    late = BirthdayRound(1, birthday.stamp(T0 + 0.5), 1, 2)
    assert birthday.step(join, T0, late, S, RETRY)[1] is Do.NONE  # less than min_notice ahead
    ok = BirthdayRound(1, birthday.stamp(T0 + 5), 1, 2)
    join, do = birthday.step(join, T0, ok, S, RETRY)
    assert do is Do.PREPARE and join.not_before == T0 + 5
    join = birthday.prepared(join, T0 + 0.4, (3, 4), S)
    assert join.phase is Phase.ARMED and join.own == BirthdayRound(1, ok.not_before, 3, 4)
    abandoned, do = birthday.step(join, T0 + 1, None, S, RETRY)  # the leader withdrew its entry
    assert do is Do.GAVE_UP and "abandoned" in abandoned.reason
    join, do = birthday.step(join, T0 + 5, ok, S, RETRY)
    assert do is Do.PROBE
    join = birthday.finished(join, T0 + 15, False, RETRY)
    too_soon = BirthdayRound(2, birthday.stamp(T0 + 60), 1, 2)
    assert birthday.step(join, T0 + 20, too_soon, S, RETRY)[1] is Do.NONE
    fine = BirthdayRound(2, birthday.stamp(T0 + 5 + RETRY), 1, 2)
    assert birthday.step(join, T0 + RETRY, fine, S, RETRY)[1] is Do.PREPARE
    assert birthday.step(join, T0 + RETRY, ok, S, RETRY)[1] is Do.NONE  # an old entry is never re-joined


def test_won_then_lost_starts_again_after_the_retry_interval() -> None:
    s = replace(Session(leader=True), phase=Phase.PROBING, round=1, not_before=T0)
    s = birthday.finished(s, T0 + 2, True, RETRY)
    assert s.phase is Phase.WON and s.own is None and s.reason == ""
    assert birthday.step(s, T0 + 1000, None, S, RETRY)[1] is Do.NONE  # won: nothing to do
    s = birthday.lost(s, T0 + 50, RETRY)
    assert birthday.step(s, T0 + 50 + RETRY - 1, None, S, RETRY)[1] is Do.NONE
    assert birthday.step(s, T0 + 50 + RETRY, None, S, RETRY)[1] is Do.PREPARE


def test_stamps_round_trip_with_milliseconds() -> None:
    assert birthday.stamp(T0 + 5.25) == "2023-11-14T22:13:25.250Z"
    assert birthday.parse_stamp("2023-11-14T22:13:25.250Z") == T0 + 5.25


# ---- the prober on loopback ------------------------------------------------------------------------------


class Sockets:
    """Pre-opened loopback sockets handed to a prober (so the other side can aim at them)."""

    def __init__(self, n: int) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.socks.append(s)
        self.ports = [s.getsockname()[1] for s in self.socks]

    def factory(self) -> socket.socket:
        return self.socks.pop(0)


def prober_pair(leader_sockets: Sockets, follower_sockets: Sockets, settings: BirthdaySettings,
                aim_leader: list[int], aim_follower: list[int]) -> tuple[birthdaypath.Prober, birthdaypath.Prober]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ka, kb = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa = ka.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    pb = kb.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    secret = probe.shared_secret(ka, pb)
    lead = birthdaypath.Prober(settings, 7, True, pa, pb, secret, "127.0.0.1",
                               birthday.plan_targets(settings.sockets, settings.ports_per_socket, aim_leader),
                               socket_factory=leader_sockets.factory)
    join = birthdaypath.Prober(settings, 7, False, pb, pa, probe.shared_secret(kb, pa), "127.0.0.1",
                               birthday.plan_targets(settings.sockets, settings.ports_per_socket, aim_follower),
                               socket_factory=follower_sockets.factory)
    return lead, join


def run_both(lead: birthdaypath.Prober, join: birthdaypath.Prober, start: float) -> list[birthdaypath.ProbeResult]:
    results: list[birthdaypath.ProbeResult] = [None, None]  # type: ignore[list-item]

    def go(i: int, p: birthdaypath.Prober) -> None:
        results[i] = p.run(start)

    threads = [threading.Thread(target=go, args=(i, p)) for i, p in enumerate((lead, join))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_probers_settle_on_one_flow_and_carry_wireguard_datagrams_through_the_proxies() -> None:
    import asyncio
    import time

    settings = BirthdaySettings(sockets=4, ports_per_socket=2, candidates=4, budget=5.0, lead=2.0,
                                pass_interval=0.5, pass_spread=0.1)
    a, b = Sockets(4), Sockets(4)
    # Loopback has no NAT: aim each side at two of the other's sockets (plus two closed ports).
    lead, join = prober_pair(a, b, settings, [b.ports[1], b.ports[2], 9, 10], [a.ports[0], a.ports[3], 11, 12])
    ra, rb = run_both(lead, join, time.time() + 0.2)
    assert ra.won and rb.won, (ra.detail, rb.detail)
    assert ra.remote is not None and rb.remote is not None and ra.sock is not None and rb.sock is not None
    assert ra.remote[1] == rb.sock.getsockname()[1] and rb.remote[1] == ra.sock.getsockname()[1]
    for r in (ra, rb):
        assert r.stats.sockets == 4 and r.stats.flows == 8
        assert r.stats.probes_sent <= settings.max_probes and r.stats.elapsed < settings.budget
    assert a.socks == [] and b.socks == []  # each prober took exactly its sockets

    wg_a, wg_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg_a.bind(("127.0.0.1", 0))
    wg_b.bind(("127.0.0.1", 0))
    wg_a.settimeout(3)
    wg_b.settimeout(3)

    async def carry() -> tuple[bytes, bytes, int]:
        pa = birthdaypath.WonPathProxy(ra.sock, ra.remote, wg_a.getsockname()[1])  # type: ignore[arg-type]
        pb = birthdaypath.WonPathProxy(rb.sock, rb.remote, wg_b.getsockname()[1])  # type: ignore[arg-type]
        await pa.open()
        await pb.open()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, wg_a.sendto, b"handshake-initiation", ("127.0.0.1", pa.port))
        got_b, addr_b = await loop.run_in_executor(None, wg_b.recvfrom, 2048)
        await loop.run_in_executor(None, wg_b.sendto, b"handshake-response", addr_b)
        got_a, _ = await loop.run_in_executor(None, wg_a.recvfrom, 2048)
        # A late probe of the round may still sit in the won socket's buffer and be dropped too:
        # count only what the stranger's datagram adds.
        before = pa.dropped
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.sendto(b"not from the peer", ("127.0.0.1", pa.port))
        await wait_until(lambda: pa.dropped != before, timeout=5, what="the proxy to drop the stranger's datagram")
        stranger.close()
        dropped = pa.dropped - before
        assert addr_b == ("127.0.0.1", pb.port)  # WireGuard B sees the peer at its proxy
        pa.close()
        pb.close()
        return got_b, got_a, dropped

    got_b, got_a, dropped = asyncio.run(carry())
    wg_a.close()
    wg_b.close()
    assert (got_b, got_a, dropped) == (b"handshake-initiation", b"handshake-response", 1)


def test_prober_gives_up_at_the_deadline_within_its_bounds() -> None:
    settings = BirthdaySettings(sockets=8, ports_per_socket=4, candidates=8, budget=2.0, lead=2.0,
                                pass_interval=0.5, pass_spread=0.2)
    a, b = Sockets(8), Sockets(8)
    ticks = {"t": T0}

    def clock() -> float:  # every look at the clock moves it on 10 ms: deterministic, no real waiting
        ticks["t"] += 0.01
        return ticks["t"]

    lead, _ = prober_pair(a, b, settings, list(range(9, 17)), [])
    lead.clock = clock
    result = lead.run(T0)
    assert not result.won and result.detail == "no aligned flow" and result.sock is None
    assert result.stats.sockets == 8 and result.stats.flows == 32
    assert result.stats.probes_sent == 32 * settings.passes <= settings.max_probes
    assert settings.budget <= result.stats.elapsed < settings.budget + 0.05
    for s in b.socks:
        s.close()


def test_prober_cancelled_before_start_opens_nothing() -> None:
    settings = BirthdaySettings(sockets=2, ports_per_socket=1, candidates=2, budget=2.0, lead=2.0,
                                pass_interval=0.5, pass_spread=0.2)
    a, b = Sockets(2), Sockets(2)
    lead, _ = prober_pair(a, b, settings, [1, 2], [])
    lead.cancelled = lambda: True
    import time

    result = lead.run(time.time() + 3600)  # cancelled while waiting for notBefore
    assert result.detail == "cancelled" and result.stats.sockets == 0 and len(a.socks) == 2
    for s in a.socks + b.socks:
        s.close()


def test_data_before_chosen_is_kept_and_a_repeated_choose_is_answered_by_the_proxy() -> None:
    """The follower adopts at CHOOSE and its WireGuard may send before our CHOSEN arrives (or its
    CHOSEN is lost): that data reaches WireGuard, and the proxy answers the repeated CHOOSE."""
    import asyncio
    import time

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    settings = BirthdaySettings(sockets=1, ports_per_socket=1, candidates=1, budget=5.0, lead=2.0,
                                pass_interval=0.5, pass_spread=0.1)
    ka, kb = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa = ka.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    pb = kb.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    secret_b = probe.shared_secret(kb, pa)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the follower, scripted
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    a = Sockets(1)
    lead = birthdaypath.Prober(settings, 9, True, pa, pb, probe.shared_secret(ka, pb), "127.0.0.1",
                               [(peer.getsockname()[1],)], socket_factory=a.factory)
    lead_port = a.ports[0]
    nonce = (9).to_bytes(4, "big") + (0).to_bytes(4, "big")
    seen: list[int] = []

    def follower() -> None:
        peer.sendto(probe.encode(probe.PING, pb, nonce, secret_b), ("127.0.0.1", lead_port))
        while True:
            data, _ = peer.recvfrom(2048)
            msg = probe.decode(data, lambda k: secret_b, birthdaypath.ALL_KINDS)
            if msg is not None:
                seen.append(msg.kind)
            if msg is not None and msg.kind == probe.CHOOSE:
                peer.sendto(b"wireguard-first", ("127.0.0.1", lead_port))  # our WireGuard switched already
                peer.sendto(probe.encode(probe.CHOSEN, pb, msg.nonce, secret_b), ("127.0.0.1", lead_port))
                return

    th = threading.Thread(target=follower)
    th.start()
    result = lead.run(time.time())
    th.join(5)
    assert result.won and result.pending == [b"wireguard-first"] and probe.CHOOSE in seen

    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg.bind(("127.0.0.1", 0))
    wg.settimeout(3)

    async def run() -> tuple[bytes, bytes, int]:
        assert result.sock is not None and result.remote is not None
        proxy = birthdaypath.WonPathProxy(result.sock, result.remote, wg.getsockname()[1],
                                          control=birthdaypath.chosen_answerer(9, pa, pb, probe.shared_secret(ka, pb)),
                                          pending=result.pending)
        await proxy.open()
        loop = asyncio.get_running_loop()
        first, _ = await loop.run_in_executor(None, wg.recvfrom, 2048)  # the kept datagram, delivered first
        peer.sendto(probe.encode(probe.CHOOSE, pb, nonce, secret_b), result.sock.getsockname())  # repeated
        answer, _ = await loop.run_in_executor(None, peer.recvfrom, 2048)
        forwarded = proxy.from_peer
        proxy.close()
        return first, answer, forwarded

    first, answer, forwarded = asyncio.run(run())
    chosen = probe.decode(answer, lambda k: secret_b, birthdaypath.ALL_KINDS)
    assert first == b"wireguard-first" and chosen is not None and chosen.kind == probe.CHOSEN
    assert forwarded == 1  # the CHOOSE went back as CHOSEN, not to WireGuard
    peer.close()
    wg.close()
