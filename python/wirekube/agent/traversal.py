"""NAT traversal in the agent: endpoint discovery, NAT type, per-peer path, failover, recovery.

Glue between the pure parts (:mod:`wirekube.traversal.nat`, :mod:`wirekube.traversal.pathsm`)
and the I/O parts (STUN and probes from the WireGuard port, the warm relay path), feeding the
reconciler two things:

* :meth:`Traversal.paths`: per-peer :class:`~wirekube.agent.plan.PeerPath` overrides: the relay
  proxy's 127.0.0.1 port as the endpoint of relayed peers, a peer's LAN endpoint behind the same
  NAT, WireGuard's standard 25 s keepalive (liveness comes from the heartbeat, see
  :mod:`wirekube.traversal.liveness`);
* :meth:`Traversal.discovery` / :meth:`Traversal.decorate`: what this node publishes (endpoint
  and how it was found, NAT type, port step, UDP blocked, LAN endpoints, relay reasons).

Threads: an asyncio loop (uvloop) for the relay path; a ticker (every ``tick`` s) that reads the
engine's counters and drives each peer's liveness and state machine; the heartbeat sender; a discovery loop
(STUN + the relay's
NATProbe, every ``stun_interval`` s); the probe listener (raw socket, BPF-filtered).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import uvloop
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.agent.birthdayrounds import BirthdayRounds
from wirekube.agent.discoverer import Discoverer
from wirekube.agent.failover import Failover
from wirekube.agent.heartbeat import Heartbeat
from wirekube.agent.pathdecisions import PathDecisions
from wirekube.agent.pathstate import (
    DIRECT_KEEPALIVE,
    RELAY_KEEPALIVE,
    Discovery,
    PeerState,
    View,
    raw,
    timing,
)
from wirekube.agent.plan import PeerPath
from wirekube.agent.relayproc import PathConfig, RelayDatapath
from wirekube.agent.relaywiring import RelayWiring
from wirekube.agent.traversalstatus import StatusReport
from wirekube.agent.wg.base import WgDeviceState
from wirekube.models import FWMARK, Endpoint, Mesh, Peer, PeerStatus
from wirekube.relay.dial import ProxyConfig
from wirekube.traversal import liveness, pathsm
from wirekube.traversal.birthday import BirthdaySettings
from wirekube.traversal.probe import ProbeListener
from wirekube.traversal.relaypath import RelayPath

# What other modules import from here (the agent's main, the reconciler's tests).
__all__ = ["DIRECT_KEEPALIVE", "RELAY_KEEPALIVE", "Discovery", "Traversal", "TraversalSettings"]

T = TypeVar("T")


@dataclass(frozen=True)
class TraversalSettings:
    tick: float = 0.1
    stun_interval: float = 60.0
    stall_after: float = 0.5  # heartbeats unanswered this long (and at least 3 of them): the path is dead
    stun_timeout: float = 2.0


class Traversal:
    """Coordinates NAT traversal for one node: owns the shared state (the view, each peer's
    :class:`~wirekube.agent.pathstate.PeerState`, the lock that guards them, the relay datapath and
    its asyncio loop, the probe listener) and the threads, and hands each concern to a collaborator:
    :class:`~wirekube.agent.pathdecisions.PathDecisions` (per-peer decisions, the planner's overrides),
    :class:`~wirekube.agent.failover.Failover` (the ticker, failover and direct probes),
    :class:`~wirekube.agent.heartbeat.Heartbeat`, :class:`~wirekube.agent.discoverer.Discoverer`
    (endpoint discovery and reflection), :class:`~wirekube.agent.birthdayrounds.BirthdayRounds`,
    :class:`~wirekube.agent.relaywiring.RelayWiring` and :class:`~wirekube.agent.traversalstatus.StatusReport`."""

    def __init__(
        self,
        node_name: str,
        private_key: X25519PrivateKey,
        public_key: str,
        engine_state: Callable[[], WgDeviceState | None],
        wake: Callable[[], None],
        settings: TraversalSettings = TraversalSettings(),
        on_failover: Callable[[str, float], None] | None = None,
        on_transition: Callable[[str, str, str, str], None] | None = None,
        birthday_settings: BirthdaySettings = BirthdaySettings(),
        relay_proxy: ProxyConfig = ProxyConfig(),
        relay_ca_file: str | None = None,
        fast_switch: Callable[[str, Endpoint], None] | None = None,
        relay_datapath: Callable[[PathConfig], RelayDatapath] | None = None,
    ) -> None:
        self.node = node_name
        # Where relayed packets are carried: by default a RelayPath in this process; the agent
        # passes the relay-path process (agent/relayproc.py), which outlives it.
        self._relay_datapath = relay_datapath or _in_process
        self._relay_proxy = relay_proxy
        self._relay_ca_file = relay_ca_file
        self._private = private_key
        self.public_key = public_key
        self._engine_state = engine_state
        self._wake = wake
        self.settings = settings
        self._on_failover = on_failover
        self._on_transition = on_transition
        # A failover writes the relay proxy into WireGuard at once (one endpoint write) rather than
        # waiting for the next reconcile pass (2 s and more on a loaded node); the pass that the
        # wake-up starts then finds the device as it wants it.
        self._fast_switch = fast_switch
        self._lock = threading.RLock()
        self._view = View()
        self._peers: dict[str, PeerState] = {}
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: RelayDatapath | None = None
        self._listener: ProbeListener | None = None
        self._threads: list[threading.Thread] = []
        self.birthday_settings = birthday_settings
        self._log = logger.bind(component="traversal", node=node_name)
        self.decisions = PathDecisions(self)
        self.failover = Failover(self)
        self.heartbeat = Heartbeat(self)
        self.discoverer = Discoverer(self)
        self.birthdays = BirthdayRounds(self)
        self.relays = RelayWiring(self)
        self.report = StatusReport(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Traversal:
        ready = threading.Event()

        def loop_main() -> None:
            self._loop = uvloop.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()

        self._spawn(loop_main, "traversal-loop")
        ready.wait(5)
        self._spawn(self.failover.run, "traversal-tick")
        self._spawn(self.discoverer.run, "traversal-discovery")
        self._spawn(self.heartbeat.run, "traversal-heartbeat")
        return self

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception:  # noqa: BLE001 - log the death of a long-lived thread loudly
                self._log.exception("thread {} died", name)

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        # Probe and birthday-round threads come and go every retry interval: keep only live ones.
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for name in list(self.birthdays.sessions):
                self.birthdays.end(name)
        if self._listener is not None:
            self._listener.close()
        if self._loop is not None and self._relay is not None:
            with contextlib.suppress(Exception):
                self._call(self._relay.close(), timeout=5)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ inputs

    def update_view(self, mesh: Mesh, peers: tuple[Peer, ...], local_addresses: tuple[str, ...]) -> None:
        """The reconciler's latest snapshot (called on every pass)."""
        with self._lock:
            first = self._view.mesh is None
            own = next((p for p in peers if p.name == self.node), None)
            self._view = View(mesh, {p.name: p for p in peers if p.name != self.node}, local_addresses, own)
        if first:
            self._ensure_io(mesh)
        self.relays.sync(mesh)
        self._sync_peers()
        if self.discoverer.update_reflection():
            self._wake()

    def _ensure_io(self, mesh: Mesh) -> None:
        port = mesh.spec.listen_port
        self._relay = self._relay_datapath(PathConfig.of(self._private, port, fwmark=FWMARK, proxy=self._relay_proxy,
                                                         ca_file=self._relay_ca_file))
        try:
            self._listener = ProbeListener(self._private, raw(self.public_key), port, self._known_peer,
                                           on_ping=self.failover.peer_probed_us).start()
        except OSError as e:
            self._log.warning("probe listener unavailable ({}); direct recovery probes disabled", e)

    def _known_peer(self, key: bytes) -> bool:
        text = base64.b64encode(key).decode()
        with self._lock:
            return any(p.spec.public_key == text for p in self._view.peers.values())

    def _device_now(self) -> WgDeviceState | None:
        try:
            return self._engine_state()
        except Exception:  # noqa: BLE001 - the engine may be (re)starting: decide without it
            return None

    def _sync_peers(self) -> None:
        """Re-decide every peer's path after the view or discovery changed (see PathDecisions)."""
        self.decisions.sync()

    def _report_transitions(self) -> None:
        self.report.transitions()

    def _timing(self, mesh: Mesh) -> pathsm.Timing:
        return timing(mesh, self.settings.stall_after)

    # ------------------------------------------------------------------ what others ask

    def paths(self) -> dict[str, PeerPath]:
        """Per-peer overrides for the planner."""
        return self.decisions.paths()

    def active(self, name: str) -> bool:
        """Whether the peer carried traffic beyond heartbeats lately (see liveness): path MTU checks
        follow it too."""
        with self._lock:
            state = self._peers.get(name)
            return state is not None and state.live.active(time.monotonic())

    def heartbeats_due(self, now: float, by_ip: Mapping[str, str], seen: Mapping[str, liveness.Beats]) -> list[str]:
        """See :meth:`wirekube.agent.heartbeat.Heartbeat.due`."""
        return self.heartbeat.due(now, by_ip, seen)

    def tick(self, now: float, wall: float) -> None:
        """One pass of the ticker (see :meth:`wirekube.agent.failover.Failover.tick`)."""
        self.failover.tick(now, wall)

    def relay_addresses(self, mesh: Mesh) -> list[tuple[str, int]]:
        return self.relays.addresses(mesh)

    def relay_available(self) -> bool:
        return self.relays.available()

    def relay_stats(self) -> Mapping[str, int]:
        return self.relays.stats()

    def stun_servers(self, mesh: Mesh) -> list[str]:
        return self.discoverer.stun_servers(mesh)

    def discover(self, mesh: Mesh, local_addresses: tuple[str, ...]) -> Discovery:
        return self.discoverer.discover(mesh, local_addresses)

    def discovery(self) -> Discovery:
        """What this node publishes (see :meth:`wirekube.agent.discoverer.Discoverer.current`)."""
        return self.discoverer.current()

    def decorate(self, status: PeerStatus, now: float | None = None) -> PeerStatus:
        """Fill in what traversal knows (see :meth:`wirekube.agent.traversalstatus.StatusReport.decorate`)."""
        return self.report.decorate(status, now)


def _in_process(config: PathConfig) -> RelayDatapath:
    return RelayPath(config.key(), config.wireguard_port, fwmark=config.fwmark, proxy=config.proxy,
                     ca_file=config.ca_file)
