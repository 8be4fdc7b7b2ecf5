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
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import uvloop
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.agent.plan import HANDSHAKE_FRESH_SECONDS, PeerPath
from wirekube.agent.relayproc import PathConfig, RelayDatapath
from wirekube.agent.wg.base import WgDeviceState, WgPeerState
from wirekube.gateway import conditions as cond
from wirekube.models import (
    ANNOTATION_BIRTHDAY,
    FWMARK,
    Endpoint,
    EndpointDiscovery,
    Mesh,
    NatType,
    Peer,
    PeerStatus,
    RelayMode,
    RelayProvider,
    Toggle,
    Transport,
)
from wirekube.relay.dial import ProxyConfig
from wirekube.relay.protocol import PROBE_FROM_ALTERNATE_PORT
from wirekube.traversal import birthday, birthdaypath, liveness, nat, pathsm, probe, rawudp, reflection
from wirekube.traversal.birthday import BirthdaySettings, Do, Phase
from wirekube.traversal.probe import ProbeListener
from wirekube.traversal.relaypath import RelayPath

# Failover watches rx counters, so something must come back from every peer in use. WireGuard's
# persistent keepalive cannot promise that (its timer is reset by packets *received* too, and
# nothing answers a keepalive). Instead each agent sends an ICMP echo through the tunnel to every
# peer's mesh IP: the peer's kernel answers, the answer counts as rx, and only a path that works
# both ways keeps rx moving. The rate follows use (10 Hz while a peer carries traffic or is being
# proven, one per 10 s when idle: see wirekube.traversal.liveness); the idle heartbeat also keeps
# NAT mappings open, so the keepalive can be WireGuard's standard 25 s.
DIRECT_KEEPALIVE = 25
RELAY_KEEPALIVE = 25
# A direct path still being opened keeps WireGuard's keepalive at 1 s: both NATs must see
# outgoing packets for the hole to open, and the handshake retries ride on them (with 25 s, a
# third of the lab's pairs passed traffic 10-15 s later). Once proven, the idle heartbeat keeps
# the mappings open.
PUNCH_KEEPALIVE = 1
HEARTBEAT_POLL_SECONDS = 0.05
HEARTBEAT_PAYLOAD = b"wirekube-heartbeat"
AGENT_PROBE_PREFIX = b"wirekube-"  # the agent's other echo probes (path MTU) start so
T = TypeVar("T")

# Status condition: the relay proxy's loopback sendto() keeps failing with EPERM (Cilium's socket
# LB); `wirekubectl doctor` reports it. Present only once it has been True (False = recovered).
CONDITION_EPERM = "RelayProxyEPERM"
# Status condition: no relay address can be reached (the message has each address's error, e.g.
# an HTTP proxy refusing the credentials). Present only once it has been True.
CONDITION_RELAY_UNREACHABLE = "RelayUnreachable"


@dataclass(frozen=True)
class TraversalSettings:
    tick: float = 0.1
    stun_interval: float = 60.0
    stall_after: float = 0.5  # heartbeats unanswered this long (and at least 3 of them): the path is dead
    stun_timeout: float = 2.0


@dataclass(frozen=True)
class Discovery:
    endpoint: Endpoint | None = None
    method: EndpointDiscovery | None = None
    nat: nat.Classification = nat.Classification(NatType.UNKNOWN)
    udp_blocked: bool = False
    host_endpoints: tuple[str, ...] = ()


@dataclass
class _PeerState:
    key: str
    decision: nat.Decision
    path: pathsm.PeerPath
    proxy_port: int = 0
    probing: bool = False
    awaiting_direct_since: float | None = None
    """Set when our own probe moved the peer back to direct, until WireGuard shows the direct
    endpoint: meanwhile the endpoint still at our proxy is our reconcile's lag, not the peer
    reaching us through the relay (a slow agent, e.g. in an emulated VM, flapped on it)."""
    roam_probe_at: float = -1e9
    """When a relayed peer last made us probe early by reaching us directly."""
    live: liveness.Liveness = liveness.Liveness()


# How long an endpoint still at our proxy after our own move to direct is put down to our lag.
DIRECT_WRITE_GRACE_SECONDS = 10.0
# A relayed peer that reaches us directly (WireGuard roamed off our proxy) went back to direct:
# probe at once rather than at our own retry time, at most this often.  Without it two agents
# whose retry timers are out of phase chase each other (each follows the other to the relay).
ROAM_PROBE_MIN_INTERVAL_SECONDS = 5.0

BIRTHDAY_PENDING = "peer symmetric and local symmetric: birthday attack pending"
# After a won round the two agents switch WireGuard over one after the other (the follower a
# little later): meanwhile the peer's packets still come through the relay and our WireGuard roams
# to the relay proxy. That is not the peer falling back, so it is not followed for this long.
BIRTHDAY_SETTLE_SECONDS = 5.0


@dataclass
class _Birthday:
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


@dataclass
class _View:
    mesh: Mesh | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    local_addresses: tuple[str, ...] = ()
    own: Peer | None = None


