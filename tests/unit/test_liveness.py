"""Per-peer liveness (pure): heartbeat rate follows use, a stall needs unanswered heartbeats."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from wirekube.traversal import liveness
from wirekube.traversal.liveness import ACTIVE_INTERVAL, HEARTBEAT_WIRE_BYTES, IDLE_INTERVAL, Beats, Liveness

STEP = 0.05  # the heartbeat thread's poll; the ticker reads counters every other step
STALL = 0.5


@dataclass
class Sim:
    """One side of a pair: our heartbeats (answered by the peer's kernel while the path works),
    the peer's own heartbeats at ``peer_rate`` per second, and data at ``data_bps``."""

    alive: bool = True
    peer_every: float = IDLE_INTERVAL
    data_bytes_per_step: int = 0
    tx: int = 0
    rx: int = 0
    beats: Beats = Beats()
    state: Liveness = Liveness()
    now: float = 0.0
    sent_at: list[float] = field(default_factory=list)
    next_peer_beat: float = 0.0

    def step(self) -> None:
        self.now = round(self.now + STEP, 6)
        if liveness.due(self.state, self.now, urgent=False):
            self.state = liveness.beat(self.state, self.now)
            self.sent_at.append(self.now)
            self.tx += HEARTBEAT_WIRE_BYTES
            answered = int(self.alive)
            self.rx += HEARTBEAT_WIRE_BYTES * answered
            self.beats = replace(self.beats, sent=self.beats.sent + 1, answered=self.beats.answered + answered)
        if self.alive and self.now >= self.next_peer_beat:
            self.next_peer_beat = self.now + self.peer_every
            self.rx += HEARTBEAT_WIRE_BYTES
            self.tx += HEARTBEAT_WIRE_BYTES  # our kernel's echo reply
            self.beats = replace(self.beats, requests=self.beats.requests + 1)
        if self.data_bytes_per_step:
            self.tx += self.data_bytes_per_step
            self.rx += self.data_bytes_per_step if self.alive else 0
        if round(self.now / STEP) % 2 == 0:
            self.state = liveness.observe(self.state, self.now, self.tx, self.rx, self.beats)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            self.step()

    def beats_in(self, seconds: float) -> int:
        return sum(1 for t in self.sent_at if t > self.now - seconds)


def test_an_idle_peer_is_heartbeated_once_per_idle_interval_and_stays_idle() -> None:
    sim = Sim()
    sim.run(5)
    sim.run(100)
    assert sim.beats_in(100) <= 100 / IDLE_INTERVAL + 1
    assert not sim.state.active(sim.now) and sim.state.unanswered_for(sim.now) == 0


def test_a_peer_with_traffic_is_heartbeated_at_the_active_rate_then_idles_again() -> None:
    sim = Sim(peer_every=ACTIVE_INTERVAL)
    sim.run(12)
    sim.data_bytes_per_step = 200  # 4 kB/s each way
    sim.run(3)
    assert sim.state.active(sim.now)
    assert sim.beats_in(2) >= 2 / ACTIVE_INTERVAL - 2
    sim.data_bytes_per_step = 0
    sim.peer_every = IDLE_INTERVAL
    sim.run(liveness.IDLE_AFTER + 2 * IDLE_INTERVAL)
    assert not sim.state.active(sim.now), "the peer's own heartbeats and our answers are not traffic"
    assert sim.beats_in(IDLE_INTERVAL) <= 2


def test_two_active_peers_answering_each_other_do_not_keep_each_other_active() -> None:
    sim = Sim(peer_every=ACTIVE_INTERVAL)  # the peer is active and heartbeats us at 10 Hz
    sim.run(30)
    assert not sim.state.active(sim.now)


def test_a_cut_on_an_active_peer_stalls_within_stall_after_plus_a_beat() -> None:
    sim = Sim(peer_every=ACTIVE_INTERVAL, data_bytes_per_step=100)
    sim.run(12)
    cut = sim.now
    sim.alive = False
    while sim.state.unanswered_for(sim.now) < STALL:
        sim.step()
        assert sim.now - cut < 2, "no stall detected"
    assert sim.now - cut <= STALL + 2 * ACTIVE_INTERVAL + 2 * STEP


def test_an_idle_peer_that_gets_traffic_over_a_dead_path_is_found_dead_quickly() -> None:
    sim = Sim()
    sim.run(20)
    sim.alive = False  # dies while idle: nobody notices (nothing to lose)
    sim.run(3)
    start = sim.now
    sim.data_bytes_per_step = 100  # then traffic arrives
    while sim.state.unanswered_for(sim.now) < STALL:
        sim.step()
        assert sim.now - start < 3, "dead path not found after traffic started"
    assert sim.now - start <= liveness.VERIFY_AFTER + STALL + 4 * STEP


def test_one_lost_heartbeat_is_not_a_stall() -> None:
    state = liveness.observe(Liveness(), 0.0, 0, 0, Beats())
    state = liveness.beat(state, 0.1)  # lost
    state = liveness.observe(state, 0.2, 80, 0, Beats(1))
    state = liveness.beat(state, 0.4)  # verified, answered
    state = liveness.observe(state, 0.9, 160, 80, Beats(2, 1))
    assert state.unanswered_for(0.9) == 0 and state.suspect_since is None


def test_handshakes_and_keepalives_are_not_traffic_nor_suspicious() -> None:
    state = liveness.observe(Liveness(), 0.0, 0, 0, Beats())
    state = liveness.observe(state, 1.5, 148, 92, Beats())  # a handshake we initiated
    state = liveness.observe(state, 3.0, 148 + 32, 92, Beats())  # and a keepalive
    assert not state.active(3.0)
    state = liveness.observe(state, 4.0, 148 + 32 + 32, 92, Beats())
    assert state.suspect_since is None, "a lone keepalive is never answered: not a reason to verify"
    assert state.unanswered_for(10.0) == 0  # no heartbeat was sent: never a stall by itself


def test_a_recreated_device_resets_the_counters() -> None:
    state = liveness.observe(Liveness(), 0.0, 5000, 5000, Beats())
    state = liveness.beat(state, 0.1)
    state = liveness.observe(state, 0.2, 10, 0, Beats(1))
    assert state.suspect_since is None and state.tx == 10


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 400)), min_size=1, max_size=200))
def test_a_working_path_never_stalls(steps: list[tuple[bool, int]]) -> None:
    """Whatever the traffic pattern, a path that answers every heartbeat is never found dead."""
    sim = Sim(peer_every=ACTIVE_INTERVAL)
    for peer_active, data in steps:
        sim.peer_every = ACTIVE_INTERVAL if peer_active else IDLE_INTERVAL
        sim.data_bytes_per_step = data
        sim.run(0.5)
        assert sim.state.unanswered_for(sim.now) < STALL


def test_path_mtu_probes_the_agents_exchange_are_not_traffic() -> None:
    """Every 5 s two 1,420-byte path MTU checks each way (as agent.pmtu does), counted by the
    heartbeat socket: the peer stays idle."""
    sim = Sim()
    sim.run(5)
    for _ in range(8):
        sim.run(5)
        size = 2 * liveness.wire_size(1420) * 2  # two probes answered, and the peer's two
        sim.tx += size
        sim.rx += size
        sim.beats = replace(sim.beats, probe_bytes=sim.beats.probe_bytes + 2 * size)
    sim.run(1)
    assert not sim.state.active(sim.now)
    assert liveness.wire_size(46) == HEARTBEAT_WIRE_BYTES


def test_the_heartbeat_socket_tells_heartbeats_probes_and_traffic_apart() -> None:
    from wirekube.agent.heartbeat import HEARTBEAT_PAYLOAD, _drain_heartbeats

    def ip_packet(src: str, kind: int, payload: bytes) -> bytes:
        total = 20 + 8 + len(payload)
        header = (bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(8) + bytes(int(x) for x in src.split("."))
                  + bytes(4))
        return header + bytes([kind, 0]) + bytes(6) + payload

    class Sock:
        def __init__(self, packets: list[tuple[bytes, tuple[str, int]]]) -> None:
            self.packets = packets

        def recvfrom(self, n: int) -> tuple[bytes, tuple[str, int]]:
            if not self.packets:
                raise BlockingIOError
            return self.packets.pop(0)

    a, b = "10.255.0.1", "10.255.0.2"
    got = _drain_heartbeats(Sock([  # type: ignore[arg-type]
        (ip_packet(a, 0, HEARTBEAT_PAYLOAD), (a, 0)),
        (ip_packet(a, 8, HEARTBEAT_PAYLOAD), (a, 0)),
        (ip_packet(a, 0, b"wirekube-pmtu" * 100), (a, 0)),
        (ip_packet(a, 8, b"abcdefgh" * 7), (a, 0)),  # a user's ping: traffic, not counted
        (ip_packet(b, 3, HEARTBEAT_PAYLOAD), (b, 0)),  # not an echo
        (ip_packet("192.0.2.9", 0, HEARTBEAT_PAYLOAD), ("192.0.2.9", 0)),  # not a peer
    ]), {a: "pa", b: "pb"})
    assert got == {"pa": Beats(sent=0, answered=1, requests=1, probe_bytes=2 * liveness.wire_size(28 + 1300))}


