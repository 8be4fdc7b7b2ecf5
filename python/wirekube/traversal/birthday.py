"""The birthday attack for symmetric <-> symmetric NAT: bounds, maths, planning, coordination (pure).

Two symmetric NATs map every new (source socket, destination) flow to a fresh external port, so
neither side can know where to send. The birthday attack opens many flows on both sides at once
and hopes one flow of each side lines up: A's flow (mapped to ``a``) aims at B's port ``b`` while
B's flow (mapped to ``b``) aims at A's port ``a``. Whichever of the two packets crosses second
finds the other NAT's conntrack entry and gets in; the reply to it goes back over the same pair.

**The maths.** Each side opens ``F`` flows (``sockets`` x ``ports_per_socket``), all aimed at ports
inside the *other* NAT's pool (the ports it maps new flows to, ``N`` of them). A given pair of
flows (one per side) lines up when B's mapping equals A's target (1/N_B) and A's mapping equals
B's target (1/N_A), independently for a NAT that picks ports at random. With F_A x F_B pairs the
number of aligned pairs is close to Poisson with mean ``mu = F_A F_B / (N_A N_B)``, so::

    P(success) = 1 - exp(-F_A F_B / (N_A N_B))

Defaults: 64 sockets x 8 ports = 512 flows per side. Against 256-port pools (the lab's ranged
symmetric NAT, ``masquerade to :P-P+255 fully-random``): mu = 512^2 / 256^2 = 4, P = 98.2%.
Against a NAT that picks among all 64512 ports (the lab's default symmetric NAT, and many real
carrier NATs): mu = 6.3e-5, P = 0.006%: the attack is for NATs with small pools or predictable
(sequential) allocation, which is why it is off by default.

Measured between two real 256-port NATs in network namespaces (tests/integration/
test_traversal_birthday.py's topology, one round per trial, conntrack flushed in between):
512 flows 49/50 rounds won (predicted 98.2%), 256 flows 43/70 (63.2%), 128 flows 12/70 (22.1%).
A won round settles in 0.1-0.4 s after notBefore; a lost one ends at the budget, 10 s.

**Where to aim.** Just before a round each side opens a few fresh sockets and asks STUN where its
NAT maps them (:func:`own_window`): a NAT that allocates sequentially shows a step, and the next
flows land just above the last sample; a random one shows ports spread over its pool, and every
port between the lowest and highest sample lies inside a contiguous pool. Each side publishes
that window with its round entry and the other aims at its centre-most ``candidates`` ports.

**Coordination** (:class:`Session`, clock injected, wall-clock seconds): through the two nodes'
``status.birthday`` entries. The node whose name sorts first leads: it publishes ``{round,
notBefore}`` (``lead`` seconds ahead) with its window; the other joins by publishing the same
round and notBefore with its own window; both start probing at notBefore. A leader that does not
see the join by notBefore abandons the round. A failed round is retried no sooner than
``directRetryIntervalSeconds`` after it ended (the joining side refuses earlier rounds too).

**Bounds** (:class:`BirthdaySettings`, checked on construction): at most 256 sockets, 2048 flows,
3 passes, 25 s per round (below the 30 s conntrack timeout of unanswered UDP, so every mapping
made in the first pass still exists when the last packet crosses), and :attr:`BirthdaySettings.
max_probes` datagrams per round. Relayed traffic keeps flowing over the relay meanwhile: the
probing sockets are separate from WireGuard's, and WireGuard only moves to the won path after it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from wirekube.models import BirthdayRound
from wirekube.traversal.nat import port_step

MAX_SOCKETS = 256
MAX_FLOWS = 2048
MAX_CANDIDATES = 1024
MAX_PASSES = 3
MAX_BUDGET_S = 25.0
MAX_WINDOW_SAMPLES = 32
LOW_PORT, HIGH_PORT = 1024, 65535


@dataclass(frozen=True)
class BirthdaySettings:
    sockets: int = 64
    """UDP sockets opened per round (each a distinct source port, so distinct NAT mappings)."""
    ports_per_socket: int = 8
    """Destinations each socket probes: flows = sockets x ports_per_socket."""
    candidates: int = 256
    """Distinct destination ports aimed at, the centre-most of the peer's published window."""
    passes: int = 2
    """How many times every flow is probed (the second pass covers loss and a little clock skew)."""
    pass_interval: float = 1.0
    pass_spread: float = 0.5
    """Each pass's datagrams are spread over this many seconds (pacing, not a burst)."""
    budget: float = 10.0
    """Seconds from notBefore until the round is given up."""
    lead: float = 5.0
    """The leader proposes notBefore this far ahead (time for the peer to see it and join)."""
    min_notice: float = 1.0
    """A proposal whose notBefore is closer than this is not joined (too late to prepare)."""
    window_samples: int = 8
    """Fresh sockets asked to STUN to learn where the own NAT maps new flows."""
    max_replies: int = 64
    """Pongs sent per round, at most (answers to the peer's pings)."""
    choose_attempts: int = 5
    choose_interval: float = 0.2
    max_choices: int = 3
    """Leader: proven flows it tries to settle on (CHOOSE, answered by CHOSEN), at most."""

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.sockets <= MAX_SOCKETS, f"sockets must be 1..{MAX_SOCKETS}"),
            (1 <= self.ports_per_socket <= self.candidates, "ports_per_socket must be 1..candidates"),
            (1 <= self.flows <= MAX_FLOWS, f"sockets x ports_per_socket must be at most {MAX_FLOWS}"),
            (1 <= self.candidates <= MAX_CANDIDATES, f"candidates must be 1..{MAX_CANDIDATES}"),
            (1 <= self.passes <= MAX_PASSES, f"passes must be 1..{MAX_PASSES}"),
            (0 < self.budget <= MAX_BUDGET_S, f"budget must be at most {MAX_BUDGET_S}s"),
            ((self.passes - 1) * self.pass_interval + self.pass_spread < self.budget, "passes must fit the budget"),
            (2 <= self.window_samples <= MAX_WINDOW_SAMPLES, f"window_samples must be 2..{MAX_WINDOW_SAMPLES}"),
            (self.lead > self.min_notice > 0, "lead must exceed min_notice > 0"),
            (0 <= self.max_replies <= 256 and 1 <= self.choose_attempts <= 10 and 1 <= self.max_choices <= 5,
             "reply and choice limits out of range"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def flows(self) -> int:
        return self.sockets * self.ports_per_socket

    @property
    def max_probes(self) -> int:
        """Datagrams one side sends in one round, at most (pings, pongs, choose/chosen)."""
        return self.flows * self.passes + self.max_replies + self.choose_attempts * self.max_choices


# ---- the maths ---------------------------------------------------------------------------------------


def expected_matches(flows_a: int, flows_b: int, pool_a: int, pool_b: int) -> float:
    """Mean number of aligned flow pairs (every flow aimed inside the other side's pool)."""
    if min(flows_a, flows_b, pool_a, pool_b) <= 0:
        return 0.0
    return flows_a * flows_b / (pool_a * pool_b)


def success_probability(flows_a: int, flows_b: int, pool_a: int, pool_b: int) -> float:
    """P(at least one aligned pair) = 1 - exp(-mu) (see the module docstring)."""
    return 1.0 - math.exp(-expected_matches(flows_a, flows_b, pool_a, pool_b))


def pool_estimate(port_min: int, port_max: int, samples: int) -> int:
    """Estimated pool size from the span of ``samples`` uniform draws: span x (n+1)/(n-1), at least 1."""
    if port_max <= 0 or port_max < port_min:
        return HIGH_PORT - LOW_PORT + 1
    span = port_max - port_min
    return max(1, round(span * (samples + 1) / max(1, samples - 1)) + 1)


# ---- where to aim --------------------------------------------------------------------------------------


def own_window(ports: Sequence[int], flows: int) -> tuple[int, int]:
    """Where this NAT will map a round's ``flows`` new flows, from fresh STUN samples in order.

    Sequential allocation (a consistent step): just above the last sample, ``flows`` steps wide.
    Otherwise (random): between the lowest and the highest sample. ``(0, 0)``: unknown.
    """
    if len(ports) < 2:
        return 0, 0
    step = port_step(list(ports))
    increasing = all(b > a for a, b in itertools.pairwise(ports))
    if step > 0 and increasing:
        first = ports[-1] + step
        return _clip(first), _clip(first + step * (flows - 1))
    return _clip(min(ports)), _clip(max(ports))


def _clip(port: int) -> int:
    return min(HIGH_PORT, max(LOW_PORT, port))


def candidate_ports(window: tuple[int, int], count: int, fallback: int) -> list[int]:
    """The ``count`` centre-most ports of ``window`` (all of it if narrower); around ``fallback``
    (the peer's published port) when the window is unknown."""
    low, high = window
    if low <= 0 or high < low:
        low, high = _clip(fallback - count // 2), _clip(fallback + count // 2)
    centre = (low + high) // 2
    out = [centre]
    offset = 1
    while len(out) < count and (centre - offset >= low or centre + offset <= high):
        for port in (centre + offset, centre - offset):
            if low <= port <= high and len(out) < count:
                out.append(port)
        offset += 1
    return out


def plan_targets(sockets: int, ports_per_socket: int, candidates: Sequence[int]) -> list[tuple[int, ...]]:
    """Destination ports for each socket: distinct per socket, every candidate used evenly."""
    if not candidates:
        return [() for _ in range(sockets)]
    per = min(ports_per_socket, len(candidates))
    return [tuple(candidates[(s * per + k) % len(candidates)] for k in range(per)) for s in range(sockets)]


def send_schedule(settings: BirthdaySettings, targets: Sequence[Sequence[int]]) -> list[tuple[float, int, int]]:
    """Every ping of a round: (seconds after notBefore, socket index, destination port).

    Pass p starts at ``p x pass_interval``; within a pass, flows are spread over ``pass_spread``
    seconds, interleaving sockets so each NAT sees many sources at once.
    """
    flows = [(s, port) for k in range(max((len(t) for t in targets), default=0))
             for s, t in enumerate(targets) if k < len(t) for port in (t[k],)]
    gap = settings.pass_spread / max(1, len(flows))
    return [(p * settings.pass_interval + i * gap, s, port)
            for p in range(settings.passes) for i, (s, port) in enumerate(flows)]


# ---- coordination ---------------------------------------------------------------------------------------


def stamp(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds (status.birthday.*.notBefore)."""
    t = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_stamp(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def seconds_stamp(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Phase(str, Enum):
    IDLE = "idle"
    PREPARING = "preparing"  # measuring the own window (I/O) before publishing the entry
    PROPOSED = "proposed"  # leader: entry published, waiting for the peer to join
    ARMED = "armed"  # both entries agree: probe at notBefore
    PROBING = "probing"
    WON = "won"  # the peer's traffic runs over the won flow


class Do(str, Enum):
    NONE = "none"
    PREPARE = "prepare"  # measure the own window, then call prepared()
    PROBE = "probe"  # notBefore has come: probe now
    GAVE_UP = "gave-up"  # the round ended without probing (see Session.reason)


@dataclass(frozen=True)
class Session:
    """One peer's birthday-attack coordination. Times are wall-clock epoch seconds."""

    leader: bool
    phase: Phase = Phase.IDLE
    round: int = 0
    not_before: float = 0.0
    own: BirthdayRound | None = None  # what this node publishes in status.birthday.<peer>
    joined: tuple[int, str] = (0, "")  # follower: the last (round, notBefore) joined
    next_attempt_at: float = 0.0  # leader: no proposal before this
    last_start: float = float("-inf")  # notBefore of the last round probed (retry spacing)
    reason: str = ""  # why the peer is (still) relayed; "" while nothing has failed
    rounds_failed: int = 0

    @property
    def active(self) -> bool:
        return self.phase in (Phase.PREPARING, Phase.PROPOSED, Phase.ARMED, Phase.PROBING)


def step(s: Session, now: float, peer: BirthdayRound | None, settings: BirthdaySettings,
         retry_interval: float) -> tuple[Session, Do]:
    """Advance by one observation of the clock and of the peer's entry for us."""
    if s.phase is Phase.IDLE:
        if s.leader:
            if now >= s.next_attempt_at:
                number = max(s.round, peer.round if peer else 0) + 1
                return replace(s, phase=Phase.PREPARING, round=number, not_before=0.0, own=None), Do.PREPARE
            return s, Do.NONE
        if peer is None or (peer.round, peer.not_before) == s.joined:
            return s, Do.NONE
        try:
            start = parse_stamp(peer.not_before)
        except ValueError:
            return s, Do.NONE
        if start < now + settings.min_notice or start < s.last_start + retry_interval:
            return s, Do.NONE  # too late to prepare, or sooner than the retry interval allows
        return replace(s, phase=Phase.PREPARING, round=peer.round, not_before=start, own=None,
                       joined=(peer.round, peer.not_before)), Do.PREPARE
    if s.phase is Phase.PREPARING:
        if not s.leader and now >= s.not_before:
            return _gave_up(s, now, retry_interval, "not ready by notBefore"), Do.GAVE_UP
        return s, Do.NONE
    if s.phase is Phase.PROPOSED:
        if peer is not None and s.own is not None and (peer.round, peer.not_before) == (s.own.round, s.own.not_before):
            return replace(s, phase=Phase.ARMED), Do.NONE
        if now >= s.not_before:
            return _gave_up(s, now, retry_interval, f"peer did not join round {s.round}"), Do.GAVE_UP
        return s, Do.NONE
    if s.phase is Phase.ARMED:
        if not s.leader and now < s.not_before and (
                peer is None or (peer.round, peer.not_before) != s.joined):
            return _gave_up(s, now, retry_interval, f"peer abandoned round {s.round}"), Do.GAVE_UP
        if now >= s.not_before:
            return replace(s, phase=Phase.PROBING, last_start=s.not_before), Do.PROBE
    return s, Do.NONE


def prepared(s: Session, now: float, window: tuple[int, int], settings: BirthdaySettings) -> Session:
    """The own window is measured: publish the entry (leader: propose; follower: join)."""
    if s.phase is not Phase.PREPARING:
        return s
    start = now + settings.lead if s.leader else s.not_before
    entry = BirthdayRound(s.round, stamp(start), window[0], window[1])
    # The leader's notBefore is what it published (millisecond precision), so both sides agree.
    return replace(s, phase=Phase.PROPOSED if s.leader else Phase.ARMED, own=entry,
                   not_before=parse_stamp(entry.not_before))


def finished(s: Session, now: float, won: bool, retry_interval: float, detail: str = "") -> Session:
    """The probing of this round ended."""
    if won:
        return replace(s, phase=Phase.WON, own=None, reason="")
    return _gave_up(s, now, retry_interval, detail or "no aligned flow")


def lost(s: Session, now: float, retry_interval: float) -> Session:
    """A won path stalled (the peer is relayed again): a new round after the retry interval."""
    return replace(s, phase=Phase.IDLE, own=None, next_attempt_at=now + retry_interval)


def _gave_up(s: Session, now: float, retry_interval: float, detail: str) -> Session:
    reason = f"birthday attack failed at {seconds_stamp(now)} ({detail})"
    return replace(s, phase=Phase.IDLE, own=None, next_attempt_at=now + retry_interval, reason=reason[:256],
                   rounds_failed=s.rounds_failed + 1)
