"""Electing a gateway's active peer, and the make-before-break handover to it.  Pure (``now`` in).

:func:`elect` picks the *target*: the first healthy entry of ``spec.peerRefs``.  One refinement
keeps a flapping preferred peer from bouncing traffic (each switch breaks the connections SNATed
by the old gateway): when the current active peer is healthy, a peer earlier in ``peerRefs``
takes over only after it has been healthy for ``failback_after`` seconds.  A failover (the
active peer is unhealthy) is never delayed.

:func:`handover` moves ``activePeer`` to the target in two phases (see
:mod:`wirekube.gateway.contract`): first ``pendingPeer = target``; then, once the target
acknowledges forwarding for the current routes, ``activePeer = target``.  If the target stays
silent for ``timeout`` seconds while the old active peer is unhealthy, the switch is forced.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from wirekube.gateway.health import Verdict


@dataclass(frozen=True)
class Election:
    target: str  # "" when no peer is healthy
    reason: str
    message: str
    recheck_at: float | None = None


@dataclass(frozen=True)
class HandoverState:
    """The controller's memory of an ongoing handover: to whom, since when (controller clock)."""

    peer: str = ""
    since: float = 0.0


@dataclass(frozen=True)
class Handover:
    active: str
    pending: str
    state: HandoverState
    switched: bool = False  # activePeer changes in this step
    forced: bool = False  # ... without the new peer's acknowledgement
    started: bool = False  # a new handover began in this step
    recheck_at: float | None = None


def update_healthy_since(
    previous: Mapping[str, float], verdicts: Mapping[str, Verdict], now: float
) -> dict[str, float]:
    """Since when (controller clock) each currently healthy peer has been healthy without a break."""
    return {name: previous.get(name, now) for name, v in verdicts.items() if v.healthy}


def elect(
    order: Sequence[str],
    verdicts: Mapping[str, Verdict],
    current: str,
    healthy_since: Mapping[str, float],
    now: float,
    failback_after: float,
) -> Election:
    """The peer that should be active (see the module docstring)."""
    healthy = [name for name in order if verdicts[name].healthy]
    if not healthy:
        why = "; ".join(verdicts[name].message for name in order)
        return Election("", "NoHealthyPeer", f"no gateway peer is healthy: {why}")
    first = healthy[0]
    if first == current:
        return Election(first, "Active", f"{first} is the first healthy peer of peerRefs")
    if current in healthy:
        since = healthy_since.get(first, now)
        if now - since < failback_after:
            return Election(
                current,
                "FailbackPending",
                f"{first} precedes {current} in peerRefs and is healthy again; "
                f"switching back once it has been healthy for {failback_after:.0f}s",
                recheck_at=since + failback_after,
            )
        return Election(first, "Failback", f"{first} precedes {current} in peerRefs and has been healthy "
                                            f"for at least {failback_after:.0f}s")
    if current:
        old = verdicts.get(current)
        why = old.message if old is not None else f"{current} is no longer in peerRefs"
        return Election(first, "Failover", f"{current} is not usable ({why}); {first} is the first healthy peer")
    return Election(first, "Elected", f"{first} is the first healthy peer of peerRefs")


def handover(
    target: str,
    active: str,
    acked: Collection[str],
    active_healthy: bool,
    memory: HandoverState,
    now: float,
    timeout: float,
) -> Handover:
    """The next (activePeer, pendingPeer) on the way from ``active`` to ``target``.

    ``acked`` holds the peers that confirmed forwarding for the current routes.  ``active`` must
    already be "" when the current active peer is gone (deleted, or removed from peerRefs).
    """
    if not target or target == active:
        return Handover(active=active, pending="", state=HandoverState())
    started = memory.peer != target
    state = HandoverState(target, now) if started else memory
    if target in acked:
        return Handover(active=target, pending="", state=HandoverState(), switched=True, started=started)
    deadline = state.since + timeout
    if not active_healthy and now >= deadline:
        return Handover(
            active=target, pending="", state=HandoverState(), switched=True, forced=True, started=started
        )
    return Handover(
        active=active,
        pending=target,
        state=state,
        started=started,
        recheck_at=None if active_healthy else deadline,
    )
