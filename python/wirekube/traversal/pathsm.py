"""Per-peer transport state machine: direct, failover to the relay, recovery (pure, clock injected).

Inputs on every tick: ``now``, the engine's cumulative ``rx_bytes`` from that peer, and how long
the peer has left our heartbeats unanswered (:mod:`wirekube.traversal.liveness`; WireGuard's
latest-handshake moves only every few minutes and is useless as a failure signal, measured in
environment-notes.md).

* ``DIRECT`` (trying): if nothing is received within ``handshake_timeout``, use the relay
  ("no direct handshake within Ns").
* ``DIRECT`` (established): our heartbeats unanswered for ``stall_after`` seconds -> ``RELAY``
  ("direct path stalled at <time>"): a failover, counted with its detection time.
* ``RELAY`` after a failure: every ``direct_retry_interval`` ask for a *direct probe* (sent
  beside the relayed traffic, so nothing is dropped while probing); a probe that proved the direct
  path both ways moves the peer back to ``DIRECT``.
* ``RELAY`` because the NAT matrix says direct cannot work: no probing (re-decided when either
  side's NAT type changes).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from enum import Enum

from wirekube.models import Transport


class Action(str, Enum):
    NONE = "none"
    USE_DIRECT = "use-direct"
    USE_RELAY = "use-relay"
    PROBE_DIRECT = "probe-direct"


@dataclass(frozen=True)
class Timing:
    handshake_timeout: float = 30.0
    stall_after: float = 1.5
    direct_retry_interval: float = 120.0


@dataclass(frozen=True)
class PeerPath:
    transport: Transport
    since: float
    reason: str = ""
    established: bool = False  # direct only: something was received over it
    relay_by_matrix: bool = False  # relay because direct cannot work: do not probe
    last_rx_bytes: int = -1
    last_rx_at: float = 0.0
    next_probe_at: float = 0.0
    failovers: int = 0
    last_failover_detect_s: float = 0.0

    @classmethod
    def start_direct(cls, now: float) -> PeerPath:
        return cls(Transport.DIRECT, since=now, last_rx_at=now)

    @classmethod
    def start_relay(cls, now: float, reason: str, *, by_matrix: bool, timing: Timing) -> PeerPath:
        return cls(Transport.RELAY, since=now, reason=reason, relay_by_matrix=by_matrix, last_rx_at=now,
                   next_probe_at=now + timing.direct_retry_interval)


def _stamp(now_wall: float) -> str:
    return dt.datetime.fromtimestamp(now_wall, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tick(state: PeerPath, now: float, rx_bytes: int, timing: Timing, *, wall: float | None = None,
         unanswered_for: float | None = None, stall_after: float | None = None) -> tuple[PeerPath, Action]:
    """Advance one peer by one observation. ``wall`` (epoch seconds) is only used in reasons.

    ``unanswered_for``: how long the peer has left what we sent unanswered (from
    :mod:`wirekube.traversal.liveness`); when given, it rather than the time since the last rx
    decides a stall, so an idle peer heartbeated rarely is not mistaken for a dead one;
    ``stall_after`` then overrides ``timing.stall_after`` (it grows when answers are slow)."""
    received = state.last_rx_bytes >= 0 and rx_bytes > state.last_rx_bytes
    if received or state.last_rx_bytes < 0:
        state = replace(state, last_rx_bytes=rx_bytes, last_rx_at=now if received else state.last_rx_at)
    if state.transport is Transport.DIRECT:
        if received and not state.established:
            return replace(state, established=True, reason=""), Action.NONE
        silent = now - state.last_rx_at if unanswered_for is None else unanswered_for
        if not state.established and now - state.since >= timing.handshake_timeout:
            return (_to_relay(state, now, timing, f"no direct handshake within {timing.handshake_timeout:.0f}s"),
                    Action.USE_RELAY)
        if state.established and silent >= (stall_after if stall_after is not None else timing.stall_after):
            when = _stamp(wall if wall is not None else now)
            nxt = _to_relay(state, now, timing, f"direct probe failed at {when}")
            return replace(nxt, failovers=state.failovers + 1, last_failover_detect_s=silent), Action.USE_RELAY
        return state, Action.NONE
    if not state.relay_by_matrix and now >= state.next_probe_at:
        return replace(state, next_probe_at=now + timing.direct_retry_interval), Action.PROBE_DIRECT
    return state, Action.NONE


def follow_to_relay(state: PeerPath, now: float, timing: Timing, reason: str = "peer switched to relay") -> PeerPath:
    """The peer already sends to us through the relay (WireGuard roamed its endpoint to our proxy):
    follow it at once instead of fighting the roam; recovery probes bring both back later."""
    return _to_relay(state, now, timing, reason)


def _to_relay(state: PeerPath, now: float, timing: Timing, reason: str) -> PeerPath:
    return replace(state, transport=Transport.RELAY, since=now, reason=reason, established=False,
                   next_probe_at=now + timing.direct_retry_interval)


def probe_result(state: PeerPath, now: float, ok: bool) -> tuple[PeerPath, Action]:
    """The outcome of a PROBE_DIRECT: both directions answered -> back to direct."""
    if state.transport is not Transport.RELAY or not ok:
        return state, Action.NONE
    return (replace(state, transport=Transport.DIRECT, since=now, reason="", established=True, last_rx_at=now),
            Action.USE_DIRECT)
