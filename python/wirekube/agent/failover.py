"""The traversal's ticker: liveness, failover to the relay, and probes back to direct.

Every ``tick`` s it reads the engine's counters, feeds each peer's liveness
(:mod:`wirekube.traversal.liveness`) and path state machine (:mod:`wirekube.traversal.pathsm`), follows
a peer that moved to the relay, and runs the direct-path probes that bring a relayed peer back.
"""

from __future__ import annotations

import base64
import ipaddress
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

from wirekube.agent.pathstate import PeerState, raw, timing
from wirekube.agent.wg.base import WgPeerState
from wirekube.models import Endpoint, RelayMode, Transport
from wirekube.traversal import liveness, nat, pathsm

if TYPE_CHECKING:
    from wirekube.agent.traversal import Traversal

# How long an endpoint still at our proxy after our own move to direct is put down to our lag.
DIRECT_WRITE_GRACE_SECONDS = 10.0
# A relayed peer that reaches us directly (WireGuard roamed off our proxy) went back to direct:
# probe at once rather than at our own retry time, at most this often.  Without it two agents
# whose retry timers are out of phase chase each other (each follows the other to the relay).
ROAM_PROBE_MIN_INTERVAL_SECONDS = 5.0


def _loopback(port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address("127.0.0.1"), port)


@dataclass
class _Tick:
    """One tick: its clocks and timing, and what it decided under the lock (done after it is released)."""

    now: float  # monotonic
    wall: float
    timing: pathsm.Timing
    changed: bool = False
    probes: list[str] = field(default_factory=list)
    roamed: dict[str, Endpoint] = field(default_factory=dict)
    switch: list[tuple[str, Endpoint]] = field(default_factory=list)