class Traversal:
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
        self._relay_problem_last: tuple[str, str] | None = None
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
        self._reported: dict[str, Transport] = {}
        self._lock = threading.RLock()
        self._view = _View()
        self._peers: dict[str, _PeerState] = {}
        self._beats: dict[str, liveness.Beats] = {}  # by peer name, owned by the heartbeat thread
        self._discovery = Discovery()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: RelayDatapath | None = None
        self._listener: ProbeListener | None = None
        self._threads: list[threading.Thread] = []
        self._discovered_once = threading.Event()
        self._discovery_retry = 0.0  # > 0: the last discovery round was inconclusive; next one in that many s
        self._eperm_last: set[int] = set()
        self.birthday_settings = birthday_settings
        self._bday: dict[str, _Birthday] = {}
        self._reflected: Endpoint | None = None
        self._reflected_basis: Endpoint | None = None  # the STUN endpoint when the reflection was adopted
        self._log = logger.bind(component="traversal", node=node_name)

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
        self._spawn(self._tick_loop, "traversal-tick")
        self._spawn(self._discovery_loop, "traversal-discovery")
        self._spawn(self._heartbeat_loop, "traversal-heartbeat")
        return self

    def _heartbeat_loop(self) -> None:
        """ICMP echo through wire_kube to each peer's mesh IP when its liveness says one is due;
        counts the heartbeat packets each peer sends and answers (see HEARTBEAT_POLL_SECONDS)."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as e:
            self._log.warning("no ICMP heartbeat ({}); failover relies on keepalives", e)
            return
        sock.setblocking(False)
        ident, seq = os.getpid() & 0xFFFF, 0
        packet = b""
        while not self._stop.wait(HEARTBEAT_POLL_SECONDS):
            with self._lock:
                by_ip = {str(p.mesh_ip): n for n, p in self._view.peers.items() if p.mesh_ip is not None}
            targets = self.heartbeats_due(time.monotonic(), by_ip, _drain_heartbeats(sock, by_ip))
            seq = (seq + 1) & 0xFFFF
            if targets:
                packet = icmp_echo(ident, seq)
            for ip in targets:
                with contextlib.suppress(OSError):
                    sock.sendto(packet, (ip, 0))
        sock.close()

    def active(self, name: str) -> bool:
        """Whether the peer carried traffic beyond heartbeats lately (see liveness): path MTU checks
        follow it too."""
        with self._lock:
            state = self._peers.get(name)
            return state is not None and state.live.active(time.monotonic())

    def heartbeats_due(self, now: float, by_ip: Mapping[str, str], seen: Mapping[str, liveness.Beats]) -> list[str]:
        """Count the agents' echo packets received (``seen``, per peer name) and return the mesh IPs
        a heartbeat is due to now (counted as sent)."""
        targets: list[str] = []
        with self._lock:
            # Only relay.mode auto proves paths and fails over; in never/always nothing is urgent.
            auto = self._view.mesh is not None and self._view.mesh.spec.relay.mode is RelayMode.AUTO
            for ip, name in by_ip.items():
                b, got = self._beats.get(name, liveness.Beats()), seen.get(name, liveness.Beats())
                state = self._peers.get(name)
                due = state is not None and liveness.due(state.live, now, auto and _urgent(state))
                if state is not None and due:
                    state.live = liveness.beat(state.live, now)
                    targets.append(ip)
                self._beats[name] = liveness.Beats(b.sent + int(due), b.answered + got.answered,
                                                   b.requests + got.requests, b.probe_bytes + got.probe_bytes)
            for name in list(self._beats):
                if name not in self._peers:
                    del self._beats[name]
        return targets

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
            for name in list(self._bday):
                self._end_birthday(name)
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
            self._view = _View(mesh, {p.name: p for p in peers if p.name != self.node}, local_addresses, own)
        if first:
            self._ensure_io(mesh)
        self._sync_relays(mesh)
        self._sync_peers()
        if self._update_reflection():
            self._wake()

    def _ensure_io(self, mesh: Mesh) -> None:
        port = mesh.spec.listen_port
        self._relay = self._relay_datapath(PathConfig.of(self._private, port, fwmark=FWMARK, proxy=self._relay_proxy,
                                                         ca_file=self._relay_ca_file))
        try:
            self._listener = ProbeListener(self._private, _raw(self.public_key), port, self._known_peer,
                                           on_ping=self._peer_probed_us).start()
        except OSError as e:
            self._log.warning("probe listener unavailable ({}); direct recovery probes disabled", e)

    def _peer_probed_us(self, key: bytes) -> None:
        """A peer we relay just proved its side of the direct path: probe back at once."""
        text = base64.b64encode(key).decode()
        with self._lock:
            name = next((n for n, s in self._peers.items() if s.key == text), None)
            state = self._peers.get(name) if name else None
            if name is None or state is None or state.path.transport is not Transport.RELAY \
                    or state.path.relay_by_matrix or state.probing:
                return
            state.probing = True
        self._spawn(partial(self._probe, name), f"probe-back-{name}")

    def _known_peer(self, key: bytes) -> bool:
        text = base64.b64encode(key).decode()
        with self._lock:
            return any(p.spec.public_key == text for p in self._view.peers.values())

    def relay_addresses(self, mesh: Mesh) -> list[tuple[str, int]]:
        spec = mesh.spec.relay
        external = spec.provider is RelayProvider.EXTERNAL and spec.external_endpoint
        hosts = [spec.external_endpoint] if external else list(mesh.status.relay_endpoints)
        out: list[tuple[str, int]] = []
        for hp in hosts:
            if hp is None:
                continue
            # A headless Service name resolves to every relay replica: keep one warm connection each.
            try:
                infos = socket.getaddrinfo(hp.host, hp.port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as e:
                self._log.warning("cannot resolve relay {}: {}", hp, e)
                continue
            out.extend(dict.fromkeys((str(i[4][0]), hp.port) for i in infos))
        return sorted(dict.fromkeys(out))

    def _sync_relays(self, mesh: Mesh) -> None:
        if self._relay is None or self._loop is None:
            return
        never = mesh.spec.relay.mode is RelayMode.NEVER
        addrs = [] if never else self.relay_addresses(mesh)
        wss = mesh.spec.relay.wss_endpoint
        fallbacks = [wss] if wss is not None and not never else []
        self._loop.call_soon_threadsafe(self._relay.set_relays, addrs, fallbacks)

    # ------------------------------------------------------------------ per-peer decisions

    def _device_now(self) -> WgDeviceState | None:
        try:
            return self._engine_state()
        except Exception:  # noqa: BLE001 - the engine may be (re)starting: decide without it
            return None

    def _facts_of(self, peer: Peer) -> nat.NodeFacts:
        ep = peer.spec.endpoint
        return nat.NodeFacts(
            nat_type=peer.status.nat_type,
            public_ip=str(ep.ip) if ep else "",
            udp_blocked=peer.status.udp_blocked,
            has_host_endpoint=bool(peer.status.host_endpoints),
        )

    def _local_facts(self) -> nat.NodeFacts:
        d = self._discovery
        return nat.NodeFacts(d.nat.nat_type, d.nat.public_ip, d.udp_blocked, bool(d.host_endpoints))

    def _birthday(self, mesh: Mesh, peer: Peer) -> bool:
        """Birthday attack toward ``peer``: the annotation on either node of the pair decides
        ("disabled" wins), else the mesh. Both agents compute the same answer for the pair."""
        own = self._view.own
        values = {peer.annotations.get(ANNOTATION_BIRTHDAY, ""),
                  own.annotations.get(ANNOTATION_BIRTHDAY, "") if own else ""}
        if "disabled" in values:
            return False
        if "enabled" in values:
            return True
        return mesh.spec.birthday_attack is Toggle.ENABLED

    def _sync_peers(self) -> None:
        changed = False
        now = time.monotonic()
        with self._lock:
            mesh = self._view.mesh
            if mesh is None:
                return
            timing = self._timing(mesh)
            local = self._local_facts()
            device: WgDeviceState | None = None
            if any(n not in self._peers for n in self._view.peers):
                device = self._device_now()
            for name in list(self._peers):
                if name not in self._view.peers:
                    gone = self._peers.pop(name)
                    self._drop_proxy(gone.key)
                    changed = True
            for name, peer in self._view.peers.items():
                decision = nat.choose_path(local, self._facts_of(peer), relay_mode=mesh.spec.relay.mode,
                                           birthday=self._birthday(mesh, peer))
                state = self._peers.get(name)
                if state is None or state.decision != decision or state.key != peer.spec.public_key:
                    if decision.path is nat.Path.BIRTHDAY:
                        # Relayed (traffic flows) while rounds of the birthday attack look for a direct path.
                        path = pathsm.PeerPath.start_relay(now, BIRTHDAY_PENDING, by_matrix=True, timing=timing)
                    elif decision.relayed:
                        path = pathsm.PeerPath.start_relay(now, decision.reason, by_matrix=True, timing=timing)
                    elif (state is not None and state.decision.path not in (nat.Path.RELAY, nat.Path.BIRTHDAY)
                          and state.key == peer.spec.public_key):
                        path = state.path  # same direct-ish decision: keep the running state machine
                    elif state is None and device is not None and _proven_before(
                            device.peers.get(peer.spec.public_key), time.time()):
                        # A restarted agent inherits a working direct session: keep it as proven
                        # (no keepalive rewrite, failover armed at once).
                        path = replace(pathsm.PeerPath.start_direct(now), established=True)
                    else:
                        path = pathsm.PeerPath.start_direct(now)
                    self._peers[name] = _PeerState(peer.spec.public_key, decision, path,
                                                   state.proxy_port if state else 0,
                                                   live=state.live if state else liveness.Liveness())
                    changed = True
                if mesh.spec.relay.mode is not RelayMode.NEVER and self._peers[name].proxy_port == 0:
                    self._ensure_proxy(name)
            if self._relay is not None and self._loop is not None:  # proxies of peers gone meanwhile go
                self._loop.call_soon_threadsafe(self._relay.retain, [_raw(s.key) for s in self._peers.values()])
            self._sync_birthdays()
        self._report_transitions()
        if changed:
            self._wake()

    def _report_transitions(self) -> None:
        """Call ``on_transition(peer, old, new, reason)`` once per transport change (for Events)."""
        with self._lock:
            current = {n: (s.path.transport, s.path.reason or s.decision.reason) for n, s in self._peers.items()}
            changes = [(n, self._reported.get(n), t, r) for n, (t, r) in current.items() if self._reported.get(n) != t]
            self._reported = {n: t for n, (t, _) in current.items()}
        if self._on_transition is None:
            return
        for name, old, new, reason in changes:
            if old is None and new is Transport.DIRECT:
                continue  # a new peer starting direct is not news
            try:
                self._on_transition(name, old.value if old else "none", new.value, reason)
            except Exception:  # noqa: BLE001 - reporting must never break path selection
                self._log.exception("transport change report failed")

    def _ensure_proxy(self, name: str) -> None:
        if self._relay is None or self._loop is None:
            return
        state = self._peers[name]
        try:
            state.proxy_port = int(self._call(self._relay.ensure_proxy(_raw(state.key))))
        except Exception as e:  # noqa: BLE001 - keep deciding for the other peers
            self._log.warning("cannot open relay proxy for {}: {}", name, e)

    def _drop_proxy(self, key: str) -> None:
        if self._relay is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._relay.remove_proxy, _raw(key))

    def _timing(self, mesh: Mesh) -> pathsm.Timing:
        return pathsm.Timing(
            handshake_timeout=float(mesh.spec.relay.handshake_timeout_seconds),
            stall_after=self.settings.stall_after,
            direct_retry_interval=float(mesh.spec.relay.direct_retry_interval_seconds),
        )

    def relay_available(self) -> bool:
        return self._relay is not None and bool(self._relay.connected_relays())

    def paths(self) -> dict[str, PeerPath]:
        """Per-peer overrides for the planner."""
        out: dict[str, PeerPath] = {}
        with self._lock:
            mesh = self._view.mesh
            for name, state in self._peers.items():
                if state.path.transport is Transport.RELAY:
                    if state.proxy_port:
                        out[name] = PeerPath(Endpoint(ipaddress.ip_address("127.0.0.1"), state.proxy_port),
                                             RELAY_KEEPALIVE, Transport.RELAY)
                    continue
                endpoint = None
                won = self._bday.get(name)
                if won is not None and won.proxy_port:
                    endpoint = Endpoint(ipaddress.ip_address("127.0.0.1"), won.proxy_port)
                elif state.decision.path is nat.Path.DIRECT_LAN:
                    peer = self._view.peers.get(name)
                    if peer and peer.status.host_endpoints:
                        endpoint = Endpoint.parse(peer.status.host_endpoints[0])
                keepalive: int | None = DIRECT_KEEPALIVE if state.path.established else PUNCH_KEEPALIVE
                if mesh and mesh.spec.relay.mode is RelayMode.NEVER:
                    keepalive = None
                out[name] = PeerPath(endpoint, keepalive, Transport.DIRECT)
        return out

    # ------------------------------------------------------------------ birthday attack

    def _sync_birthdays(self) -> None:
        """One session per peer decided BIRTHDAY (called with the lock held)."""
        for name in list(self._bday):
            state = self._peers.get(name)
            if state is None or state.decision.path is not nat.Path.BIRTHDAY or state.key != self._bday[name].key:
                self._end_birthday(name)
        for name, state in self._peers.items():
            if state.decision.path is nat.Path.BIRTHDAY and name not in self._bday:
                self._bday[name] = _Birthday(state.key, birthday.Session(leader=self.node < name))

    def _end_birthday(self, name: str) -> None:
        b = self._bday.pop(name, None)
        if b is None:
            return
        b.cancel.set()
        self._close_won_proxy(b)

    def _close_won_proxy(self, b: _Birthday) -> None:
        proxy, b.proxy, b.proxy_port = b.proxy, None, 0
        if proxy is not None:
            self._close_proxy(proxy)

    def _close_proxy(self, proxy: birthdaypath.WonPathProxy) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(proxy.close)
        else:
            proxy.close()

    def _birthday_lost(self, name: str, wall: float) -> None:
        """The won path stalled (lock held): back to rounds after the retry interval."""
        b, mesh = self._bday.get(name), self._view.mesh
        if b is None or mesh is None:
            return
        b.session = birthday.lost(b.session, wall, float(mesh.spec.relay.direct_retry_interval_seconds))
        self._close_won_proxy(b)

    def _birthday_tick(self, wall: float) -> None:
        """Advance every session: propose/join rounds, start probing at notBefore, give up."""
        starts: list[tuple[str, _Birthday]] = []
        changed = False
        with self._lock:
            mesh = self._view.mesh
            if mesh is None or not self._bday:
                return
            retry = float(mesh.spec.relay.direct_retry_interval_seconds)
            for name, b in self._bday.items():
                if b.busy and b.session.phase is Phase.IDLE:
                    continue  # the last round's thread is still finishing
                peer = self._view.peers.get(name)
                entry = peer.status.birthday.get(self.node) if peer is not None else None
                before = b.session
                b.session, do = birthday.step(b.session, wall, entry, self.birthday_settings, retry)
                if do is Do.PREPARE:
                    b.busy = True
                    starts.append((name, b))
                elif do is Do.GAVE_UP:
                    self._birthday_relay_reason(name, b)
                    self._log.warning("peer {}: {}", name, b.session.reason)
                changed = changed or b.session.own != before.own or b.session.reason != before.reason
        for name, b in starts:
            self._spawn(partial(self._birthday_round, name, b), f"birthday-{name}")
        if changed:
            self._wake()

    def _birthday_relay_reason(self, name: str, b: _Birthday) -> None:
        state = self._peers.get(name)
        if state is not None and state.path.transport is Transport.RELAY and b.session.reason:
            state.path = replace(state.path, reason=b.session.reason)

    def _birthday_round(self, name: str, b: _Birthday) -> None:
        """One round's I/O (its own thread): measure the own window, publish, wait, probe, adopt."""
        settings = self.birthday_settings
        try:
            with self._lock:
                mesh = self._view.mesh
            ports = birthdaypath.measure_ports(rawudp.resolve(self.stun_servers(mesh)) if mesh else [],
                                               settings.window_samples, timeout=self.settings.stun_timeout)
            window = birthday.own_window(ports, settings.flows)
            with self._lock:
                if self._bday.get(name) is not b or b.cancel.is_set() or b.session.phase is not Phase.PREPARING:
                    return
                b.session = birthday.prepared(b.session, time.time(), window, settings)
                b.own_pool = birthday.pool_estimate(min(ports, default=0), max(ports, default=0), len(ports))
                self._log.info("peer {}: birthday round {} at {} (own NAT maps new flows to {}-{}, {})", name,
                               b.session.round, b.session.own.not_before if b.session.own else "?", *window,
                               "leading" if b.session.leader else "joining")
            self._wake()
            while not (self._stop.is_set() or b.cancel.is_set()):
                with self._lock:
                    phase = b.session.phase
                if phase is Phase.PROBING:
                    break
                if phase not in (Phase.PROPOSED, Phase.ARMED):
                    return  # given up before notBefore (the ticker said why)
                time.sleep(0.02)
            else:
                return
            self._birthday_probe(name, b)
        except Exception:  # noqa: BLE001 - a failed round must not stay "probing" forever
            self._log.exception("peer {}: birthday round crashed", name)
            self._birthday_finished(name, b, None, "round crashed")
        finally:
            with self._lock:
                b.busy = False

    def _birthday_probe(self, name: str, b: _Birthday) -> None:
        settings = self.birthday_settings
        with self._lock:
            peer = self._view.peers.get(name)
            entry = peer.status.birthday.get(self.node) if peer is not None else None
            session = b.session
        if peer is None or peer.spec.endpoint is None:
            self._birthday_finished(name, b, None, "peer has no published endpoint")
            return
        peer_window = (entry.port_min, entry.port_max) if entry is not None else (0, 0)
        candidates = birthday.candidate_ports(peer_window, settings.candidates, peer.spec.endpoint.port)
        targets = birthday.plan_targets(settings.sockets, settings.ports_per_socket, candidates)
        peer_pool = birthday.pool_estimate(peer_window[0], peer_window[1], settings.window_samples)
        estimate = birthday.success_probability(settings.flows, settings.flows, b.own_pool or peer_pool, peer_pool)
        raw_peer = _raw(b.key)
        prober = birthdaypath.Prober(settings, session.round, session.leader, _raw(self.public_key), raw_peer,
                                     probe.shared_secret(self._private, raw_peer), str(peer.spec.endpoint.ip), targets,
                                     cancelled=lambda: self._stop.is_set() or b.cancel.is_set())
        result = prober.run(session.not_before)
        st = result.stats
        b.last_stats = st
        self._log.info("peer {}: birthday round {} {}: {} sockets, {} flows, {} datagrams sent, {} pings and {} pongs "
                       "received, {:.1f}s (estimated success {:.1%})", name, session.round,
                       "won" if result.won else "failed", st.sockets, st.flows, st.probes_sent, st.pings_received,
                       st.pongs_received, st.elapsed, estimate)
        self._birthday_finished(name, b, result, f"round {session.round}: {result.detail}, "
                                                 f"{st.flows} flows, estimated success {estimate:.1%}")

    def _birthday_finished(self, name: str, b: _Birthday, result: birthdaypath.ProbeResult | None, detail: str) -> None:
        proxy = None
        remote = result.remote if result is not None and result.won and result.sock is not None else None
        if result is not None and result.sock is not None and remote is not None:
            with self._lock:
                mesh = self._view.mesh
            peer_key = _raw(b.key)
            answer = birthdaypath.chosen_answerer(b.session.round, _raw(self.public_key), peer_key,
                                                  probe.shared_secret(self._private, peer_key))
            proxy = birthdaypath.WonPathProxy(result.sock, remote, mesh.spec.listen_port if mesh else 51820,
                                              control=answer, pending=result.pending)
            try:
                self._call(proxy.open())
            except Exception as e:  # noqa: BLE001 - no proxy, no path
                self._log.warning("peer {}: cannot open the won path's proxy: {}", name, e)
                proxy.close()
                proxy, detail = None, f"{detail}; proxy failed"
        with self._lock:
            mesh = self._view.mesh
            retry = float(mesh.spec.relay.direct_retry_interval_seconds) if mesh else 120.0
            state = self._peers.get(name)
            if self._bday.get(name) is not b or b.cancel.is_set() or state is None:
                self._log.info("peer {}: birthday round {} ended after its session did ({})", name,
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
                self._log.info("peer {}: birthday attack won: direct over 127.0.0.1:{} <-> {}", name,
                               b.proxy_port, f"{proxy.remote[0]}:{proxy.remote[1]}")
            else:
                self._birthday_relay_reason(name, b)
                self._log.warning("peer {}: {}", name, b.session.reason)
        self._report_transitions()
        self._wake()

    # ------------------------------------------------------------------ the ticker

    def _tick_loop(self) -> None:
        # The ticker must outlive any one failed tick: the engine's state is unreadable while
        # wireguard-go (re)starts, and a dead ticker silently ends failover, recovery and the
        # birthday attack for the life of the agent. A failure is logged when it starts or
        # changes, not ten times a second.
        failing = ""
        while not self._stop.wait(self.settings.tick):
            try:
                self.tick(time.monotonic(), time.time())
            except Exception as e:  # noqa: BLE001
                what = f"{type(e).__name__}: {e}"
                if what != failing:
                    self._log.opt(exception=True).warning("traversal tick failed (retrying every {}s): {}",
                                                          self.settings.tick, what)
                failing = what
            else:
                if failing:
                    self._log.info("traversal tick works again")
                failing = ""

    def tick(self, now: float, wall: float) -> None:
        self._birthday_tick(wall)
        wg = self._engine_state()
        if wg is None:
            return
        changed, probes = False, []
        roamed: dict[str, Endpoint] = {}
        switch: list[tuple[str, Endpoint]] = []
        with self._lock:
            mesh = self._view.mesh
            if mesh is None or mesh.spec.relay.mode is not RelayMode.AUTO:
                return
            timing = self._timing(mesh)
            for name, state in self._peers.items():
                ws = wg.peers.get(state.key)
                rx = ws.rx_bytes if ws is not None else 0
                state.live = liveness.observe(state.live, now, ws.tx_bytes if ws is not None else 0, rx,
                                              self._beats.get(name, liveness.Beats()))
                settling = name in self._bday and now - self._bday[name].won_at < BIRTHDAY_SETTLE_SECONDS
                at_proxy = (ws is not None and ws.config.endpoint is not None and ws.config.endpoint.ip.is_loopback
                            and bool(state.proxy_port) and ws.config.endpoint.port == state.proxy_port)
                won = self._bday.get(name)
                if settling and at_proxy and won is not None and won.proxy_port:
                    # A packet the peer sent through the relay just before its own switch roamed our
                    # WireGuard back to the relay proxy: point it at the won path again at once
                    # (otherwise each side follows the other back to the relay).
                    switch.append((state.key, Endpoint(ipaddress.ip_address("127.0.0.1"), won.proxy_port)))
                if state.awaiting_direct_since is not None and (
                        state.path.transport is not Transport.DIRECT or (ws is not None and not at_proxy)
                        or now - state.awaiting_direct_since > DIRECT_WRITE_GRACE_SECONDS):
                    state.awaiting_direct_since = None
                if (state.path.transport is Transport.DIRECT and at_proxy and not settling
                        and state.awaiting_direct_since is None and self.relay_available()):
                    state.path = pathsm.follow_to_relay(state.path, now, timing)
                    if name in self._bday:
                        state.path = replace(state.path, relay_by_matrix=True)
                        self._birthday_lost(name, wall)
                    self._log.warning("peer {}: it now reaches us through the relay; following it", name)
                    changed = True
                    continue
                if (state.path.transport is Transport.RELAY and not state.path.relay_by_matrix and not settling
                        and ws is not None and ws.config.endpoint is not None and not ws.config.endpoint.ip.is_loopback
                        and not state.probing and now - state.roam_probe_at >= ROAM_PROBE_MIN_INTERVAL_SECONDS):
                    state.roam_probe_at = now
                    state.probing = True
                    probes.append(name)
                    roamed[name] = ws.config.endpoint
                    self._log.info("peer {}: it reaches us directly again; probing direct now", name)
                stall_after = state.live.stall_after(timing.stall_after)
                new, action = pathsm.tick(state.path, now, rx, timing, wall=wall,
                                          unanswered_for=state.live.unanswered_for(now), stall_after=stall_after)
                if action is pathsm.Action.USE_RELAY:
                    if not state.proxy_port or not self.relay_available():
                        continue  # no relay path to fail over to: keep trying direct
                    self._log.warning("peer {}: {} -> relay (unanswered {:.2f}s, {} heartbeats; threshold {:.2f}s)",
                                      name, new.reason, state.live.unanswered_seconds(), state.live.unanswered,
                                      stall_after)
                    if name in self._bday:  # a won birthday path died: new rounds after the retry interval
                        new = replace(new, relay_by_matrix=True)
                        self._birthday_lost(name, wall)
                    if new.failovers > state.path.failovers and self._on_failover:
                        self._on_failover(name, new.last_failover_detect_s)
                    if name not in self._bday:
                        switch.append((state.key, Endpoint(ipaddress.ip_address("127.0.0.1"), state.proxy_port)))
                    changed = True
                elif action is pathsm.Action.PROBE_DIRECT and not state.probing:
                    state.probing = True
                    probes.append(name)
                state.path = new
        for key, proxy in switch:
            if self._fast_switch is not None:
                try:
                    self._fast_switch(key, proxy)
                except Exception as e:  # noqa: BLE001 - the reconcile pass writes it anyway
                    self._log.warning("fast endpoint switch to {} failed ({}); the reconcile pass will write it",
                                      proxy, e)
        for name in probes:
            self._spawn(partial(self._probe, name, roamed.get(name)), f"probe-{name}")
        if changed:
            self._report_transitions()
            self._wake()

    def _probe(self, name: str, seen_at: Endpoint | None = None) -> None:
        """Probe the direct path; ``seen_at``: where the peer's packets came from (a symmetric
        NAT's port for us, which its published endpoint is not)."""
        ok = False
        try:
            with self._lock:
                state, peer = self._peers.get(name), self._view.peers.get(name)
            if state is None or peer is None or self._listener is None:
                return
            target = seen_at or peer.spec.endpoint
            if state.decision.path is nat.Path.DIRECT_LAN and peer.status.host_endpoints:
                target = Endpoint.parse(peer.status.host_endpoints[0])
            if target is not None:
                ok = self._listener.ping(_raw(state.key), str(target.ip), target.port)
        finally:
            with self._lock:
                state = self._peers.get(name)
                if state is not None:
                    state.probing = False
                    was = state.path.transport
                    state.path, _ = pathsm.probe_result(state.path, time.monotonic(), ok)
                    if ok and was is not Transport.DIRECT and state.path.transport is Transport.DIRECT:
                        state.awaiting_direct_since = time.monotonic()
            if ok:
                self._log.info("peer {}: direct path works again -> direct", name)
                self._report_transitions()
                self._wake()

    # ------------------------------------------------------------------ discovery

    def _discovery_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                mesh = self._view.mesh
                addrs = self._view.local_addresses
            if mesh is not None:
                try:
                    self.discover(mesh, addrs)
                except Exception:  # noqa: BLE001 - try again next round
                    self._log.exception("endpoint discovery failed")
            if not self._discovered_once.is_set():
                delay = 1.0
            else:  # an inconclusive round (e.g. the relay was down) is retried soon, backing off
                delay = self._discovery_retry or self.settings.stun_interval
            self._stop.wait(delay)

    def stun_servers(self, mesh: Mesh) -> list[str]:
        if mesh.spec.stun_servers:
            return [str(s) for s in mesh.spec.stun_servers]
        return [f"{ip}:{port}" for ip, port in self.relay_addresses(mesh)]

    def discover(self, mesh: Mesh, local_addresses: tuple[str, ...]) -> Discovery:
        port = mesh.spec.listen_port
        targets = rawudp.resolve(self.stun_servers(mesh))
        samples = rawudp.stun_probe(targets, port, timeout=self.settings.stun_timeout) if targets else []
        unsolicited = self._nat_probe(samples[0]) if len(samples) >= 2 else None
        with self._lock:
            last = self._discovery
        fresh = nat.classify(samples, port, local_addresses, unsolicited_probe_received=unsolicited)
        udp_blocked = bool(targets) and not samples and bool(self._relay and self._relay.connected_relays())
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
        self._discovery_retry = 0.0 if conclusive else min(max(2.0, self._discovery_retry * 2),
                                                           self.settings.stun_interval)
        host = tuple(f"{a}:{port}" for a in local_addresses if ipaddress.ip_address(a).version == 4)
        found = Discovery(endpoint, method, classification, udp_blocked, host)
        dropped = False
        with self._lock:
            before = self._discovery
            self._discovery = found
            if self._reflected is not None and (endpoint != self._reflected_basis
                                                or classification.nat_type is NatType.SYMMETRIC):
                self._log.info("endpoint reflection dropped: discovery now finds {} ({})", endpoint,
                               classification.nat_type.value or "unknown")
                self._reflected = self._reflected_basis = None
                dropped = True
        self._discovered_once.set()
        if found != before or dropped:
            self._log.info("discovery: nat={} endpoint={} udp_blocked={}", classification.nat_type.value or "unknown",
                           endpoint, udp_blocked)
            self._sync_peers()
            self._wake()
        return found

    def _nat_probe(self, first: nat.StunSample) -> bool | None:
        """Ask the relay to send UDP probes to our mapping from its two ports; was the second seen?"""
        if self._relay is None or self._listener is None or self._loop is None:
            return None
        if not self._relay.connected_relays():
            return None
        self._listener.nat_probes_seen.clear()
        try:
            sent = bool(self._call(self._relay.nat_probe(first.mapped_ip, first.mapped_port, timeout=3.0), timeout=9.0))
        except Exception:  # noqa: BLE001 - inconclusive
            return None
        if not sent:
            return None
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and PROBE_FROM_ALTERNATE_PORT not in self._listener.nat_probes_seen:
            time.sleep(0.02)
        return PROBE_FROM_ALTERNATE_PORT in self._listener.nat_probes_seen

    def discovery(self) -> Discovery:
        """What this node publishes: the STUN finding, or the reflected endpoint when peers on a
        working direct path see us elsewhere (see :mod:`wirekube.traversal.reflection`)."""
        with self._lock:
            if self._reflected is not None:
                return replace(self._discovery, endpoint=self._reflected, method=EndpointDiscovery.REFLECTION)
            return self._discovery

    # ------------------------------------------------------------------ endpoint reflection

    def _update_reflection(self) -> bool:
        """Adopt the endpoint every reporting peer sees us at (guards in reflection.reflect).

        A reflection stands until another one replaces it or discovery finds something new: once
        it is published, observers see nothing different any more and stop reporting it."""
        with self._lock:
            own = self._view.own
            published = own.spec.endpoint if own is not None else None
            observed = []
            for p in self._view.peers.values():
                text = p.status.observed_endpoints.get(self.node)
                if text:
                    with contextlib.suppress(ValueError):
                        observed.append(Endpoint.parse(text))
            candidate, _why = reflection.reflect(published, observed, self._discovery.nat.nat_type,
                                                 self._discovery.endpoint)
            if candidate is None or candidate == self._reflected:
                return False
            self._reflected, self._reflected_basis = candidate, self._discovery.endpoint
        self._log.info("endpoint reflection: peers on direct paths reach us at {} (published {}); publishing it",
                       candidate, published)
        return True

    def _observed_endpoints(self, now: float) -> dict[str, str]:
        """Observer side: peers on healthy direct paths whose real endpoint differs from their published one."""
        try:
            wg = self._engine_state()
        except Exception:  # noqa: BLE001 - no engine yet: nothing observed
            wg = None
        if wg is None:
            return {}
        # An idle peer answers one heartbeat per IDLE_INTERVAL: healthy while that keeps coming.
        fresh = max(3.0, 2 * self.settings.stall_after, 1.5 * liveness.IDLE_INTERVAL)
        out: dict[str, str] = {}
        with self._lock:
            for name, state in self._peers.items():
                peer, ws = self._view.peers.get(name), wg.peers.get(state.key)
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

    # ------------------------------------------------------------------ status

    def decorate(self, status: PeerStatus, now: float | None = None) -> PeerStatus:
        """Fill in what traversal knows: NAT type, discovery method, relay reasons, LAN endpoints,
        and the ``RelayProxyEPERM`` condition. ``now``: wall clock (condition transition times)."""
        wall = time.time() if now is None else now
        observed = self._observed_endpoints(time.monotonic())
        d = self.discovery()
        with self._lock:
            reasons = {n: s.path.reason or s.decision.reason for n, s in self._peers.items()
                       if s.path.transport is Transport.RELAY}
            rounds = {n: b.session.own for n, b in sorted(self._bday.items()) if b.session.own is not None}
        over = self._relay.transport() if self._relay is not None else ""
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
        relay = self._relay
        if relay is None:
            return []
        try:
            return list(relay.eperm_active())
        except RuntimeError:  # the proxies changed while being read
            return sorted(self._eperm_last)

    def _eperm_condition(self, conditions: tuple[Mapping[str, object], ...],
                         wall: float) -> tuple[Mapping[str, object], ...]:
        ports = sorted(set(self._eperm_ports()))
        with self._lock:
            by_port = {s.proxy_port: n for n, s in self._peers.items() if s.proxy_port}
        if ports:
            where = ", ".join(f"{by_port.get(p, 'unknown peer')} (127.0.0.1:{p})" for p in ports)
            message = (f"sendto() on the relay proxy for {where} has failed with EPERM for more than "
                       f"{getattr(self._relay, 'eperm_persistent_after', 10):.0f}s; the socket is recreated "
                       f"every {getattr(self._relay, 'eperm_retry', 3):.0f}s (Cilium socket LB?)")
            out = cond.set_condition(conditions, CONDITION_EPERM, True, "SendtoEPERM", message, wall, 0)
        elif cond.find(conditions, CONDITION_EPERM) is not None:
            out = cond.set_condition(conditions, CONDITION_EPERM, False, "Recovered",
                                     "sendto() on every relay proxy works", wall, 0)
        else:
            out = [dict(c) for c in conditions]
        if set(ports) != self._eperm_last:
            if ports:
                self._log.warning("relay proxy EPERM persists on {}", ", ".join(
                    f"{by_port.get(p, '?')}:{p}" for p in ports))
            else:
                self._log.info("relay proxy EPERM cleared")
            self._eperm_last = set(ports)
        return tuple(out)

    def _relay_condition(self, conditions: tuple[Mapping[str, object], ...],
                         wall: float) -> tuple[Mapping[str, object], ...]:
        """``RelayUnreachable``: True (with every address's error: a refused proxy password says
        so) once every relay address failed and none is connected; False once one is again.
        Present only after it was first True.  Logged when it changes."""
        problem = self._relay.problem() if self._relay is not None else None
        if problem is not None:
            reason, message = problem
            out = cond.set_condition(conditions, CONDITION_RELAY_UNREACHABLE, True, reason, message, wall, 0)
        elif cond.find(conditions, CONDITION_RELAY_UNREACHABLE) is not None and self._relay is not None \
                and self._relay.connected_relays():
            out = cond.set_condition(conditions, CONDITION_RELAY_UNREACHABLE, False, "Connected",
                                     f"relay connected over {self._relay.transport() or 'tcp'}", wall, 0)
        else:
            out = [dict(c) for c in conditions]
        if problem != self._relay_problem_last:
            if problem is not None:
                self._log.error("relay unreachable ({}): {}", problem[0], problem[1])
            elif self._relay_problem_last is not None:
                self._log.info("relay reachable again")
            self._relay_problem_last = problem
        return tuple(out)

    def relay_stats(self) -> Mapping[str, int]:
        if self._relay is None:
            return {}
        s = self._relay.stats
        return {"relay_connections": len(self._relay.connected_relays()), "relay_reconnects": s.relay_reconnects,
                "eperm_events": s.eperm_events, "eperm_recoveries": s.eperm_recoveries}


def _proven_before(ws: WgPeerState | None, wall: float) -> bool:
    """The device already holds a direct session with this peer that the previous agent had
    proven (its keepalive is the proven one) and that handshook recently."""
    return (ws is not None and ws.config.endpoint is not None and not ws.config.endpoint.ip.is_loopback
            and ws.config.persistent_keepalive == DIRECT_KEEPALIVE and ws.last_handshake > 0
            and wall - ws.last_handshake < HANDSHAKE_FRESH_SECONDS)


def _in_process(config: PathConfig) -> RelayDatapath:
    return RelayPath(config.key(), config.wireguard_port, fwmark=config.fwmark, proxy=config.proxy,
                     ca_file=config.ca_file)


def _raw(key: str) -> bytes:
    return base64.b64decode(key)


def _urgent(state: _PeerState) -> bool:
    """An unproven direct path is heartbeated at the active rate (it also drives the handshake)."""
    return state.path.transport is Transport.DIRECT and not state.path.established


def _drain_heartbeats(sock: socket.socket, by_ip: Mapping[str, str], limit: int = 4096) -> dict[str, liveness.Beats]:
    """Read what the raw ICMP socket holds: per peer name, the agents' own echo traffic from that
    peer's mesh IP (``answered``/``requests``: heartbeats; ``probe_bytes``: other probes such as
    path MTU's, each counted with its answer).  Anything else (users' pings) is traffic."""
    out: dict[str, liveness.Beats] = {}
    for _ in range(limit):
        try:
            data, (src, _port) = sock.recvfrom(65535)
        except OSError:  # BlockingIOError: drained
            break
        name = by_ip.get(src)
        ihl = (data[0] & 0x0F) * 4 if data else 0
        if name is None or len(data) < ihl + 8 or data[ihl] not in (0, 8):
            continue
        payload = data[ihl + 8:]
        b = out.get(name, liveness.Beats())
        if payload == HEARTBEAT_PAYLOAD:
            b = replace(b, answered=b.answered + 1) if data[ihl] == 0 else replace(b, requests=b.requests + 1)
        elif payload.startswith(AGENT_PROBE_PREFIX):
            b = replace(b, probe_bytes=b.probe_bytes + 2 * liveness.wire_size(len(data)))
        else:
            continue
        out[name] = b
    return out


def icmp_echo(ident: int, seq: int, payload: bytes = HEARTBEAT_PAYLOAD) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = rawudp.checksum(header + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload
