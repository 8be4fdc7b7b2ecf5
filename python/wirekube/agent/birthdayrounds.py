"""The birthday attack in the agent: one session per symmetric peer, its rounds' threads, the won path.

Pure coordination lives in :mod:`wirekube.traversal.birthday`, the round's I/O in
:mod:`wirekube.traversal.birthdaypath`; this module runs them for :class:`~wirekube.agent.traversal.Traversal`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

from wirekube.agent.pathstate import raw
from wirekube.models import Transport
from wirekube.traversal import birthday, birthdaypath, nat, pathsm, probe, rawudp
from wirekube.traversal.birthday import Do, Phase

if TYPE_CHECKING:
    from wirekube.agent.traversal import Traversal

BIRTHDAY_PENDING = "peer symmetric and local symmetric: birthday attack pending"
# After a won round the two agents switch WireGuard over one after the other (the follower a
# little later): meanwhile the peer's packets still come through the relay and our WireGuard roams
# to the relay proxy. That is not the peer falling back, so it is not followed for this long.
BIRTHDAY_SETTLE_SECONDS = 5.0


@dataclass
class BirthdaySession:
    """One symmetric peer's birthday attack: coordination, the running round, the won path."""

    key: str
    session: birthday.Session
    cancel: threading.Event = field(default_factory=threading.Event)
    busy: bool = False  # a round's thread is running
    proxy: birthdaypath.WonPathProxy | None = None
    proxy_port: int = 0
    won_at: float = float("-inf")  # monotonic
    own_pool: int = 0
    last_stats: birthdaypath.ProbeStats | None = None


class BirthdayRounds:
    """Owns the birthday sessions (by peer name): starts, advances and ends them, runs each round on
    its own thread, and opens or closes the won path's proxy. Shares the owner's lock and view."""

    def __init__(self, owner: Traversal) -> None:
        self._t = owner
        self.sessions: dict[str, BirthdaySession] = {}

    def sync(self) -> None:
        """One session per peer decided BIRTHDAY (called with the lock held)."""
        peers = self._t._peers
        for name in list(self.sessions):
            state = peers.get(name)
            if state is None or state.decision.path is not nat.Path.BIRTHDAY or state.key != self.sessions[name].key:
                self.end(name)
        for name, state in peers.items():
            if state.decision.path is nat.Path.BIRTHDAY and name not in self.sessions:
                self.sessions[name] = BirthdaySession(state.key, birthday.Session(leader=self._t.node < name))

    def end(self, name: str) -> None:
        b = self.sessions.pop(name, None)
        if b is None:
            return
        b.cancel.set()
        self._close_won_proxy(b)

    def _close_won_proxy(self, b: BirthdaySession) -> None:
        proxy, b.proxy, b.proxy_port = b.proxy, None, 0
        if proxy is not None:
            self._close_proxy(proxy)

    def _close_proxy(self, proxy: birthdaypath.WonPathProxy) -> None:
        loop = self._t._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(proxy.close)
        else:
            proxy.close()

    def won_port(self, name: str) -> int:
        """The won path's proxy port for ``name``, 0 without one (lock held)."""
        b = self.sessions.get(name)
        return b.proxy_port if b is not None else 0

    def settling(self, name: str, now: float) -> bool:
        """Just won (see BIRTHDAY_SETTLE_SECONDS; lock held)."""
        return name in self.sessions and now - self.sessions[name].won_at < BIRTHDAY_SETTLE_SECONDS

    def lost(self, name: str, wall: float) -> None:
        """The won path stalled (lock held): back to rounds after the retry interval."""
        b, mesh = self.sessions.get(name), self._t._view.mesh
        if b is None or mesh is None:
            return
        b.session = birthday.lost(b.session, wall, float(mesh.spec.relay.direct_retry_interval_seconds))
        self._close_won_proxy(b)

    def tick(self, wall: float) -> None:
        """Advance every session: propose/join rounds, start probing at notBefore, give up."""
        t = self._t
        starts: list[tuple[str, BirthdaySession]] = []
        changed = False
        with t._lock:
            mesh = t._view.mesh
            if mesh is None or not self.sessions:
                return
            retry = float(mesh.spec.relay.direct_retry_interval_seconds)
            for name, b in self.sessions.items():
                if b.busy and b.session.phase is Phase.IDLE:
                    continue  # the last round's thread is still finishing
                peer = t._view.peers.get(name)
                entry = peer.status.birthday.get(t.node) if peer is not None else None
                before = b.session
                b.session, do = birthday.step(b.session, wall, entry, t.birthday_settings, retry)
                if do is Do.PREPARE:
                    b.busy = True
                    starts.append((name, b))
                elif do is Do.GAVE_UP:
                    self.relay_reason(name, b)
                    t._log.warning("peer {}: {}", name, b.session.reason)
                changed = changed or b.session.own != before.own or b.session.reason != before.reason
        for name, b in starts:
            t._spawn(partial(self._round, name, b), f"birthday-{name}")
        if changed:
            t._wake()

    def relay_reason(self, name: str, b: BirthdaySession) -> None:
        state = self._t._peers.get(name)
        if state is not None and state.path.transport is Transport.RELAY and b.session.reason:
            state.path = replace(state.path, reason=b.session.reason)

    def _round(self, name: str, b: BirthdaySession) -> None:
        """One round's I/O (its own thread): measure the own window, publish, wait, probe, adopt."""
        t = self._t
        try:
            if not self._prepare(name, b):
                return
            t._wake()
            while not (t._stop.is_set() or b.cancel.is_set()):
                with t._lock:
                    phase = b.session.phase
                if phase is Phase.PROBING:
                    break
                if phase not in (Phase.PROPOSED, Phase.ARMED):
                    return  # given up before notBefore (the ticker said why)
                time.sleep(0.02)
            else:
                return
            self._probe(name, b)
        except Exception:  # noqa: BLE001 - a failed round must not stay "probing" forever
            t._log.exception("peer {}: birthday round crashed", name)
            self._finished(name, b, None, "round crashed")
        finally:
            with t._lock:
                b.busy = False

    def _prepare(self, name: str, b: BirthdaySession) -> bool:
        """Measure where the own NAT maps new flows and publish the round; False: the session moved on."""
        t, settings = self._t, self._t.birthday_settings
        with t._lock:
            mesh = t._view.mesh
        ports = birthdaypath.measure_ports(rawudp.resolve(t.stun_servers(mesh)) if mesh else [],
                                           settings.window_samples, timeout=t.settings.stun_timeout)
        window = birthday.own_window(ports, settings.flows)
        with t._lock:
            if self.sessions.get(name) is not b or b.cancel.is_set() or b.session.phase is not Phase.PREPARING:
                return False
            b.session = birthday.prepared(b.session, time.time(), window, settings)
            b.own_pool = birthday.pool_estimate(min(ports, default=0), max(ports, default=0), len(ports))
            t._log.info("peer {}: birthday round {} at {} (own NAT maps new flows to {}-{}, {})", name,
                        b.session.round, b.session.own.not_before if b.session.own else "?", *window,
                        "leading" if b.session.leader else "joining")
        return True

    def _probe(self, name: str, b: BirthdaySession) -> None:
        t, settings = self._t, self._t.birthday_settings
        with t._lock:
            peer = t._view.peers.get(name)
            entry = peer.status.birthday.get(t.node) if peer is not None else None
            session = b.session
        if peer is None or peer.spec.endpoint is None:
            self._finished(name, b, None, "peer has no published endpoint")
            return
        peer_window = (entry.port_min, entry.port_max) if entry is not None else (0, 0)
        candidates = birthday.candidate_ports(peer_window, settings.candidates, peer.spec.endpoint.port)
        targets = birthday.plan_targets(settings.sockets, settings.ports_per_socket, candidates)
        peer_pool = birthday.pool_estimate(peer_window[0], peer_window[1], settings.window_samples)
        estimate = birthday.success_probability(settings.flows, settings.flows, b.own_pool or peer_pool, peer_pool)
        raw_peer = raw(b.key)
        prober = birthdaypath.Prober(settings, session.round, session.leader, raw(t.public_key), raw_peer,
                                     probe.shared_secret(t._private, raw_peer), str(peer.spec.endpoint.ip), targets,
                                     cancelled=lambda: t._stop.is_set() or b.cancel.is_set())
        result = prober.run(session.not_before)
        st = result.stats
        b.last_stats = st
        t._log.info("peer {}: birthday round {} {}: {} sockets, {} flows, {} datagrams sent, {} pings and {} pongs "
                    "received, {:.1f}s (estimated success {:.1%})", name, session.round,
                    "won" if result.won else "failed", st.sockets, st.flows, st.probes_sent, st.pings_received,
                    st.pongs_received, st.elapsed, estimate)
        self._finished(name, b, result, f"round {session.round}: {result.detail}, "
                                        f"{st.flows} flows, estimated success {estimate:.1%}")

    def _open_won_proxy(self, name: str, b: BirthdaySession, result: birthdaypath.ProbeResult | None,
                        detail: str) -> tuple[birthdaypath.WonPathProxy | None, str]:
        """The won path's proxy, open (None without a won path or when it failed to open), and the detail."""
        t = self._t
        remote = result.remote if result is not None and result.won and result.sock is not None else None
        if result is None or result.sock is None or remote is None:
            return None, detail
        with t._lock:
            mesh = t._view.mesh
        peer_key = raw(b.key)
        answer = birthdaypath.chosen_answerer(b.session.round, raw(t.public_key), peer_key,
                                              probe.shared_secret(t._private, peer_key))
        proxy = birthdaypath.WonPathProxy(result.sock, remote, mesh.spec.listen_port if mesh else 51820,
                                          control=answer, pending=result.pending)
        try:
            t._call(proxy.open())
        except Exception as e:  # noqa: BLE001 - no proxy, no path
            t._log.warning("peer {}: cannot open the won path's proxy: {}", name, e)
            proxy.close()
            return None, f"{detail}; proxy failed"
        return proxy, detail

    def _finished(self, name: str, b: BirthdaySession, result: birthdaypath.ProbeResult | None, detail: str) -> None:
        t = self._t
        proxy, detail = self._open_won_proxy(name, b, result, detail)
        with t._lock:
            mesh = t._view.mesh
            retry = float(mesh.spec.relay.direct_retry_interval_seconds) if mesh else 120.0
            state = t._peers.get(name)
            if self.sessions.get(name) is not b or b.cancel.is_set() or state is None:
                t._log.info("peer {}: birthday round {} ended after its session did ({})", name,
                            b.session.round, "won path closed" if proxy is not None else detail)
                if proxy is not None:
                    self._close_proxy(proxy)
                return
            b.session = birthday.finished(b.session, time.time(), proxy is not None, retry, detail)
            if proxy is not None:
                now = time.monotonic()
                b.proxy, b.proxy_port, b.won_at = proxy, proxy.port, now
                # Proven both ways just now: established, so the heartbeat's rx keeps it (or the
                # stall detector hands the peer back to the relay within stall_after).
                state.path = pathsm.PeerPath(Transport.DIRECT, since=now, established=True, last_rx_at=now)
                t._log.info("peer {}: birthday attack won: direct over 127.0.0.1:{} <-> {}", name,
                            b.proxy_port, f"{proxy.remote[0]}:{proxy.remote[1]}")
            else:
                self.relay_reason(name, b)
                t._log.warning("peer {}: {}", name, b.session.reason)
        t._report_transitions()
        t._wake()
