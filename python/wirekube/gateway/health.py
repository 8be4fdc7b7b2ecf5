"""Whether a gateway peer is healthy.  Pure: the controller's clock is passed in as ``now``.

A gateway peer is healthy when (1) its WireKubePeer exists and is valid (so it has a public
key), (2) its agent reports ``status.connected``, and (3) when the gateway's health check is
enabled, its agent's latest report (``status.peerHealthDetail.<peer>``) is fresh and shows fewer
than ``failureThreshold`` consecutive failures.

Freshness is judged on the controller's clock: :func:`observe_reports` remembers when each
report *changed* (as the controller saw it), and a report unchanged for
:func:`~wirekube.gateway.contract.stale_after` seconds is stale.  That needs no agreement
between the agent's clock and the controller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wirekube.gateway.contract import HEALTHY, UNHEALTHY, UNKNOWN, stale_after
from wirekube.models import HealthCheck, HealthReport, Peer


@dataclass(frozen=True)
class ReportSeen:
    """When (controller clock) the controller first saw a given version of a peer's report."""

    version: tuple[str, int]
    seen_at: float


@dataclass(frozen=True)
class Verdict:
    state: str  # HEALTHY | UNHEALTHY | UNKNOWN
    reason: str  # CamelCase, usable as an Event or condition reason
    message: str

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY


def observe_reports(
    previous: Mapping[str, ReportSeen], reports: Mapping[str, HealthReport], now: float
) -> dict[str, ReportSeen]:
    """Update the controller's memory of reports: a report that changed is stamped ``now``."""
    seen: dict[str, ReportSeen] = {}
    for peer, report in reports.items():
        version = (report.last_check, report.consecutive_failures)
        old = previous.get(peer)
        seen[peer] = old if old is not None and old.version == version else ReportSeen(version, now)
    return seen


def peer_verdict(
    name: str,
    peer: Peer | None,
    invalid_reason: str,
    hc: HealthCheck,
    report: HealthReport | None,
    seen: ReportSeen | None,
    now: float,
) -> Verdict:
    """The health of gateway peer ``name`` (see the module docstring for the rules)."""
    if peer is None:
        if invalid_reason:
            return Verdict(UNHEALTHY, "PeerInvalid", f"WireKubePeer {name} is invalid: {invalid_reason}")
        return Verdict(UNHEALTHY, "PeerNotFound", f"WireKubePeer {name} does not exist")
    if not peer.spec.public_key:
        return Verdict(UNHEALTHY, "NoPublicKey", f"WireKubePeer {name} has no public key")
    if not peer.status.connected:
        return Verdict(UNHEALTHY, "PeerNotConnected", f"the agent of {name} reports no recent handshake")
    if not hc.enabled:
        return Verdict(HEALTHY, "Connected", f"{name} is connected (health check disabled)")
    return _report_verdict(name, hc, report, seen, now)


def _report_verdict(
    name: str, hc: HealthCheck, report: HealthReport | None, seen: ReportSeen | None, now: float
) -> Verdict:
    if report is None or seen is None:
        return Verdict(UNKNOWN, "NoHealthReport", f"the agent of {name} has not reported a health check yet")
    age = now - seen.seen_at
    if age >= stale_after(hc):
        # No ages in messages: they end up in conditions, which must not change on every pass.
        return Verdict(
            UNKNOWN,
            "HealthReportStale",
            f"no new health report from the agent of {name} within {stale_after(hc):.0f}s "
            "(failureThreshold x intervalSeconds + timeoutSeconds)",
        )
    if report.consecutive_failures >= hc.failure_threshold:
        detail = f": {report.message}" if report.message else ""
        return Verdict(
            UNHEALTHY,
            "HealthCheckFailing",
            f"health check of {hc.target} from {name} failed {report.consecutive_failures} times in a row "
            f"(threshold {hc.failure_threshold}){detail}",
        )
    return Verdict(HEALTHY, "HealthCheckPassing", f"health check of {hc.target} from {name} passes")


def stale_at(hc: HealthCheck, seen: ReportSeen | None) -> float | None:
    """When (controller clock) the report in ``seen`` turns stale; None when there is nothing to wait for."""
    if not hc.enabled or seen is None:
        return None
    return seen.seen_at + stale_after(hc)


__all__ = ["HEALTHY", "UNHEALTHY", "UNKNOWN", "ReportSeen", "Verdict", "observe_reports", "peer_verdict", "stale_at"]
