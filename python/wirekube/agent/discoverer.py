"""Endpoint discovery in the agent: STUN from the WireGuard port, the relay's NAT probe, reflection.

The classification itself is pure (:mod:`wirekube.traversal.nat`, :mod:`wirekube.traversal.reflection`);
this module runs the discovery loop and keeps what it found for :class:`~wirekube.agent.traversal.Traversal`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from wirekube.agent.pathstate import Discovery
from wirekube.models import Endpoint, EndpointDiscovery, Mesh, NatType, Transport
from wirekube.relay.protocol import PROBE_FROM_ALTERNATE_PORT
from wirekube.traversal import liveness, nat, rawudp, reflection

if TYPE_CHECKING:
    from wirekube.agent.traversal import Traversal


class Discoverer:
    """Owns what this node publishes about itself: the last discovery (``found``), the retry
    back-off of inconclusive rounds, and the endpoint reflection adopted from peers' observations."""

    def __init__(self, owner: Traversal) -> None:
        self._t = owner
        self.found = Discovery()
        self.retry = 0.0  # > 0: the last discovery round was inconclusive; next one in that many s
        self.discovered_once = threading.Event()
        self._reflected: Endpoint | None = None
        self._reflected_basis: Endpoint | None = None  # the STUN endpoint when the reflection was adopted

    def run(self) -> None:
        t = self._t
        while not t._stop.is_set():
            with t._lock:
                mesh = t._view.mesh
                addrs = t._view.local_addresses
            if mesh is not None:
                try:
                    self.discover(mesh, addrs)
                except Exception:  # noqa: BLE001 - try again next round
                    t._log.exception("endpoint discovery failed")
            if not self.discovered_once.is_set():
                delay = 1.0
            else:  # an inconclusive round (e.g. the relay was down) is retried soon, backing off
                delay = self.retry or t.settings.stun_interval
            t._stop.wait(delay)

    def stun_servers(self, mesh: Mesh) -> list[str]:
        if mesh.spec.stun_servers:
            return [str(s) for s in mesh.spec.stun_servers]
        return [f"{ip}:{port}" for ip, port in self._t.relay_addresses(mesh)]

    def discover(self, mesh: Mesh, local_addresses: tuple[str, ...]) -> Discovery:
        t = self._t
        port = mesh.spec.listen_port
        targets = rawudp.resolve(self.stun_servers(mesh))
        samples = rawudp.stun_probe(targets, port, timeout=t.settings.stun_timeout) if targets else []
        unsolicited = self.nat_probe(samples[0]) if len(samples) >= 2 else None
        with t._lock:
            last = self.found
        fresh = nat.classify(samples, port, local_addresses, unsolicited_probe_received=unsolicited)
        udp_blocked = bool(targets) and not samples and bool(t._relay and t._relay.connected_relays())
        if udp_blocked:  # the relay answers over TCP but no STUN answer comes back: that is news
            classification, conclusive = fresh, True
        else:
            classification, conclusive = nat.settle(last.nat, fresh, samples, probed=unsolicited is not None)
        endpoint, method = None, None
        if samples:  # for a symmetric NAT the port is per destination: peers learn the real one by roaming
            endpoint = Endpoint(ipaddress.ip_address(samples[0].mapped_ip), samples[0].mapped_port)
            method = EndpointDiscovery.STUN
        elif not udp_blocked:
            # No STUN server answered and the relay is not reachable either (a relay outage or
            # rollout): nothing is known to have changed, so the last mapping stands.
            endpoint, method = last.endpoint, last.method
        self.retry = 0.0 if conclusive else min(max(2.0, self.retry * 2), t.settings.stun_interval)
        host = tuple(f"{a}:{port}" for a in local_addresses if ipaddress.ip_address(a).version == 4)
        return self._adopt(Discovery(endpoint, method, classification, udp_blocked, host))

    def _adopt(self, found: Discovery) -> Discovery:
        """Keep a new finding; a reflection the finding contradicts is dropped; news is synced and woken."""
        t = self._t
        dropped = False
        with t._lock:
            before = self.found
            self.found = found
            if self._reflected is not None and (found.endpoint != self._reflected_basis
                                                or found.nat.nat_type is NatType.SYMMETRIC):
                t._log.info("endpoint reflection dropped: discovery now finds {} ({})", found.endpoint,
                            found.nat.nat_type.value or "unknown")
                self._reflected = self._reflected_basis = None
                dropped = True
        self.discovered_once.set()
        if found != before or dropped:
            t._log.info("discovery: nat={} endpoint={} udp_blocked={}", found.nat.nat_type.value or "unknown",
                        found.endpoint, found.udp_blocked)
            t._sync_peers()
            t._wake()
        return found

    def nat_probe(self, first: nat.StunSample) -> bool | None:
        """Ask the relay to send UDP probes to our mapping from its two ports; was the second seen?"""
        t = self._t
        relay, listener = t._relay, t._listener
        if relay is None or listener is None or t._loop is None:
            return None
        if not relay.connected_relays():
            return None
        listener.nat_probes_seen.clear()
        try:
            sent = bool(t._call(relay.nat_probe(first.mapped_ip, first.mapped_port, timeout=3.0), timeout=9.0))
        except Exception:  # noqa: BLE001 - inconclusive
            return None
        if not sent:
            return None
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and PROBE_FROM_ALTERNATE_PORT not in listener.nat_probes_seen:
            time.sleep(0.02)
        return PROBE_FROM_ALTERNATE_PORT in listener.nat_probes_seen

    def current(self) -> Discovery:
        """What this node publishes: the STUN finding, or the reflected endpoint when peers on a
        working direct path see us elsewhere (see :mod:`wirekube.traversal.reflection`)."""
        with self._t._lock:
            if self._reflected is not None:
                return replace(self.found, endpoint=self._reflected, method=EndpointDiscovery.REFLECTION)
            return self.found

    # ------------------------------------------------------------------ endpoint reflection

    def update_reflection(self) -> bool:
        """Adopt the endpoint every reporting peer sees us at (guards in reflection.reflect).

        A reflection stands until another one replaces it or discovery finds something new: once
        it is published, observers see nothing different any more and stop reporting it."""
        t = self._t
        with t._lock:
            own = t._view.own
            published = own.spec.endpoint if own is not None else None
            observed = []
            for p in t._view.peers.values():
                text = p.status.observed_endpoints.get(t.node)
                if text:
                    with contextlib.suppress(ValueError):
                        observed.append(Endpoint.parse(text))
            candidate, _why = reflection.reflect(published, observed, self.found.nat.nat_type, self.found.endpoint)
            if candidate is None or candidate == self._reflected:
                return False
            self._reflected, self._reflected_basis = candidate, self.found.endpoint
        t._log.info("endpoint reflection: peers on direct paths reach us at {} (published {}); publishing it",
                    candidate, published)
        return True

    def observed_endpoints(self, now: float) -> dict[str, str]:
        """Observer side: peers on healthy direct paths whose real endpoint differs from their published one."""
        t = self._t
        try:
            wg = t._engine_state()
        except Exception:  # noqa: BLE001 - no engine yet: nothing observed
            wg = None
        if wg is None:
            return {}
        # An idle peer answers one heartbeat per IDLE_INTERVAL: healthy while that keeps coming.
        fresh = max(3.0, 2 * t.settings.stall_after, 1.5 * liveness.IDLE_INTERVAL)
        out: dict[str, str] = {}
        with t._lock:
            for name, state in t._peers.items():
                peer, ws = t._view.peers.get(name), wg.peers.get(state.key)
                if peer is None or ws is None:
                    continue
                seen = reflection.observation(
                    peer.spec.endpoint, ws.config.endpoint,
                    direct=state.path.transport is Transport.DIRECT and state.path.established,
                    healthy=now - state.path.last_rx_at <= fresh and not state.live.unanswered_for(now),
                    lan_path=state.decision.path is nat.Path.DIRECT_LAN)
                if seen is not None:
                    out[name] = str(seen)
        return out