class Failover:
    """Drives every peer's path from the engine's counters (the ticker thread) and runs the direct
    probes (their own short threads). Per-peer state is the owner's; this class keeps none."""

    def __init__(self, owner: Traversal) -> None:
        self._t = owner

    def run(self) -> None:
        t = self._t
        # The ticker must outlive any one failed tick: the engine's state is unreadable while
        # wireguard-go (re)starts, and a dead ticker silently ends failover, recovery and the
        # birthday attack for the life of the agent. A failure is logged when it starts or
        # changes, not ten times a second.
        failing = ""
        while not t._stop.wait(t.settings.tick):
            try:
                t.tick(time.monotonic(), time.time())
            except Exception as e:  # noqa: BLE001
                what = f"{type(e).__name__}: {e}"
                if what != failing:
                    t._log.opt(exception=True).warning("traversal tick failed (retrying every {}s): {}",
                                                       t.settings.tick, what)
                failing = what
            else:
                if failing:
                    t._log.info("traversal tick works again")
                failing = ""

    def tick(self, now: float, wall: float) -> None:
        t = self._t
        t.birthdays.tick(wall)
        wg = t._engine_state()
        if wg is None:
            return
        with t._lock:
            mesh = t._view.mesh
            if mesh is None or mesh.spec.relay.mode is not RelayMode.AUTO:
                return
            work = _Tick(now, wall, timing(mesh, t.settings.stall_after))
            for name, state in t._peers.items():
                self._step(name, state, wg.peers.get(state.key), work)
        for key, proxy in work.switch:
            if t._fast_switch is not None:
                try:
                    t._fast_switch(key, proxy)
                except Exception as e:  # noqa: BLE001 - the reconcile pass writes it anyway
                    t._log.warning("fast endpoint switch to {} failed ({}); the reconcile pass will write it",
                                   proxy, e)
        for name in work.probes:
            t._spawn(partial(self.probe, name, work.roamed.get(name)), f"probe-{name}")
        if work.changed:
            t._report_transitions()
            t._wake()

    def _step(self, name: str, state: PeerState, ws: WgPeerState | None, work: _Tick) -> None:
        """One peer's tick (lock held): liveness, following the peer, roaming back, the state machine."""
        t, now = self._t, work.now
        rx = ws.rx_bytes if ws is not None else 0
        state.live = liveness.observe(state.live, now, ws.tx_bytes if ws is not None else 0, rx,
                                      t.heartbeat.beats(name))
        settling = t.birthdays.settling(name, now)
        at_proxy = (ws is not None and ws.config.endpoint is not None and ws.config.endpoint.ip.is_loopback
                    and bool(state.proxy_port) and ws.config.endpoint.port == state.proxy_port)
        won_port = t.birthdays.won_port(name)
        if settling and at_proxy and won_port:
            # A packet the peer sent through the relay just before its own switch roamed our
            # WireGuard back to the relay proxy: point it at the won path again at once
            # (otherwise each side follows the other back to the relay).
            work.switch.append((state.key, _loopback(won_port)))
        if state.awaiting_direct_since is not None and (
                state.path.transport is not Transport.DIRECT or (ws is not None and not at_proxy)
                or now - state.awaiting_direct_since > DIRECT_WRITE_GRACE_SECONDS):
            state.awaiting_direct_since = None
        if (state.path.transport is Transport.DIRECT and at_proxy and not settling
                and state.awaiting_direct_since is None and t.relay_available()):
            state.path = pathsm.follow_to_relay(state.path, now, work.timing)
            if name in t.birthdays.sessions:
                state.path = replace(state.path, relay_by_matrix=True)
                t.birthdays.lost(name, work.wall)
            t._log.warning("peer {}: it now reaches us through the relay; following it", name)
            work.changed = True
            return
        if (state.path.transport is Transport.RELAY and not state.path.relay_by_matrix and not settling
                and ws is not None and ws.config.endpoint is not None and not ws.config.endpoint.ip.is_loopback
                and not state.probing and now - state.roam_probe_at >= ROAM_PROBE_MIN_INTERVAL_SECONDS):
            state.roam_probe_at = now
            state.probing = True
            work.probes.append(name)
            work.roamed[name] = ws.config.endpoint
            t._log.info("peer {}: it reaches us directly again; probing direct now", name)
        self._machine(name, state, rx, work)

    def _machine(self, name: str, state: PeerState, rx: int, work: _Tick) -> None:
        """The path state machine's tick for one peer (lock held), and what its action asks for."""
        t = self._t
        stall_after = state.live.stall_after(work.timing.stall_after)
        new, action = pathsm.tick(state.path, work.now, rx, work.timing, wall=work.wall,
                                  unanswered_for=state.live.unanswered_for(work.now), stall_after=stall_after)
        if action is pathsm.Action.USE_RELAY:
            if not state.proxy_port or not t.relay_available():
                return  # no relay path to fail over to: keep trying direct
            t._log.warning("peer {}: {} -> relay (unanswered {:.2f}s, {} heartbeats; threshold {:.2f}s)",
                           name, new.reason, state.live.unanswered_seconds(), state.live.unanswered, stall_after)
            if name in t.birthdays.sessions:  # a won birthday path died: new rounds after the retry interval
                new = replace(new, relay_by_matrix=True)
                t.birthdays.lost(name, work.wall)
            if new.failovers > state.path.failovers and t._on_failover:
                t._on_failover(name, new.last_failover_detect_s)
            if name not in t.birthdays.sessions:
                work.switch.append((state.key, _loopback(state.proxy_port)))
            work.changed = True
        elif action is pathsm.Action.PROBE_DIRECT and not state.probing:
            state.probing = True
            work.probes.append(name)
        state.path = new

    # ------------------------------------------------------------------ direct probes

    def peer_probed_us(self, key: bytes) -> None:
        """A peer we relay just proved its side of the direct path: probe back at once."""
        t = self._t
        text = base64.b64encode(key).decode()
        with t._lock:
            name = next((n for n, s in t._peers.items() if s.key == text), None)
            state = t._peers.get(name) if name else None
            if name is None or state is None or state.path.transport is not Transport.RELAY \
                    or state.path.relay_by_matrix or state.probing:
                return
            state.probing = True
        t._spawn(partial(self.probe, name), f"probe-back-{name}")

    def probe(self, name: str, seen_at: Endpoint | None = None) -> None:
        """Probe the direct path; ``seen_at``: where the peer's packets came from (a symmetric
        NAT's port for us, which its published endpoint is not)."""
        t = self._t
        ok = False
        try:
            with t._lock:
                state, peer = t._peers.get(name), t._view.peers.get(name)
            if state is None or peer is None or t._listener is None:
                return
            target = seen_at or peer.spec.endpoint
            if state.decision.path is nat.Path.DIRECT_LAN and peer.status.host_endpoints:
                target = Endpoint.parse(peer.status.host_endpoints[0])
            if target is not None:
                ok = t._listener.ping(raw(state.key), str(target.ip), target.port)
        finally:
            with t._lock:
                state = t._peers.get(name)
                if state is not None:
                    state.probing = False
                    was = state.path.transport
                    state.path, _ = pathsm.probe_result(state.path, time.monotonic(), ok)
                    if ok and was is not Transport.DIRECT and state.path.transport is Transport.DIRECT:
                        state.awaiting_direct_since = time.monotonic()
            if ok:
                t._log.info("peer {}: direct path works again -> direct", name)
                t._report_transitions()
                t._wake()
