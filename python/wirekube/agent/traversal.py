"""NAT traversal in the agent: endpoint discovery, NAT type, per-peer path, failover, recovery.

Glue between the pure parts (:mod:`wirekube.traversal.nat`, :mod:`wirekube.traversal.pathsm`)
and the I/O parts (STUN and probes from the WireGuard port, the warm relay path), feeding the
reconciler two things:

* :meth:`Traversal.paths`: per-peer :class:`~wirekube.agent.plan.PeerPath` overrides: the relay
  proxy's 127.0.0.1 port as the endpoint of relayed peers, a peer's LAN endpoint behind the same
  NAT, a 1 s keepalive on direct peers (their rx counters are the failover signal);
* :meth:`Traversal.discovery` / :meth:`Traversal.decorate`: what this node publishes (endpoint
  and how it was found, NAT type, port step, UDP blocked, LAN endpoints, relay reasons).

Threads: an asyncio loop (uvloop) for the relay path; a ticker (every ``tick`` s) that reads the
engine's rx counters and drives each peer's state machine; a discovery loop (STUN + the relay's
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import uvloop
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.agent.plan import PeerPath
from wirekube.agent.wg.base import WgDeviceState
from wirekube.gateway import conditions as cond
from wirekube.models import (
    ANNOTATION_BIRTHDAY,
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
from wirekube.relay.protocol import PROBE_FROM_ALTERNATE_PORT
from wirekube.traversal import nat, pathsm, rawudp, reflection
from wirekube.traversal.probe import ProbeListener
from wirekube.traversal.relaypath import RelayPath

# Failover watches rx counters, so something must come back from every peer in use at least
# every half second. WireGuard's persistent keepalive cannot promise that: its timer is reset by
# packets *received* too, so with two 1 s keepalives one side usually stays silent and the other
# would see a dead path. Instead each agent sends a 2 Hz ICMP echo through the tunnel to every
# direct peer's mesh IP: the peer's kernel answers, the answer counts as rx, and only a path that
# works both ways keeps rx moving. The keepalive stays short for NAT mappings and hole punching.
DIRECT_KEEPALIVE = 1
RELAY_KEEPALIVE = 1
HEARTBEAT_SECONDS = 0.5

# Status condition: the relay proxy's loopback sendto() keeps failing with EPERM (Cilium's socket
# LB); `wirekubectl doctor` reports it. Present only once it has been True (False = recovered).
CONDITION_EPERM = "RelayProxyEPERM"


@dataclass(frozen=True)
class TraversalSettings:
    tick: float = 0.1
    stun_interval: float = 60.0
    stall_after: float = 1.2
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
    ) -> None:
        self.node = node_name
        self._private = private_key
        self.public_key = public_key
        self._engine_state = engine_state
        self._wake = wake
        self.settings = settings
        self._on_failover = on_failover
        self._on_transition = on_transition
        self._reported: dict[str, Transport] = {}
        self._lock = threading.RLock()
        self._view = _View()
        self._peers: dict[str, _PeerState] = {}
        self._discovery = Discovery()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: RelayPath | None = None
        self._listener: ProbeListener | None = None
        self._threads: list[threading.Thread] = []
        self._discovered_once = threading.Event()
        self._eperm_last: set[int] = set()
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
        """2 Hz ICMP echo through wire_kube to every peer (see HEARTBEAT_SECONDS)."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as e:
            self._log.warning("no ICMP heartbeat ({}); failover relies on keepalives", e)
            return
        sock.setblocking(False)
        ident, seq = os.getpid() & 0xFFFF, 0
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                while sock.recv(2048):  # drain the echo replies (their job was done as rx)
                    pass
            with self._lock:
                targets = [str(p.mesh_ip) for p in self._view.peers.values() if p.mesh_ip is not None]
            seq = (seq + 1) & 0xFFFF
            packet = icmp_echo(ident, seq)
            for ip in targets:
                with contextlib.suppress(OSError):
                    sock.sendto(packet, (ip, 0))
        sock.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception:  # noqa: BLE001 - log the death of a long-lived thread loudly
                self._log.exception("thread {} died", name)

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        if self._loop is not None and self._relay is not None:
            with contextlib.suppress(Exception):
                self._call(self._relay.close(), timeout=5)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _call(self, coro: object, timeout: float = 5.0) -> object:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

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
        self._relay = RelayPath(self._private, port)
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
            if state is None or state.path.transport is not Transport.RELAY or state.path.relay_by_matrix \
                    or state.probing:
                return
            state.probing = True
        self._spawn(lambda: self._probe(name), f"probe-back-{name}")

    def _known_peer(self, key: bytes) -> bool:
        text = base64.b64encode(key).decode()
        with self._lock:
            return any(p.spec.public_key == text for p in self._view.peers.values())

    def relay_addresses(self, mesh: Mesh) -> list[tuple[str, int]]:
        spec = mesh.spec.relay
        hosts = [spec.external_endpoint] if spec.provider is RelayProvider.EXTERNAL and spec.external_endpoint else list(
            mesh.status.relay_endpoints)
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
        addrs = [] if mesh.spec.relay.mode is RelayMode.NEVER else self.relay_addresses(mesh)
        self._loop.call_soon_threadsafe(self._relay.set_relays, addrs)

    # ------------------------------------------------------------------ per-peer decisions

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
        override = peer.annotations.get(ANNOTATION_BIRTHDAY, "")
        if override in ("enabled", "disabled"):
            return override == "enabled"
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
            for name in list(self._peers):
                if name not in self._view.peers:
                    state = self._peers.pop(name)
                    self._drop_proxy(state.key)
                    changed = True
            for name, peer in self._view.peers.items():
                decision = nat.choose_path(local, self._facts_of(peer), relay_mode=mesh.spec.relay.mode,
                                           birthday=self._birthday(mesh, peer))
                if decision.path is nat.Path.BIRTHDAY:
                    # Port prediction is not attempted yet: symmetric<->symmetric stays relayed.
                    decision = nat.Decision(nat.Path.RELAY, decision.reason.replace(": birthday attack", "")
                                            + " (birthday attack not available)")
                state = self._peers.get(name)
                if state is None or state.decision != decision or state.key != peer.spec.public_key:
                    if decision.relayed:
                        path = pathsm.PeerPath.start_relay(now, decision.reason, by_matrix=True, timing=timing)
                    elif state is not None and state.decision.relayed is False and state.key == peer.spec.public_key:
                        path = state.path  # same direct-ish decision: keep the running state machine
                    else:
                        path = pathsm.PeerPath.start_direct(now)
                    self._peers[name] = _PeerState(peer.spec.public_key, decision, path,
                                                   state.proxy_port if state else 0)
                    changed = True
                if mesh.spec.relay.mode is not RelayMode.NEVER and self._peers[name].proxy_port == 0:
                    self._ensure_proxy(name)
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
            state.proxy_port = int(self._call(self._relay.ensure_proxy(_raw(state.key))))  # type: ignore[arg-type]
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
                if state.decision.path is nat.Path.DIRECT_LAN:
                    peer = self._view.peers.get(name)
                    if peer and peer.status.host_endpoints:
                        endpoint = Endpoint.parse(peer.status.host_endpoints[0])
                keepalive = None if mesh and mesh.spec.relay.mode is RelayMode.NEVER else DIRECT_KEEPALIVE
                out[name] = PeerPath(endpoint, keepalive, Transport.DIRECT)
        return out

    # ------------------------------------------------------------------ the ticker

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.settings.tick):
            self.tick(time.monotonic(), time.time())

    def tick(self, now: float, wall: float) -> None:
        wg = self._engine_state()
        if wg is None:
            return
        changed, probes = False, []
        with self._lock:
            mesh = self._view.mesh
            if mesh is None or mesh.spec.relay.mode is not RelayMode.AUTO:
                return
            timing = self._timing(mesh)
            for name, state in self._peers.items():
                ws = wg.peers.get(state.key)
                rx = ws.rx_bytes if ws is not None else 0
                if (state.path.transport is Transport.DIRECT and state.proxy_port and ws is not None
                        and ws.config.endpoint is not None and ws.config.endpoint.ip.is_loopback
                        and ws.config.endpoint.port == state.proxy_port and self.relay_available()):
                    state.path = pathsm.follow_to_relay(state.path, now, timing)
                    self._log.warning("peer {}: it now reaches us through the relay; following it", name)
                    changed = True
                    continue
                new, action = pathsm.tick(state.path, now, rx, timing, wall=wall)
                if action is pathsm.Action.USE_RELAY:
                    if not state.proxy_port or not self.relay_available():
                        continue  # no relay path to fail over to: keep trying direct
                    self._log.warning("peer {}: {} -> relay", name, new.reason)
                    if new.failovers > state.path.failovers and self._on_failover:
                        self._on_failover(name, new.last_failover_detect_s)
                    changed = True
                elif action is pathsm.Action.PROBE_DIRECT and not state.probing:
                    state.probing = True
                    probes.append(name)
                state.path = new
        for name in probes:
            self._spawn(lambda n=name: self._probe(n), f"probe-{name}")
        if changed:
            self._report_transitions()
            self._wake()

    def _probe(self, name: str) -> None:
        ok = False
        try:
            with self._lock:
                state, peer = self._peers.get(name), self._view.peers.get(name)
            if state is None or peer is None or self._listener is None:
                return
            target = peer.spec.endpoint
            if state.decision.path is nat.Path.DIRECT_LAN and peer.status.host_endpoints:
                target = Endpoint.parse(peer.status.host_endpoints[0])
            if target is not None:
                ok = self._listener.ping(_raw(state.key), str(target.ip), target.port)
        finally:
            with self._lock:
                state = self._peers.get(name)
                if state is not None:
                    state.probing = False
                    state.path, action = pathsm.probe_result(state.path, time.monotonic(), ok)
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
            self._stop.wait(self.settings.stun_interval if self._discovered_once.is_set() else 1.0)

    def stun_servers(self, mesh: Mesh) -> list[str]:
        if mesh.spec.stun_servers:
            return [str(s) for s in mesh.spec.stun_servers]
        return [f"{ip}:{port}" for ip, port in self.relay_addresses(mesh)]

    def discover(self, mesh: Mesh, local_addresses: tuple[str, ...]) -> Discovery:
        port = mesh.spec.listen_port
        targets = rawudp.resolve(self.stun_servers(mesh))
        samples = rawudp.stun_probe(targets, port, timeout=self.settings.stun_timeout) if targets else []
        unsolicited = self._nat_probe(samples[0]) if len(samples) >= 2 else None
        classification = nat.classify(samples, port, local_addresses, unsolicited_probe_received=unsolicited)
        udp_blocked = bool(targets) and not samples and bool(self._relay and self._relay.connected_relays())
        endpoint, method = None, None
        if samples:  # for a symmetric NAT the port is per destination: peers learn the real one by roaming
            endpoint = Endpoint(ipaddress.ip_address(samples[0].mapped_ip), samples[0].mapped_port)
            method = EndpointDiscovery.STUN
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
        client = self._relay._client()
        if client is None:
            return None
        self._listener.nat_probes_seen.clear()
        try:
            sent = bool(self._call(client.nat_probe(first.mapped_ip, first.mapped_port, timeout=3.0), timeout=5.0))
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
            candidate, _why = reflection.reflect(published, observed, self._discovery.nat.nat_type)
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
        fresh = max(3.0, 2 * self.settings.stall_after)
        out: dict[str, str] = {}
        with self._lock:
            for name, state in self._peers.items():
                peer, ws = self._view.peers.get(name), wg.peers.get(state.key)
                if peer is None or ws is None:
                    continue
                seen = reflection.observation(
                    peer.spec.endpoint, ws.config.endpoint,
                    direct=state.path.transport is Transport.DIRECT and state.path.established,
                    healthy=now - state.path.last_rx_at <= fresh,
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
        return replace(
            status,
            nat_type=d.nat.nat_type,
            nat_port_step=d.nat.port_step,
            endpoint_discovery_method=(d.method.value if d.method else status.endpoint_discovery_method),
            relay_reasons=reasons,
            host_endpoints=d.host_endpoints,
            udp_blocked=d.udp_blocked,
            conditions=self._eperm_condition(status.conditions, wall),
            observed_endpoints=observed,
        )

    # ------------------------------------------------------------------ EPERM condition

    def _eperm_ports(self) -> list[int]:
        """Relay proxy ports whose EPERM persists (read on the relay's loop: it owns the proxies)."""
        relay = self._relay
        if relay is None:
            return []
        if self._loop is not None and self._loop.is_running():
            async def read() -> list[int]:
                return relay.eperm_active()

            try:
                return list(self._call(read(), timeout=2.0))  # type: ignore[call-overload]
            except Exception:  # noqa: BLE001 - a slow loop must not block publishing the status
                return sorted(self._eperm_last)
        return list(relay.eperm_active())

    def _eperm_condition(self, conditions: tuple[Mapping[str, object], ...], wall: float) -> tuple[Mapping[str, object], ...]:
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

    def relay_stats(self) -> Mapping[str, int]:
        if self._relay is None:
            return {}
        s = self._relay.stats
        return {"relay_connections": len(self._relay.connected_relays()), "relay_reconnects": s.relay_reconnects,
                "eperm_events": s.eperm_events, "eperm_recoveries": s.eperm_recoveries}


def _raw(key: str) -> bytes:
    return base64.b64decode(key)


def icmp_echo(ident: int, seq: int, payload: bytes = b"wirekube-heartbeat") -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = rawudp.checksum(header + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload
