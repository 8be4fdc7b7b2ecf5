"""One gateway's desired status, Events and controller memory.  Pure: ``now`` is passed in.

:func:`plan_gateway` strings the pure layers together: effective routes
(:mod:`~wirekube.gateway.cidrs`), peer health (:mod:`~wirekube.gateway.health`), election and
handover (:mod:`~wirekube.gateway.election`), clients (:mod:`~wirekube.gateway.clients`), and
turns the outcome into the controller-owned status fields, a merge patch that changes only those
(:func:`~wirekube.gateway.conditions.merge_patch`), and the Events of the transitions.

Conditions written:

* ``Ready``: True (``Active``) when the active peer is healthy and has confirmed forwarding for
  the current routes; otherwise False with ``NoRoutes``, ``NoHealthyPeer``, ``HandoverPending``
  or ``ForwardingNotConfirmed``.
* ``RoutesAccepted``: False (``RoutesRejected``) when some routes were rejected, naming why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wirekube.gateway import conditions as cond
from wirekube.gateway.cidrs import OwnedCIDR, Rejected, effective_routes
from wirekube.gateway.clients import select_clients
from wirekube.gateway.contract import acknowledged
from wirekube.gateway.election import Election, Handover, HandoverState, elect, handover, update_healthy_since
from wirekube.gateway.health import ReportSeen, Verdict, observe_reports, peer_verdict, stale_at
from wirekube.models import Gateway, IPAddress, IPNetwork, Mesh, Peer

READY = "Ready"
ROUTES_ACCEPTED = "RoutesAccepted"


@dataclass(frozen=True)
class PlanSettings:
    handover_timeout: float = 10.0
    """Seconds a new gateway peer may take to confirm forwarding before clients move anyway
    (only when the old one is unhealthy)."""
    failback_after: float = 30.0
    """Seconds a preferred peer must be healthy before it takes over from a healthy active peer."""


@dataclass(frozen=True)
class GatewayMemory:
    """What the controller remembers about a gateway between passes (lost on restart: harmless)."""

    reports: Mapping[str, ReportSeen] = field(default_factory=dict)
    healthy_since: Mapping[str, float] = field(default_factory=dict)
    handover: HandoverState = HandoverState()
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True)
class ClusterView:
    mesh: Mesh | None
    peers: Mapping[str, Peer]
    invalid_peers: Mapping[str, str] = field(default_factory=dict)
    addresses: Mapping[str, frozenset[IPAddress]] = field(default_factory=dict)


@dataclass(frozen=True)
class GatewayEvent:
    reason: str
    message: str
    type: str = "Normal"


@dataclass(frozen=True)
class GatewayPlan:
    status: Mapping[str, Any]
    patch: Mapping[str, Any]
    events: tuple[GatewayEvent, ...]
    memory: GatewayMemory
    recheck_at: float | None
    verdicts: Mapping[str, Verdict]
    routes: tuple[IPNetwork, ...]
    rejected: tuple[Rejected, ...]


@dataclass(frozen=True)
class _Readiness:
    ready: bool
    reason: str
    message: str


def plan_gateway(
    gateway: Gateway,
    current_status: Mapping[str, Any],
    view: ClusterView,
    precedence: Sequence[OwnedCIDR],
    memory: GatewayMemory,
    now: float,
    settings: PlanSettings,
) -> GatewayPlan:
    """The next step for ``gateway`` (see the module docstring)."""
    entries = {name: p.spec.allowed_ips for name, p in view.peers.items()}
    routes, rejected = effective_routes(gateway, view.mesh, precedence, entries)
    refs = gateway.spec.peer_refs
    reports = {k: v for k, v in gateway.status.peer_health_detail.items() if k in refs}
    seen = observe_reports(memory.reports, reports, now)
    verdicts = {
        name: peer_verdict(
            name, view.peers.get(name), view.invalid_peers.get(name, ""), gateway.spec.health_check,
            reports.get(name), seen.get(name), now,
        )
        for name in refs
    }
    healthy_since = update_healthy_since(memory.healthy_since, verdicts, now)
    active = gateway.status.active_peer
    current = active if active in refs and active in view.peers else ""
    election = elect(refs, verdicts, current, healthy_since, now, settings.failback_after)
    epoch = _epoch(gateway, election.target, current, memory.handover)
    forwarding = gateway.status.forwarding
    acked = {p for p in refs if acknowledged(forwarding, p, routes, None if p == current else epoch)}
    active_healthy = bool(current) and verdicts[current].healthy
    step = handover(election.target, current, acked, active_healthy, memory.handover, now, settings.handover_timeout)
    readiness = _readiness(step, routes, verdicts, acked, election)
    status = _status(gateway, current_status, view, routes, rejected, step, verdicts, readiness, now)
    status["handoverEpoch"] = epoch
    events = _events(gateway, step, election, verdicts, readiness, current_status, rejected, memory.rejected, routes)
    recheck = _recheck_at(gateway, election, step, seen, verdicts)
    return GatewayPlan(
        status=status,
        patch=cond.merge_patch(current_status, status),
        events=events,
        memory=GatewayMemory(seen, healthy_since, step.state, rejected),
        recheck_at=recheck,
        verdicts=verdicts,
        routes=routes,
        rejected=rejected,
    )


def _epoch(gateway: Gateway, target: str, current: str, memory: HandoverState) -> int:
    """``status.handoverEpoch``, one higher when a handover to a new peer starts in this step."""
    starting = bool(target) and target != current and memory.peer != target
    return gateway.status.handover_epoch + (1 if starting else 0)


def _readiness(
    step: Handover,
    routes: Sequence[IPNetwork],
    verdicts: Mapping[str, Verdict],
    acked: set[str],
    election: Election,
) -> _Readiness:
    if not routes:
        return _Readiness(False, "NoRoutes", "no route of spec.routes can be injected (see RoutesAccepted)")
    if step.pending and not (step.active and verdicts[step.active].healthy):
        return _Readiness(False, "HandoverPending", f"waiting for {step.pending} to confirm forwarding and SNAT "
                                                    f"before clients move to it; {election.message}")
    if not step.active or not verdicts[step.active].healthy:
        return _Readiness(False, "NoHealthyPeer", election.message)
    if step.active not in acked:
        return _Readiness(False, "ForwardingNotConfirmed",
                          f"{step.active} has not confirmed forwarding and SNAT for the current routes")
    suffix = f"; {election.message}" if election.reason == "FailbackPending" else ""
    return _Readiness(True, "Active", f"{step.active} forwards {len(routes)} route(s){suffix}")


def _status(
    gateway: Gateway,
    current_status: Mapping[str, Any],
    view: ClusterView,
    routes: tuple[IPNetwork, ...],
    rejected: tuple[Rejected, ...],
    step: Handover,
    verdicts: Mapping[str, Verdict],
    readiness: _Readiness,
    now: float,
) -> dict[str, Any]:
    clients = select_clients(gateway, view.peers.keys(), view.addresses, routes, step.active)
    conditions = cond.set_condition(
        current_status.get("conditions") or [], READY, readiness.ready, readiness.reason, readiness.message,
        now, gateway.generation,
    )
    conditions = cond.set_condition(
        conditions,
        ROUTES_ACCEPTED,
        not rejected,
        "RoutesRejected" if rejected else "AllRoutesAccepted",
        "; ".join(str(r) for r in rejected) if rejected else f"{len(routes)} route(s) accepted",
        now,
        gateway.generation,
    )
    return {
        "activePeer": step.active,
        "pendingPeer": step.pending,
        "ready": readiness.ready,
        "routes": [str(r) for r in routes],
        "routesInjected": len(routes) if step.active else 0,
        "clients": list(clients),
        "peerHealth": {name: v.state for name, v in verdicts.items()},
        "observedGeneration": gateway.generation,
        "conditions": conditions,
    }


def _events(
    gateway: Gateway,
    step: Handover,
    election: Election,
    verdicts: Mapping[str, Verdict],
    readiness: _Readiness,
    current_status: Mapping[str, Any],
    rejected: tuple[Rejected, ...],
    previously_rejected: tuple[Rejected, ...],
    routes: Sequence[IPNetwork],
) -> tuple[GatewayEvent, ...]:
    events: list[GatewayEvent] = []
    before = gateway.status.active_peer
    if step.started and not step.switched:
        events.append(GatewayEvent(
            "HandoverStarted",
            f"preparing {step.pending}: clients move to it once it confirms forwarding and SNAT for "
            f"{len(routes)} route(s) (active now: {before or 'none'}); {election.message}",
        ))
    if step.switched:
        events.append(_switch_event(before, step.active, election, verdicts))
    if step.forced:
        events.append(GatewayEvent(
            "HandoverForced",
            f"{step.active} did not confirm forwarding in time; clients moved anyway because "
            f"{before or 'no peer'} could not serve",
            "Warning",
        ))
    old_ready = cond.find(current_status.get("conditions") or [], READY)
    if readiness.reason == "NoHealthyPeer" and (old_ready is None or old_ready.get("reason") != "NoHealthyPeer"):
        events.append(GatewayEvent("NoHealthyPeer", readiness.message, "Warning"))
    if rejected and rejected != previously_rejected:
        events.append(GatewayEvent("RouteRejected", "; ".join(str(r) for r in rejected), "Warning"))
    return tuple(events)


def _switch_event(before: str, after: str, election: Election, verdicts: Mapping[str, Verdict]) -> GatewayEvent:
    if not before:
        return GatewayEvent("GatewayActivated", f"{after} is now the active gateway peer: {election.message}")
    if election.reason == "Failback":
        return GatewayEvent("Failback", f"active gateway peer moved from {before} back to {after}: {election.message}")
    old = verdicts.get(before)
    why = f"{old.reason}: {old.message}" if old is not None else f"{before} was removed from spec.peerRefs"
    return GatewayEvent("Failover", f"active gateway peer moved from {before} to {after}; {why}", "Warning")


def _recheck_at(
    gateway: Gateway,
    election: Election,
    step: Handover,
    seen: Mapping[str, ReportSeen],
    verdicts: Mapping[str, Verdict],
) -> float | None:
    """The earliest time the plan can change without any object changing."""
    times = [t for t in (election.recheck_at, step.recheck_at) if t is not None]
    for name, verdict in verdicts.items():
        if verdict.healthy:
            t = stale_at(gateway.spec.health_check, seen.get(name))
            if t is not None:
                times.append(t)
    return min(times, default=None)


def invalid_gateway_patch(current_status: Mapping[str, Any], error: str, now: float, generation: int) -> dict[str, Any]:
    """The status merge patch for a gateway whose spec cannot be used."""
    conditions = cond.set_condition(
        current_status.get("conditions") or [], READY, False, "InvalidSpec", error, now, generation
    )
    return cond.merge_patch(current_status, {"ready": False, "conditions": conditions})
