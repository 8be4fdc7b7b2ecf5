"""Per-peer liveness: how often to send the heartbeat, and how long the peer has left it unanswered
(pure, clock injected).

The agent sends an ICMP echo through wire_kube to each peer's mesh IP; the peer's kernel answers,
and the answer moves WireGuard's rx counter.  A path is suspect when a heartbeat went out and
nothing at all came back since; it is dead when that lasted ``stall_after`` and at least
``MIN_UNANSWERED`` heartbeats went unanswered (one lost packet is not a failure).

Cost follows use, not peer count:

* **active** (the peer carried traffic beyond heartbeats within ``IDLE_AFTER``) or **unproven**
  (a direct path not yet established, or one being verified): a heartbeat every
  ``ACTIVE_INTERVAL``, so a cut is detected in about ``stall_after``;
* **idle**: one heartbeat every ``IDLE_INTERVAL`` (it also keeps NAT mappings open), so 1,000 idle
  peers cost 100 packets/s instead of 2,000;
* an idle peer that gets traffic, or whose heartbeat goes unanswered for ``VERIFY_AFTER``, is
  verified at once at the active rate: data we send that is not answered makes the peer suspect
  the same way an unanswered heartbeat does.

"Traffic beyond heartbeats" is counted from the engine's byte counters minus what the heartbeats
themselves explain: every heartbeat, its answer and the peer's own heartbeats with our answers
are data messages of exactly ``HEARTBEAT_WIRE_BYTES`` in both engines' counters (16-byte header,
the 46-byte echo padded to 48, 16-byte tag).  Handshakes (148 + 92 bytes) and keepalives
(32) are below ``ACTIVE_BYTES`` per window, so they never make a peer active.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ACTIVE_INTERVAL = 0.1
IDLE_INTERVAL = 10.0
IDLE_AFTER = 10.0
VERIFY_AFTER = 0.3
MIN_UNANSWERED = 3
HEARTBEAT_WIRE_BYTES = 80  # wire_size(46): the 46-byte echo
KEEPALIVE_BYTES = 32
ACTIVE_BYTES = 300
WINDOW = 1.0
SLACK = 1e-3  # timer jitter allowance in due/verify comparisons
DELAY_FACTOR = 3.0
DELAY_DECAY = 0.1  # seconds of answer delay forgotten per second
MAX_STALL_AFTER = 1.5  # however slow answers were, a path silent this long is dead


@dataclass(frozen=True)
class Beats:
    """Heartbeat packets counted for one peer since the agent started (cumulative)."""

    sent: int = 0  # our echo requests to the peer
    answered: int = 0  # the peer's echo replies to us
    requests: int = 0  # the peer's echo requests to us (our kernel answered each)
    probe_bytes: int = 0
    """tx + rx bytes of the agents' other echo probes seen from the peer (path MTU: each reply
    and each request with the answer it got, as WireGuard data messages, see :func:`wire_size`)."""

    def wire_bytes(self) -> int:
        """tx + rx bytes these packets account for in WireGuard's counters."""
        return HEARTBEAT_WIRE_BYTES * (self.sent + self.answered + 2 * self.requests) + self.probe_bytes

    def tx_bytes(self) -> int:
        """The part of :meth:`wire_bytes` we sent (a probe and its answer are the same size)."""
        return HEARTBEAT_WIRE_BYTES * (self.sent + self.requests) + self.probe_bytes // 2


