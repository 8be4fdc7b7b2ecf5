"""The WireKubeGateway contract between the gateway controller and the node agents.

Pure module (no I/O, no clock): the controller and the agent both import it, so the field names
and the rules below exist in one place.

Who writes what in ``WireKubeGateway.status``
---------------------------------------------
Every writer sends a JSON merge patch to the status subresource containing only the keys it
owns, so writers never overwrite each other and need no resourceVersion.

* The controller (the Lease holder of ``wirekube-gateway``) owns ``activePeer``,
  ``pendingPeer``, ``handoverEpoch``, ``routes``, ``clients``, ``ready``, ``routesInjected``,
  ``peerHealth`` (its *verdict*: healthy | unhealthy | unknown), ``conditions`` and
  ``observedGeneration``.
* The agent of gateway peer ``P`` (a peer named in ``spec.peerRefs``) owns
  ``peerHealthDetail.P``, ``forwarding.P`` and ``lastHealthCheck``, and writes nothing else.

Duties of the agent of a gateway peer P
---------------------------------------
1. Health check (when ``spec.healthCheck.enabled``).  Every ``intervalSeconds`` probe
   ``target`` from P's node: a TCP connect when the target has a port, an ICMP echo otherwise,
   each bounded by ``timeoutSeconds``.  Keep a count of consecutive failures (reset to 0 by a
   success and when the target changes).  After *every* check, success or not, write
   :func:`health_report_patch`: ``peerHealthDetail.P = {lastCheck, consecutiveFailures,
   message}`` and ``lastHealthCheck``.  ``lastCheck`` must differ between writes (use
   :func:`rfc3339` with microseconds): each write is also P's heartbeat.
   The agent does not decide anything.  The controller applies ``failureThreshold`` to
   ``consecutiveFailures``, and it treats a report it has not seen change for
   ``failureThreshold x intervalSeconds + timeoutSeconds`` seconds (:func:`stale_after`) as
   *unknown*, so a killed agent counts as a failed gateway.  Staleness is measured on the
   controller's clock, from when the controller saw the report change, never by comparing
   ``lastCheck`` with the controller's clock, so node clock skew cannot fake or hide a failure.
2. Forwarding (:func:`forwarding_duty`).  While ``status.activePeer == P`` or
   ``status.pendingPeer == P``, keep in place, in WireKube's own nftables table only:
   ip_forward; accept forwarding between the WireGuard interface and every CIDR of
   ``status.routes`` in both directions; and, when ``spec.snat.enabled``, SNAT traffic from the
   mesh to each route CIDR (masquerade, or snat to ``spec.snat.sourceIP``).  Once those rules
   are installed for exactly ``status.routes``, write :func:`forwarding_ack_patch` with those
   routes and the current ``status.handoverEpoch``: ``forwarding.P = {ready: true, routes:
   [...], epoch: N}``; rewrite it whenever ``status.routes`` or ``handoverEpoch`` changes.  When
   P is neither active nor pending, remove the rules and then write ``forwarding.P = null``;
   do the same at agent start-up before anything else, so an acknowledgement left behind by a
   killed agent is withdrawn.

Duties of the agent of a client peer C (C listed in ``status.clients``)
-----------------------------------------------------------------------
3. Routes (:func:`client_allowed_ips`).  When ``status.activePeer`` is not empty, the WireGuard
   peer entry of ``activePeer`` carries its own ``spec.allowedIPs`` *plus* ``status.routes``, and
   table 22347 has a route for each of ``status.routes`` via the WireGuard interface.  When
   ``activePeer`` changes, the routes move with it (WireGuard's cryptokey routing takes an
   allowed IP from the old peer when it is set on the new one); when it is empty, or C is no
   longer a client, they go.  The controller never writes the gateway peer's ``spec``: that
   peer's own agent owns it.

Make-before-break
-----------------
A change of gateway is two phases.  (1) The controller sets ``pendingPeer = B``, increments
``handoverEpoch`` and leaves ``activePeer`` alone: clients keep using the old gateway A while B
installs forwarding/SNAT and acknowledges in ``forwarding.B`` with the new epoch.  (2) Seeing
``forwarding.B`` ready with the current routes *and the current epoch* (an older acknowledgement,
say from before B's agent was killed, does not count), the controller sets ``activePeer = B``
and clears ``pendingPeer`` in one write: clients move to B, and A, neither active nor pending,
removes its rules.  The active peer's acknowledgement must match the current routes for
``ready`` to be true, so a route change is confirmed the same way.  If B does not acknowledge within the
controller's handover timeout and A is unhealthy (so there is nothing left to break), the
controller moves clients anyway and records a ``HandoverForced`` Warning Event; while A is still
healthy it keeps waiting.  When no gateway peer is healthy, ``activePeer`` stays (clients keep
the routes, so private traffic never leaks to a default route) and ``ready`` is false.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wirekube.models import ForwardingAck, Gateway, HealthCheck, HealthReport, IPNetwork

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
UNKNOWN = "unknown"

PHASE_ACTIVE = "active"
PHASE_PENDING = "pending"


@dataclass(frozen=True)
class ForwardingDuty:
    """What the agent of a gateway peer must forward and SNAT for one gateway."""

    gateway: str
    phase: str  # PHASE_ACTIVE | PHASE_PENDING
    routes: tuple[IPNetwork, ...]
    snat: bool
    snat_source_ip: ipaddress.IPv4Address | None
    epoch: int
    """Echo it in the acknowledgement (:func:`forwarding_ack_patch`)."""
    virtual_ip: ipaddress.IPv4Interface | None = None
    """Hold and announce it (spec.virtualIP): only in the active phase, after the forwarding."""


def stale_after(hc: HealthCheck) -> float:
    """Seconds after which an unchanged health report no longer counts (the agent is presumed dead)."""
    return float(hc.failure_threshold * hc.interval_seconds + hc.timeout_seconds)


def rfc3339(ts: float) -> str:
    """A UTC RFC 3339 timestamp with microseconds (so successive reports always differ)."""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def forwarding_duty(gateway: Gateway, me: str) -> ForwardingDuty | None:
    """The forwarding ``me`` must have in place for ``gateway``, or None (then: no rules)."""
    status = gateway.status
    if me not in gateway.spec.peer_refs:
        return None
    if status.active_peer == me:
        phase = PHASE_ACTIVE
    elif status.pending_peer == me:
        phase = PHASE_PENDING
    else:
        return None
    return ForwardingDuty(
        gateway=gateway.name,
        phase=phase,
        routes=status.routes,
        snat=gateway.spec.snat.enabled,
        snat_source_ip=gateway.spec.snat.source_ip,
        epoch=status.handover_epoch,
        virtual_ip=gateway.spec.virtual_ip if phase == PHASE_ACTIVE else None,
    )


def client_allowed_ips(gateways: Iterable[Gateway], me: str) -> dict[str, tuple[IPNetwork, ...]]:
    """Extra AllowedIPs (and table-22347 routes) client ``me`` gives to each gateway peer, by peer name."""
    extra: dict[str, list[IPNetwork]] = {}
    for gw in sorted(gateways, key=lambda g: g.name):
        status = gw.status
        if not status.active_peer or status.active_peer == me or me not in status.clients:
            continue
        bucket = extra.setdefault(status.active_peer, [])
        bucket.extend(r for r in status.routes if r not in bucket)
    return {peer: tuple(routes) for peer, routes in extra.items()}


def health_report_patch(me: str, report: HealthReport) -> dict[str, Any]:
    """The merge patch (status subresource) the agent of gateway peer ``me`` writes after a check."""
    return {
        "status": {
            "peerHealthDetail": {
                me: {
                    "lastCheck": report.last_check,
                    "consecutiveFailures": report.consecutive_failures,
                    "message": report.message[:1024],
                }
            },
            "lastHealthCheck": report.last_check,
        }
    }


def forwarding_ack_patch(me: str, routes: Sequence[IPNetwork] | None, epoch: int = 0) -> dict[str, Any]:
    """The merge patch confirming forwarding for ``routes`` at ``epoch``; ``None`` withdraws it."""
    value: dict[str, Any] | None = (
        None if routes is None else {"ready": True, "routes": [str(r) for r in routes], "epoch": epoch}
    )
    return {"status": {"forwarding": {me: value}}}


def acknowledged(
    forwarding: Mapping[str, ForwardingAck], peer: str, routes: Sequence[IPNetwork], epoch: int | None = None
) -> bool:
    """Whether ``peer`` confirmed forwarding for exactly ``routes`` (any order), at ``epoch`` if given."""
    ack = forwarding.get(peer)
    return bool(
        ack is not None and ack.ready and set(ack.routes) == set(routes) and (epoch is None or ack.epoch == epoch)
    )