def test_slow_answers_stretch_the_stall_threshold_and_it_comes_back_down() -> None:
    state = liveness.observe(Liveness(), 0.0, 0, 0, Beats())
    assert state.stall_after(STALL) == STALL
    state = liveness.beat(state, 0.1)
    state = liveness.observe(state, 0.9, 80, 80, Beats(1, 1))  # answered 0.8 s late (a loaded node)
    assert state.stall_after(STALL) == liveness.MAX_STALL_AFTER  # 3 x 0.8 s, capped
    slow = liveness.observe(liveness.beat(state, 1.0), 30.0, 160, 160, Beats(2, 2))  # answered 29 s late
    assert slow.stall_after(STALL) == liveness.MAX_STALL_AFTER
    t, sent = 0.9, 1
    for _ in range(400):  # then 40 s of prompt answers
        t += 0.1
        state = liveness.beat(state, t)
        sent += 1
        state = liveness.observe(state, t + 0.05, 80 * sent, 80 * sent, Beats(sent, sent))
    assert state.stall_after(STALL) == STALL


def test_an_outage_stretches_the_threshold_for_seconds_not_minutes() -> None:
    """A heartbeat first answered 20 s after it went out (the path was being set up, or cut) is an
    outage, not a slow answer: it counts as a delay that just reaches the cap, so prompt answers
    bring the threshold back within ~4 s.  Taken whole, it held the threshold at its cap for ~3
    minutes after the lab's mesh formed, and the first cuts took 1.6 s to notice instead of 0.6."""
    state = liveness.observe(Liveness(), 0.0, 0, 0, Beats())
    state = liveness.beat(state, 0.1)
    state = liveness.observe(state, 20.1, 80, 80, Beats(1, 1))
    assert state.stall_after(STALL) == liveness.MAX_STALL_AFTER
    t, sent = 20.1, 1
    while t < 24.1:  # 4 s of prompt answers
        t += 0.1
        state = liveness.beat(state, t)
        sent += 1
        state = liveness.observe(state, t + 0.02, 80 * sent, 80 * sent, Beats(sent, sent))
    assert state.stall_after(STALL) == STALL


def test_a_lost_probe_or_one_way_data_does_not_stretch_the_threshold() -> None:
    """Data nothing answers (a one-way stream, a path MTU search probe larger than the path) makes
    the peer suspect, but when a heartbeat then comes back promptly the answer delay stays that
    heartbeat's round trip: the stall threshold does not grow."""
    state = liveness.observe(Liveness(), 0.0, 0, 0, Beats())
    state = liveness.observe(state, 1.0, 1500, 0, Beats())  # 1,500 bytes sent, nothing back
    assert state.suspect_since == 1.0
    state = liveness.beat(state, 1.35)  # verification heartbeat after VERIFY_AFTER
    state = liveness.observe(state, 1.4, 1580, 80, Beats(1, 1))
    assert state.suspect_since is None
    assert state.answer_delay <= 0.06
    assert state.stall_after(STALL) == STALL