def wire_size(ip_length: int) -> int:
    """Bytes one inner IPv4 packet of ``ip_length`` adds to WireGuard's counters: the 16-byte data
    header, the packet padded to a multiple of 16, the 16-byte tag (both engines count this)."""
    return 16 + -(-ip_length // 16) * 16 + 16


@dataclass(frozen=True)
class Liveness:
    tx: int = -1
    rx: int = -1
    beats: Beats = Beats()
    window_start: float = 0.0
    window_bytes: int = 0  # traffic beyond heartbeats within the current window (signed)
    active_until: float = 0.0
    last_rx_at: float = 0.0
    last_beat_at: float = float("-inf")
    suspect_since: float | None = None  # first heartbeat or data we sent with nothing received since
    unanswered: int = 0  # heartbeats sent since suspect_since
    observed_at: float = 0.0  # the last reading of the counters: what we know of rx is as of then
    beat_since: float | None = None  # the first heartbeat sent with nothing received since
    answer_delay: float = 0.0
    """How long answers to our heartbeats have been taking lately (a peak that decays by ``DELAY_DECAY`` per second):
    a loaded node or peer answers late, and a late answer is not a dead path."""

    def active(self, now: float) -> bool:
        return now < self.active_until

    def interval(self, now: float, urgent: bool) -> float:
        fast = urgent or self.active(now) or self.unanswered_seconds() >= VERIFY_AFTER - SLACK
        return ACTIVE_INTERVAL if fast else IDLE_INTERVAL

    def unanswered_seconds(self) -> float:
        """How long, as of the last counter reading, what we sent has gone unanswered (0 = nothing
        pending).  Measured to the reading, not to the clock: a late ticker is not a silent peer."""
        if self.suspect_since is None:
            return 0.0
        return max(0.0, self.observed_at - self.suspect_since)

    def unanswered_for(self, now: float) -> float:
        """The stall signal: :meth:`unanswered_seconds`, once more than one packet was lost (else 0)."""
        if self.unanswered < MIN_UNANSWERED:
            return 0.0
        return self.unanswered_seconds()

    def stall_after(self, base: float) -> float:
        """The silence that means a dead path: ``base``, or ``DELAY_FACTOR`` times the recent
        answer delay when answers have been slow (as TCP's retransmission timeout follows RTT),
        at most ``MAX_STALL_AFTER``."""
        return max(base, min(MAX_STALL_AFTER, DELAY_FACTOR * self.answer_delay))


def observe(state: Liveness, now: float, tx: int, rx: int, beats: Beats) -> Liveness:
    """Fold in one reading of the engine's counters and the heartbeat counts."""
    if state.tx < 0 or tx < state.tx or rx < state.rx:  # first reading, or the device was recreated
        return replace(state, tx=tx, rx=rx, beats=beats, window_start=now, window_bytes=0, last_rx_at=now,
                       suspect_since=None, unanswered=0, observed_at=now, beat_since=None)
    received = rx > state.rx
    beyond = (tx - state.tx) + (rx - state.rx) - (beats.wire_bytes() - state.beats.wire_bytes())
    # Data we sent beyond heartbeats and our answers to the peer's; a lone keepalive (32 bytes) is
    # never answered, so it does not count.
    sent_data = (tx - state.tx) - (beats.tx_bytes() - state.beats.tx_bytes()) > KEEPALIVE_BYTES
    # Signed within a window: a heartbeat counted a moment before the engine counted its bytes (or
    # after) shows up as -80 in one reading and +80 in the next.
    window_start, window_bytes = state.window_start, state.window_bytes + beyond
    if now - window_start >= WINDOW:
        window_start, window_bytes = now, beyond
    active_until = state.active_until
    if window_bytes >= ACTIVE_BYTES:
        active_until = now + IDLE_AFTER
    suspect_since, unanswered = state.suspect_since, state.unanswered
    answer_delay = max(0.0, state.answer_delay - DELAY_DECAY * (now - state.observed_at))
    beat_since = state.beat_since
    if received:
        # Only a heartbeat's own round trip says how slow answers are: data we sent may be one-way
        # (nothing answers it) and a path MTU search probe larger than the path is lost by design,
        # so a suspicion they started says nothing about the peer's speed (taking it as a delay
        # stretched the threshold to its cap and a real cut went unnoticed for 3 s).
        # A wait longer than it takes to reach the cap counts as just reaching it: a silence of
        # seconds was an outage (the path being set up, a cut, the peer away), not a slow answer,
        # and taken whole it held the threshold at its cap for minutes after the mesh formed (a 20 s
        # wait decays at DELAY_DECAY for ~3 min), so the first cuts took 1.6 s to notice.
        if beat_since is not None:
            answer_delay = max(answer_delay, min(now - beat_since, MAX_STALL_AFTER / DELAY_FACTOR))
        suspect_since, unanswered, beat_since = None, 0, None
    elif sent_data and suspect_since is None:
        suspect_since = now  # we sent the peer data and nothing came back yet
    return replace(state, tx=tx, rx=rx, beats=beats, window_start=window_start, window_bytes=window_bytes,
                   active_until=active_until, last_rx_at=now if received else state.last_rx_at,
                   suspect_since=suspect_since, unanswered=unanswered, observed_at=now, answer_delay=answer_delay,
                   beat_since=beat_since)


def due(state: Liveness, now: float, urgent: bool) -> bool:
    """Whether the next heartbeat is due.  ``urgent``: the path is unproven (trying direct)."""
    return now - state.last_beat_at >= state.interval(now, urgent) - SLACK


def beat(state: Liveness, now: float) -> Liveness:
    """A heartbeat was sent now."""
    return replace(state, last_beat_at=now,
                   suspect_since=state.suspect_since if state.suspect_since is not None else now,
                   beat_since=state.beat_since if state.beat_since is not None else now,
                   unanswered=state.unanswered + 1)
