"""What NAT traversal reports: the Peer status fields and conditions it fills in, transport Events.

Reads the owner's (:class:`~wirekube.agent.traversal.Traversal`) state; never changes a path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from wirekube.gateway import conditions as cond
from wirekube.models import PeerStatus, Transport

if TYPE_CHECKING:
    from wirekube.agent.traversal import Traversal

# Status condition: the relay proxy's loopback sendto() keeps failing with EPERM (Cilium's socket
# LB); `wirekubectl doctor` reports it. Present only once it has been True (False = recovered).
CONDITION_EPERM = "RelayProxyEPERM"
# Status condition: no relay address can be reached (the message has each address's error, e.g.
# an HTTP proxy refusing the credentials). Present only once it has been True.
CONDITION_RELAY_UNREACHABLE = "RelayUnreachable"


class StatusReport:
    """Owns what was last reported: each peer's transport (for ``on_transition``), the relay proxy
    ports whose EPERM persisted and the relay problem, so that each change is logged once."""

    def __init__(self, owner: Traversal) -> None:
        self._t = owner
        self._reported: dict[str, Transport] = {}
        self._eperm_last: set[int] = set()
        self._relay_problem_last: tuple[str, str] | None = None

    def transitions(self) -> None:
        """Call ``on_transition(peer, old, new, reason)`` once per transport change (for Events)."""
        t = self._t
        with t._lock:
            current = {n: (s.path.transport, s.path.reason or s.decision.reason) for n, s in t._peers.items()}
            changes = [(n, self._reported.get(n), tr, r) for n, (tr, r) in current.items()
                       if self._reported.get(n) != tr]
            self._reported = {n: tr for n, (tr, _) in current.items()}
        if t._on_transition is None:
            return
        for name, old, new, reason in changes:
            if old is None and new is Transport.DIRECT:
                continue  # a new peer starting direct is not news
            try:
                t._on_transition(name, old.value if old else "none", new.value, reason)
            except Exception:  # noqa: BLE001 - reporting must never break path selection
                t._log.exception("transport change report failed")

    def decorate(self, status: PeerStatus, now: float | None = None) -> PeerStatus:
        """Fill in what traversal knows: NAT type, discovery method, relay reasons, LAN endpoints,
        and the ``RelayProxyEPERM`` condition. ``now``: wall clock (condition transition times)."""
        t = self._t
        wall = time.time() if now is None else now
        observed = t.discoverer.observed_endpoints(time.monotonic())
        d = t.discovery()
        with t._lock:
            reasons = {n: s.path.reason or s.decision.reason for n, s in t._peers.items()
                       if s.path.transport is Transport.RELAY}
            rounds = {n: b.session.own for n, b in sorted(t.birthdays.sessions.items()) if b.session.own is not None}
        over = t._relay.transport() if t._relay is not None else ""
        if over and over != "tcp":  # raw TCP is the rule; anything else is named (issue 19)
            reasons = {n: f"{r} (relay over {over})" for n, r in reasons.items()}
        return replace(
            status,
            nat_type=d.nat.nat_type,
            nat_port_step=d.nat.port_step,
            endpoint_discovery_method=(d.method.value if d.method else status.endpoint_discovery_method),
            relay_reasons=reasons,
            host_endpoints=d.host_endpoints,
            udp_blocked=d.udp_blocked,
            conditions=self._relay_condition(self._eperm_condition(status.conditions, wall), wall),
            observed_endpoints=observed,
            birthday=rounds,
        )

    # ------------------------------------------------------------------ EPERM condition

    def _eperm_ports(self) -> list[int]:
        """Relay proxy ports whose EPERM persists. Read from this thread without waiting for the
        relay's loop (publishing the status must never queue behind the data path); a proxy added
        at that very moment makes the read fail, and the last answer stands until the next pass."""
        relay = self._t._relay
        if relay is None:
            return []
        try:
            return list(relay.eperm_active())
        except RuntimeError:  # the proxies changed while being read
            return sorted(self._eperm_last)

    def _eperm_condition(self, conditions: tuple[Mapping[str, object], ...],
                         wall: float) -> tuple[Mapping[str, object], ...]:
        t = self._t
        ports = sorted(set(self._eperm_ports()))
        with t._lock:
            by_port = {s.proxy_port: n for n, s in t._peers.items() if s.proxy_port}
        if ports:
            where = ", ".join(f"{by_port.get(p, 'unknown peer')} (127.0.0.1:{p})" for p in ports)
            message = (f"sendto() on the relay proxy for {where} has failed with EPERM for more than "
                       f"{getattr(t._relay, 'eperm_persistent_after', 10):.0f}s; the socket is recreated "
                       f"every {getattr(t._relay, 'eperm_retry', 3):.0f}s (Cilium socket LB?)")
            out = cond.set_condition(conditions, CONDITION_EPERM, True, "SendtoEPERM", message, wall, 0)
        elif cond.find(conditions, CONDITION_EPERM) is not None:
            out = cond.set_condition(conditions, CONDITION_EPERM, False, "Recovered",
                                     "sendto() on every relay proxy works", wall, 0)
        else:
            out = [dict(c) for c in conditions]
        if set(ports) != self._eperm_last:
            if ports:
                t._log.warning("relay proxy EPERM persists on {}", ", ".join(
                    f"{by_port.get(p, '?')}:{p}" for p in ports))
            else:
                t._log.info("relay proxy EPERM cleared")
            self._eperm_last = set(ports)
        return tuple(out)

    def _relay_condition(self, conditions: tuple[Mapping[str, object], ...],
                         wall: float) -> tuple[Mapping[str, object], ...]:
        """``RelayUnreachable``: True (with every address's error: a refused proxy password says
        so) once every relay address failed and none is connected; False once one is again.
        Present only after it was first True.  Logged when it changes."""
        t = self._t
        relay = t._relay
        problem = relay.problem() if relay is not None else None
        if problem is not None:
            reason, message = problem
            out = cond.set_condition(conditions, CONDITION_RELAY_UNREACHABLE, True, reason, message, wall, 0)
        elif cond.find(conditions, CONDITION_RELAY_UNREACHABLE) is not None and relay is not None \
                and relay.connected_relays():
            out = cond.set_condition(conditions, CONDITION_RELAY_UNREACHABLE, False, "Connected",
                                     f"relay connected over {relay.transport() or 'tcp'}", wall, 0)
        else:
            out = [dict(c) for c in conditions]
        if problem != self._relay_problem_last:
            if problem is not None:
                t._log.error("relay unreachable ({}): {}", problem[0], problem[1])
            elif self._relay_problem_last is not None:
                t._log.info("relay reachable again")
            self._relay_problem_last = problem
        return tuple(out)
