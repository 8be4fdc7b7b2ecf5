"""Path MTU towards each direct peer: the search and when to repeat it (pure, clock injected).

The agent (:mod:`wirekube.agent.pmtu`) sends ICMP echo requests with DF set through the WireGuard
interface to a peer's mesh IP.  An echo of ``size`` bytes (the inner IPv4 packet) leaves this node
as a WireGuard packet of ``size + overhead`` bytes (:data:`IPV4_OVERHEAD`: outer IPv4 20 + UDP 8 +
WireGuard data header 16 + authentication tag 16; WireGuard also pads the inner packet to a multiple
of 16 bytes, see :func:`wire_size`), so a reply says that a packet of that size
crossed the underlay both ways.  The largest inner size that gets a reply is the MTU for that
peer's routes.

:class:`Search` finds it in rounds of parallel probes rather than one probe at a time: each round
probes up to ``per_round`` sizes spread over the interval still open (between the largest size
known to pass and the smallest known to fail), so 576..1500 byte paths are resolved to the byte in
four rounds (about four probe timeouts) instead of ten sequential ones.  Only replies count as
evidence that a size fits: a lost probe can make the answer smaller than the truth, never larger
(property-tested).

:class:`Schedule` decides when to search again: at first sight of a direct peer, when its
endpoint changes, every ``research_every`` seconds (the only way a path that grew is noticed),
and when a *check* fails: every ``check_every`` seconds one echo at the current size is sent (cheap: one packet)
to a peer that carries traffic, every ``idle_check_every`` seconds to an idle one (the cost follows
use, as the heartbeat's does: 1,000 idle peers cost 33 checks/s, not 333; a path that shrank while
idle is found within about 40 s, or within seconds once it carries traffic again), and
``check_failures`` unanswered checks in a row (after a miss the next check comes after
``recheck_after``) mean the path shrank (a lowered MTU on the way).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

IPV4_OVERHEAD = 60
"""Bytes WireGuard adds around an inner packet on an IPv4 underlay."""
IPV6_OVERHEAD = 80
"""... on an IPv6 underlay."""
MIN_PATH = 576
"""The smallest underlay path searched (every IPv4 host accepts 576-byte datagrams)."""
WARN_BELOW = 1280
"""Underlay paths below this are reported (IPv6's minimum link MTU; doctor warns)."""
ECHO_HEADERS = 28
"""Inner IPv4 header 20 + ICMP echo header 8: payload = size - ECHO_HEADERS."""


PADDING = 16
"""WireGuard pads every inner packet to a multiple of 16 bytes (never beyond the interface MTU)."""


def overhead(endpoint_is_ipv6: bool) -> int:
    return IPV6_OVERHEAD if endpoint_is_ipv6 else IPV4_OVERHEAD


def wire_size(inner: int, overhead: int, link_mtu: int | None = None) -> int:
    """The WireGuard packet that carries an inner packet of ``inner`` bytes."""
    padded = -(-inner // PADDING) * PADDING
    return (min(padded, link_mtu) if link_mtu is not None else padded) + overhead


def path_below(inner: int, floor: int = WARN_BELOW, overhead: int = IPV4_OVERHEAD) -> bool:
    """Whether a measured inner size ``inner`` proves the underlay path smaller than ``floor``
    (the next padded size would have fitted a ``floor``-byte path, and did not pass)."""
    return wire_size(inner + PADDING, overhead) <= floor


def largest_inner(path: int, overhead: int) -> int:
    """The largest inner packet a ``path``-byte underlay carries (e.g. 1216 for 1280 over IPv4:
    1220 would be padded to 1232, a 1292-byte WireGuard packet)."""
    return (path - overhead) // PADDING * PADDING


class Search:
    """The largest inner packet size in ``[low, high]`` that gets through, found in rounds.

    ``sizes()`` says what to probe this round; ``feed()`` takes the sizes that got a reply.  When
    ``done``, ``result`` is the answer, or None if not even ``low`` passed (peer unreachable or a
    path below the searched range: nothing is concluded).
    """

    def __init__(self, low: int, high: int, per_round: int = 16) -> None:
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got {low}..{high}")
        if per_round < 2:
            raise ValueError("per_round must be at least 2")
        self.low, self.high, self.per_round = low, high, per_round
        self.good: int | None = None
        """The largest size known to pass."""
        self.bad: int = high + 1
        """The smallest size known (or assumed) to fail."""
        self.rounds = 0
        self.done = False
        self.result: int | None = None
        self._pending: tuple[int, ...] = (high, low) if high != low else (high,)

    def sizes(self) -> tuple[int, ...]:
        return () if self.done else self._pending

    def feed(self, replied: Iterable[int]) -> None:
        if self.done:
            return
        probed = self._pending
        got = {s for s in replied if s in probed}
        self.rounds += 1
        if self.good is None:  # the first round: the top, and the floor
            if self.high in got:
                self._finish(self.high)
                return
            if self.low not in got:
                self._finish(None)
                return
            self.good, self.bad = self.low, self.high
        else:
            if got:
                self.good = max(self.good, max(got))
            above = [s for s in probed if s > self.good and s not in got]
            if above:
                self.bad = min(self.bad, min(above))
        if self.bad - self.good <= 1:
            self._finish(self.good)
            return
        gap = self.bad - self.good
        step = max(1, math.ceil(gap / (self.per_round + 1)))
        self._pending = tuple(range(self.good + step, self.bad, step))[: self.per_round]

    def _finish(self, result: int | None) -> None:
        self.done, self.result, self._pending = True, result, ()


@dataclass(frozen=True)
class Timing:
    check_every: float = 3.0
    idle_check_every: float = 30.0
    """A peer that carried no traffic lately is checked this often; once it is active again its
    next check is due at once if the last one is older than ``check_every``."""
    recheck_after: float = 1.0
    """After an unanswered check, the next one comes this soon (a shrunk path is searched sooner)."""
    check_failures: int = 2
    research_every: float = 600.0
    retry_unreachable: float = 10.0
    """A search that concluded nothing (no reply at all) is retried after this long."""


@dataclass
class PeerMtu:
    """What is known about one peer's path."""

    endpoint: str
    mtu: int | None = None
    """The inner size found (None: not measured yet, or nothing concluded)."""
    next_search: float = -math.inf
    checked_at: float = -math.inf
    failed_checks: int = 0


@dataclass
class Schedule:
    """Per-peer bookkeeping: which peers need a search or a check at ``now``."""

    timing: Timing = field(default_factory=Timing)
    peers: dict[str, PeerMtu] = field(default_factory=dict)
    idle: set[str] = field(default_factory=set)
    """Peers that carried no traffic lately (see :meth:`follow`)."""

    def follow(self, endpoints: dict[str, str], idle: Iterable[str] = ()) -> None:
        """The direct peers now (name -> endpoint): new and moved peers start over, gone ones
        are forgotten; ``idle``: those that carried no traffic lately (checked less often)."""
        self.idle = set(idle)
        for name in [n for n in self.peers if n not in endpoints]:
            del self.peers[name]
        for name, endpoint in endpoints.items():
            known = self.peers.get(name)
            if known is None or known.endpoint != endpoint:
                self.peers[name] = PeerMtu(endpoint, mtu=known.mtu if known else None)

    def to_search(self, now: float) -> list[str]:
        return [name for name, p in sorted(self.peers.items())
                if now >= p.next_search or p.failed_checks >= self.timing.check_failures]

    def to_check(self, now: float) -> list[tuple[str, int]]:
        """(peer, size) for one echo each: peers with a result whose check is due."""
        t = self.timing
        return [(name, p.mtu) for name, p in sorted(self.peers.items())
                if p.mtu is not None and p.failed_checks < t.check_failures
                and now - p.checked_at >= (t.recheck_after if p.failed_checks
                                           else t.idle_check_every if name in self.idle else t.check_every)]

    def searched(self, name: str, result: int | None, now: float) -> None:
        p = self.peers.get(name)
        if p is None:
            return
        if result is not None or p.failed_checks == 0:
            p.mtu = result
        # No answer at all after failed checks: the peer may just be down; keep the last size
        # (a shrunk path that answers nothing is retried at ``retry_unreachable``).
        t = self.timing
        p.next_search = now + (t.research_every if result is not None else t.retry_unreachable)
        p.checked_at = now
        p.failed_checks = 0

    def checked(self, name: str, ok: bool, now: float) -> None:
        p = self.peers.get(name)
        if p is None:
            return
        p.checked_at = now
        p.failed_checks = 0 if ok else p.failed_checks + 1

    def mtus(self) -> dict[str, int]:
        return {n: p.mtu for n, p in self.peers.items() if p.mtu is not None}
