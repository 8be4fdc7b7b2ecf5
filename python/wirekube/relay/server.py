"""The relay server: asyncio protocols around the sans-I/O codec.

Per connection: AWAIT_REGISTER -> (Register; Challenge sent) AWAIT_AUTH -> (valid Auth;
Registered sent) REGISTERED -> CLOSED.  Only a REGISTERED connection is in the routing table, so
only a client that proved it holds a key can receive Data addressed to that key.

Forwarding is done where the bytes arrive: the socket reads straight into the connection's frame
decoder (``BufferedProtocol``), which hands back runs of Data frames for one destination with the
key already rewritten in place; at the end of the read every destination touched gets one
``writelines``, of views of the receive buffer when its queue is empty (no copy at all).  Each
destination has a byte budget (``queue_limit_bytes`` minus what its transport already holds):
frames beyond it are dropped and counted, so a reader that stalls loses its own packets and costs
the relay no more than the limit (plus, at most, one receive chunk held by a partly written
view).  Counters are plain integers read by the metrics collector at scrape time.

Pushback: a read whose frames all went to destinations that are congested (more than half
their budget waiting in user space, so their sockets are full too) holds the sender: its socket
is not read again until one of those destinations drains (below an eighth of the budget) or
``backpressure_hold`` seconds pass, whichever comes first.  A sender that only feeds congested
peers is then slowed down by TCP instead of having the relay read, scan and drop what it sends;
a sender with traffic for any uncongested peer is never held, and a held one is read again
within ``backpressure_hold`` whatever happens, so a stalled peer delays a sender's other traffic
by at most that long.  Frames that still exceed a budget are dropped as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import os
import socket
import ssl
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from loguru import logger

from wirekube.relay.auth import Challenge, fingerprint
from wirekube.relay.authz import PeerAuthorizer
from wirekube.relay.policy import ProbeTargetPolicy, TokenBucket, refuse_special_targets
from wirekube.relay.protocol import (
    NEED_DATA,
    PROBE_FROM_ALTERNATE_PORT,
    PROBE_FROM_STUN_PORT,
    DataRun,
    Frame,
    FrameDecoder,
    FrameType,
    RemoteProtocolError,
    encode_challenge,
    encode_error,
    encode_frame,
    encode_goaway,
    encode_registered,
    nat_probe_datagram,
    parse_nat_probe,
    truncate_run,
)
from wirekube.relay.stun import StunResponder
from wirekube.relay.wsbridge import WsBridge

_log = logger.bind(component="relay")


@dataclass(frozen=True)
class RelaySettings:
    """Everything the relay server needs; built once in ``main``."""

    listen_host: str = "0.0.0.0"  # noqa: S104 - relay clients come from anywhere
    """TCP address for relay clients."""
    listen_port: int = 3478
    stun_host: str | None = "0.0.0.0"  # noqa: S104 - STUN clients come from anywhere
    """UDP address of the STUN responder (and of the first NAT probe); ``None`` disables both."""
    stun_port: int = 3478
    nat_probe_host: str | None = None
    """UDP address the second NAT probe is sent from; ``None`` means ``stun_host``."""
    nat_probe_port: int = 0
    """0 picks a free port; it only has to differ from the STUN port."""
    handshake_timeout: float = 5.0
    """Seconds from accept to Registered before the connection is dropped."""
    idle_timeout: float = 90.0
    """Seconds without any frame from a registered client before it is dropped."""
    queue_limit_bytes: int = 512 * 1024
    """Hard cap on bytes waiting to be written to one connection."""
    max_connections: int = 10_000
    nat_probe_rate: float = 1.0
    """NAT probes per second per connection, on average."""
    nat_probe_burst: float = 4.0
    probe_target_policy: ProbeTargetPolicy = field(default=refuse_special_targets)
    """Which NAT probe targets are refused; tests may inject a looser one, production never."""
    close_grace: float = 2.0
    """How long a connection closed with an Error may take to drain before it is aborted."""
    backpressure_hold: float = 0.02
    """Longest a sender feeding only congested destinations is left unread (0: never held)."""
    max_pending_per_ip: int = 64
    """Connections from one source address that may be between accept and Registered at once
    (each Register costs the relay an X25519 operation); registered clients do not count, so any
    number of nodes behind one NAT can be connected."""
    drain_timeout: float = 10.0
    """On shutdown: how long clients told to go (GoAway) have before the rest are closed."""
    reuse_port: bool = False
    """SO_REUSEPORT on the TCP and UDP sockets: several relay processes meshed over local links
    share one address, the kernel spreading connections among them."""
    wss_host: str | None = None
    """Address of the WebSocket-over-TLS listener (the same protocol, for clients that can only
    reach port 443 or an HTTP proxy); ``None``: no such listener."""
    wss_port: int = 443
    wss_path: str | None = None
    """The only HTTP path upgraded to a WebSocket; ``None``: any path."""
    tls_cert: str | None = None
    """PEM certificate chain file for the WSS listener (a mounted Secret's ``tls.crt``)."""
    tls_key: str | None = None
    """PEM private key file for the WSS listener (``tls.key``)."""
    tls_reload_interval: float = 60.0
    """How often the certificate files are checked for a change (cert-manager renews them in
    place); a changed pair is used for new connections."""


class MeshHooks(Protocol):
    """What the relay tells its replica mesh (see :mod:`wirekube.relay.mesh`)."""

    def local_registered(self, key: bytes) -> None: ...

    def local_released(self, key: bytes) -> None: ...


@dataclass
class RelayStats:
    """Plain counters, updated on the hot path and read at scrape time."""

    connections_accepted: int = 0
    registrations: Counter[str] = field(default_factory=Counter)  # "ok" or a failure reason
    frames_forwarded: int = 0
    bytes_forwarded: int = 0
    frames_dropped: Counter[str] = field(default_factory=Counter)
    bytes_dropped: Counter[str] = field(default_factory=Counter)
    protocol_errors: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)
    nat_probes: Counter[str] = field(default_factory=Counter)
    relay_probes: int = 0
    keepalives: int = 0
    backpressure_holds: int = 0
    """Reads after which the sender was held because every destination it fed was congested."""
    pending_refused: int = 0
    """Connections refused because their source address had too many handshakes pending."""
    goaways: int = 0
    """GoAway frames sent (draining)."""
    wss_accepted: int = 0
    """TCP connections accepted on the WSS listener (before TLS and the upgrade)."""
    wss_refused: Counter[str] = field(default_factory=Counter)
    """WSS connections closed for what the peer sent (bad upgrade, text message, oversized...)."""
    stun: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: str, frames: int, nbytes: int) -> None:
        self.frames_dropped[reason] += frames
        self.bytes_dropped[reason] += nbytes


class ConnState(enum.Enum):
    AWAIT_REGISTER = "await_register"
    AWAIT_AUTH = "await_auth"
    REGISTERED = "registered"
    CLOSED = "closed"


class FrameSink(asyncio.BufferedProtocol):
    """What every connection of the relay shares, client or mesh link: being a destination of
    forwarded runs within a byte budget, and pushback in both roles (see the module docstring)."""

    def __init__(self, relay: RelayServer, queue_limit: int) -> None:
        self._relay = relay
        self._settings = relay.settings
        self._stats = relay.stats
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.queue_limit = queue_limit
        self._lost = False
        self._closed = False
        # As a destination: runs waiting for this call's writelines, the bytes still allowed, and
        # whether the transport's queue was empty (then views can be written without a copy).
        self._pending: list[memoryview | bytes] = []
        self._budget = 0
        self._zero_copy = False
        # Pushback: as a destination, whether its transport is over the high-water mark and the
        # senders held until it drains; as a sender, the destinations it waits for and its timer.
        self._congested = False
        self._held_senders: set[FrameSink] = set()
        self._holding_for: list[FrameSink] = []
        self._hold_timer: asyncio.TimerHandle | None = None

    def _setup_transport(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        _set_nodelay(transport)
        limit = self.queue_limit
        self.transport.set_write_buffer_limits(high=max(limit // 2, 1), low=limit // 8)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    # -- as a destination -------------------------------------------------------------------

    def _prepare(self, touched: list[FrameSink]) -> None:
        """First run for this destination in the current read: take its budget."""
        touched.append(self)
        queued = self._queued_bytes()
        self._budget = self.queue_limit - queued
        self._zero_copy = queued == 0

    def _accept(self, run: DataRun) -> None:
        """Take a run (already carrying the source key) addressed to this connection, within its
        byte budget.

        A view of the sender's receive buffer goes to the transport as is when this transport's
        queue was empty: it is then usually written at once, and at worst one partly written view
        holds one chunk of the sender's buffer.  Otherwise the run is copied, so queued data never
        pins more memory than the bytes counted against the budget."""
        size = len(run.frames)
        if size > self._budget:
            run, cut = truncate_run(run, max(self._budget, 0))
            self._stats.drop("queue_full", cut, size - len(run.frames))
            size = len(run.frames)
            if not size:
                return
        self._budget -= size
        frames = run.frames
        # A read-only view is over bytes the decoder made for this run alone (small frames are
        # rewritten into a new object): it pins nothing else, so it needs no copy either.
        self._pending.append(frames if self._zero_copy or frames.readonly else bytes(frames))
        self._stats.frames_forwarded += run.frame_count
        self._stats.bytes_forwarded += size

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if self._closed or self.transport is None:
            return
        self.transport.writelines(pending)

    def _queued_bytes(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    # -- pushback ---------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self._congested = True

    def resume_writing(self) -> None:
        self._congested = False
        self._release_held()

    def _after_read(self, touched: list[FrameSink]) -> None:
        for dest in touched:
            dest._flush()
        if touched and self._settings.backpressure_hold > 0 and all(d._congested for d in touched):
            self._hold(touched)

    def _hold(self, dests: list[FrameSink]) -> None:
        """Stop reading this sender until one of ``dests`` drains or the hold time passes."""
        if self._hold_timer is not None or self._closed or self.transport is None:
            return
        self._stats.backpressure_holds += 1
        self._holding_for = dests
        for dest in dests:
            dest._held_senders.add(self)
        self._hold_timer = self._loop.call_later(self._settings.backpressure_hold, self._unhold)
        self.transport.pause_reading()

    def _unhold(self) -> None:
        if self._hold_timer is None:
            return
        self._hold_timer.cancel()
        self._hold_timer = None
        for dest in self._holding_for:
            dest._held_senders.discard(self)
        self._holding_for = []
        if not self._lost and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _release_held(self) -> None:
        """This destination drained (or went away): read its held senders again."""
        if self._held_senders:
            for sender in list(self._held_senders):
                sender._unhold()

    def _sink_closed(self) -> None:
        self._closed = True
        self._pending = []
        self._congested = False
        self._release_held()
        self._unhold()

    def _abort_if_open(self) -> None:
        if not self._lost and self.transport is not None:
            self.transport.abort()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class RelayConnection(FrameSink):
    """One client connection.  The socket reads straight into the frame decoder's buffer."""

    def __init__(self, relay: RelayServer) -> None:
        super().__init__(relay, relay.settings.queue_limit_bytes)
        self.state = ConnState.AWAIT_REGISTER
        self.key: bytes | None = None
        self.peer = "?"
        self.source_ip = ""
        self.last_rx = self._loop.time()
        self._challenge: Challenge | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._nat_bucket = TokenBucket(self._settings.nat_probe_rate, self._settings.nat_probe_burst)
        self._pending_counted = False
        self._log = _log

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._setup_transport(transport)
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.source_ip = str(peername[0]) if peername else ""
        self._log = _log.bind(conn=self.peer)
        self._stats.connections_accepted += 1
        refusal = self._relay._admit(self)
        if refusal is not None:
            message, reason = refusal
            self.close_with_error(message, reason)
            return
        self._timer = self._loop.call_later(self._settings.handshake_timeout, self._handshake_expired)

    def buffer_updated(self, nbytes: int) -> None:
        self._decoder.buffer_updated(nbytes)
        if self.state is ConnState.CLOSED:
            self._decoder.clear()  # closing: what still arrives is read and dropped
            return
        self.last_rx = self._loop.time()
        try:
            if self.state is not ConnState.REGISTERED:
                self._handshake_frames()
            if self.state is ConnState.REGISTERED:
                self._forward_frames()
        except RemoteProtocolError as e:
            self._protocol_error(e)

    def eof_received(self) -> bool:
        self._disconnected("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disconnected("reset" if exc else "eof")
        self._relay._forget(self)

    # -- handshake --------------------------------------------------------------------------

    def _handshake_frames(self) -> None:
        while self.state in (ConnState.AWAIT_REGISTER, ConnState.AWAIT_AUTH):
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return
            assert isinstance(frame, Frame)
            if self.state is ConnState.AWAIT_REGISTER and frame.type == FrameType.REGISTER:
                self._on_register(frame.body)
            elif self.state is ConnState.AWAIT_AUTH and frame.type == FrameType.AUTH:
                self._on_auth(frame.body)
            else:
                self._reject("unexpected_frame", f"{_type_name(frame.type)} before Registered")

    def _on_register(self, claimed_key: bytes) -> None:
        self._challenge = Challenge.issue(claimed_key)
        self.state = ConnState.AWAIT_AUTH
        self._write(encode_challenge(self._challenge.ephemeral_public, self._challenge.nonce))

    def _on_auth(self, mac: bytes) -> None:
        challenge = self._challenge
        assert challenge is not None
        self._challenge = None
        if not challenge.verify(mac):
            self._reject("bad_proof", "proof of key ownership failed")
            return
        key = challenge.client_public
        refusal = self._relay._authorization_refusal(key)
        if refusal is not None:
            self._reject(refusal, "key is not authorized on this relay")
            return
        self._cancel_timer()
        self.key = key
        self.state = ConnState.REGISTERED
        self._relay._handshake_done(self)
        self._log = self._log.bind(peer=fingerprint(key))
        self._write(encode_registered())
        self._relay._bind(self)
        self._stats.registrations["ok"] += 1
        self._log.info("registered")
        if self._relay.draining:
            self._write(_GOAWAY)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.state in (ConnState.AWAIT_REGISTER, ConnState.AWAIT_AUTH):
            self._reject("timeout", "registration timed out")

    def _reject(self, reason: str, message: str) -> None:
        self._stats.registrations[reason] += 1
        self._log.debug("registration refused: {}", reason)
        self.close_with_error(message, f"registration_{reason}")

    # -- registered -------------------------------------------------------------------------

    def _forward_frames(self) -> None:
        decoder = self._decoder
        routes = self._relay.routes
        remote = self._relay.remote_routes
        source = self.key
        stats = self._stats
        touched: list[FrameSink] = []
        dest: FrameSink | None
        try:
            while True:
                item = decoder.next_run(source)
                if item is NEED_DATA:
                    break
                if type(item) is DataRun:
                    dest = routes.get(item.key) or remote.get(item.key)
                    if dest is None:
                        stats.drop("unknown_destination", item.frame_count, len(item.frames))
                        continue
                    if not dest._pending:
                        dest._prepare(touched)
                    dest._accept(item)
                else:
                    self._control(item)  # type: ignore[arg-type]
                    if self.state is not ConnState.REGISTERED:
                        break
        finally:
            self._after_read(touched)

    def _control(self, frame: Frame) -> None:
        ftype = frame.type
        if ftype == FrameType.KEEPALIVE:
            self._stats.keepalives += 1
            self._reply(_KEEPALIVE)
        elif ftype == FrameType.RELAY_PROBE:
            self._stats.relay_probes += 1
            self._reply(encode_frame(FrameType.RELAY_PROBE, frame.body))
        elif ftype == FrameType.NAT_PROBE:
            self._nat_probe(frame.body)
        elif ftype == FrameType.ERROR:
            self._log.debug("client closed with an Error frame")
            self._close("client_error")
        else:
            self._stats.protocol_errors["unexpected_frame"] += 1
            self.close_with_error(f"{_type_name(ftype)} after Registered", "unexpected_frame")

    def _reply(self, frame: bytes) -> None:
        """Answer a control frame, unless this client leaves its answers unread: replies are held
        to the same byte cap as Data, so a client that floods keepalives without reading cannot
        grow the relay."""
        if self._queued_bytes() + len(frame) > self.queue_limit:
            self._stats.drop("reply_queue_full", 1, len(frame))
            return
        self._write(frame)

    def _nat_probe(self, body: bytes) -> None:
        address, port = parse_nat_probe(body)
        result = self._relay._send_nat_probes(address, port, self._nat_bucket)
        self._stats.nat_probes[result] += 1
        if result == "sent":
            self._reply(encode_frame(FrameType.NAT_PROBE, body))
        else:
            self._log.debug("NAT probe not sent: {}", result)

    # -- closing ----------------------------------------------------------------------------

    def _protocol_error(self, error: RemoteProtocolError) -> None:
        self._stats.protocol_errors[error.reason] += 1
        if self.state is not ConnState.REGISTERED:
            self._stats.registrations["protocol_error"] += 1
        self._log.debug("protocol error: {}", error)
        self.close_with_error(str(error), f"protocol_{error.reason}")

    def close_with_error(self, message: str, reason: str) -> None:
        """Send an Error frame, then close (aborting if it does not drain in time)."""
        if self.state is ConnState.CLOSED or self.transport is None:
            return
        self._write(encode_error(message))
        self._close(reason)

    def _close(self, reason: str) -> None:
        """Half-close: our FIN follows anything already written (the Error frame), and input is
        read and discarded until the peer closes or ``close_grace`` passes.  Closing outright with
        unread input would make the kernel send a reset, and the peer could lose the Error."""
        if self.state is ConnState.CLOSED:
            return
        self._disconnected(reason)
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
        if not self._lost:
            self._loop.call_later(self._settings.close_grace, self._abort_if_open)

    def _disconnected(self, reason: str) -> None:
        if self.state is ConnState.CLOSED:
            return
        was_registered = self.state is ConnState.REGISTERED
        if not was_registered:
            self._relay._handshake_done(self)
        self.state = ConnState.CLOSED
        self._sink_closed()
        self._cancel_timer()
        self._stats.disconnects[reason] += 1
        self._relay._unbind(self)
        if was_registered:
            self._log.info("disconnected: {}", reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_KEEPALIVE = encode_frame(FrameType.KEEPALIVE)
_GOAWAY = encode_goaway("relay draining: register again through the same address")


def _type_name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"0x{ftype:02x}"


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ProbeSocket(asyncio.DatagramProtocol):
    """The second NAT-probe port: send only; anything received is ignored."""

    def error_received(self, exc: Exception) -> None:
        pass


class RelayServer:
    """The relay: TCP framing service, STUN responder and NAT prober, sharing one set of stats."""

    def __init__(self, settings: RelaySettings, *, authorizer: PeerAuthorizer | None = None) -> None:
        self.settings = settings
        self.stats = RelayStats()
        self.authorizer = authorizer
        self.routes: dict[bytes, RelayConnection] = {}
        """Keys registered here."""
        self.remote_routes: dict[bytes, FrameSink] = {}
        """Keys registered with another replica: the mesh link to it (kept by the mesh)."""
        self.mesh: MeshHooks | None = None
        self.connections: set[RelayConnection] = set()
        self.pending_by_ip: Counter[str] = Counter()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._wss_server: asyncio.Server | None = None
        self._tls: TlsFiles | None = None
        self._stun: asyncio.DatagramTransport | None = None
        self._alternate: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        if authorizer is not None:
            authorizer.on_revoked(self._revoke)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        self._server = await loop.create_server(
            lambda: RelayConnection(self), s.listen_host, s.listen_port, reuse_address=True, backlog=1024,
            reuse_port=s.reuse_port or None,
        )
        if s.stun_host is not None:
            self._stun, _ = await loop.create_datagram_endpoint(
                lambda: StunResponder(self.stats.stun), local_addr=(s.stun_host, s.stun_port),
                reuse_port=s.reuse_port or None,
            )
            self._alternate, _ = await loop.create_datagram_endpoint(
                _ProbeSocket, local_addr=(s.nat_probe_host or s.stun_host, s.nat_probe_port),
                reuse_port=s.reuse_port or None,
            )
        if s.wss_host is not None:
            await self._start_wss()
        self._tasks.append(_guarded(self._sweep_idle(), "relay-idle-sweep"))
        _log.info(
            "relay listening on tcp {} wss {} stun {} nat-probe {}",
            _fmt(self.address),
            _fmt(self.wss_address),
            _fmt(self.stun_address),
            _fmt(self.nat_probe_address),
        )

    async def _start_wss(self) -> None:
        s = self.settings
        if not s.tls_cert or not s.tls_key:
            raise ValueError("the WSS listener needs a TLS certificate and key (--tls-cert, --tls-key)")
        self._tls = TlsFiles(s.tls_cert, s.tls_key)
        context = self._tls.context()

        def violation(reason: str) -> None:
            self.stats.wss_refused[reason] += 1

        def bridge() -> WsBridge:
            self.stats.wss_accepted += 1
            return WsBridge.server(lambda: RelayConnection(self), path=s.wss_path,
                                   handshake_timeout=s.handshake_timeout, close_timeout=s.close_grace,
                                   on_violation=violation)

        self._wss_server = await asyncio.get_running_loop().create_server(
            bridge, s.wss_host, s.wss_port, ssl=context, reuse_address=True, backlog=1024,
            reuse_port=s.reuse_port or None, ssl_handshake_timeout=s.handshake_timeout,
        )
        self._tasks.append(_guarded(self._reload_tls(), "relay-tls-reload"))

    async def _reload_tls(self) -> None:
        assert self._tls is not None
        while True:
            await asyncio.sleep(self.settings.tls_reload_interval)
            try:
                if self._tls.reload_if_changed():
                    _log.info("WSS certificate reloaded from {}", self._tls.cert)
            except (OSError, ssl.SSLError) as e:
                _log.warning("WSS certificate not reloaded (the old one stays): {}", e)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting and tell every client to register elsewhere (GoAway), then wait until
        they have gone or ``timeout`` (default ``settings.drain_timeout``) passes.  Forwarding
        goes on meanwhile, so a client moves without losing its traffic; :meth:`close` after."""
        self.draining = True
        for server in (self._server, self._wss_server):
            if server is not None:
                server.close()
        for conn in list(self.connections):
            if conn.state is ConnState.REGISTERED:
                conn._write(_GOAWAY)
                self.stats.goaways += 1
        limit = self.settings.drain_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + limit
        while self.routes and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        _log.info("drained: {} clients still here", len(self.routes))

    async def close(self, reason: str = "relay shutting down", timeout: float = 5.0) -> None:
        """Stop accepting, tell every client why, and wait (bounded) for them to go."""
        for server in (self._server, self._wss_server):
            if server is not None:
                server.close()
        for conn in list(self.connections):
            conn.close_with_error(reason, "shutdown")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._all_gone.wait(), timeout)
        for conn in list(self.connections):
            conn._abort_if_open()
        for task in self._tasks:
            task.cancel()
        for transport in (self._stun, self._alternate):
            if transport is not None:
                transport.close()
        for server in (self._server, self._wss_server):
            if server is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), timeout)
        _log.info("relay stopped")

    @property
    def address(self) -> tuple[str, int]:
        """The TCP address clients connect to (after :meth:`start`)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the relay is not listening")
        return (str(self._server.sockets[0].getsockname()[0]), int(self._server.sockets[0].getsockname()[1]))

    @property
    def wss_address(self) -> tuple[str, int] | None:
        """The WSS listener's address (after :meth:`start`), or ``None`` without one."""
        if self._wss_server is None or not self._wss_server.sockets:
            return None
        return _sockaddr(self._wss_server.sockets[0].getsockname())

    @property
    def stun_address(self) -> tuple[str, int] | None:
        return _sockaddr(self._stun.get_extra_info("sockname")) if self._stun else None

    @property
    def nat_probe_address(self) -> tuple[str, int] | None:
        return _sockaddr(self._alternate.get_extra_info("sockname")) if self._alternate else None

    def queued_bytes(self) -> int:
        """Bytes waiting in user space to be written, over all connections."""
        return sum(conn._queued_bytes() for conn in self.connections)

    def connection_counts(self) -> Counter[str]:
        return Counter(conn.state.value for conn in self.connections)

    # -- called by connections --------------------------------------------------------------

    def _admit(self, conn: RelayConnection) -> tuple[str, str] | None:
        """Add a new connection, or say why not: (message for the client, reason for metrics)."""
        if len(self.connections) >= self.settings.max_connections:
            return "relay is at its connection limit", "connection_limit"
        if self.pending_by_ip[conn.source_ip] >= self.settings.max_pending_per_ip:
            self.stats.pending_refused += 1
            return "too many unfinished registrations from this address", "pending_limit"
        self.pending_by_ip[conn.source_ip] += 1
        conn._pending_counted = True
        self.connections.add(conn)
        self._all_gone.clear()
        return None

    def _handshake_done(self, conn: RelayConnection) -> None:
        """``conn`` left the handshake (registered or gone): it no longer counts as pending."""
        if conn._pending_counted:
            conn._pending_counted = False
            ip = conn.source_ip
            self.pending_by_ip[ip] -= 1
            if self.pending_by_ip[ip] <= 0:
                del self.pending_by_ip[ip]

    def _forget(self, conn: RelayConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_gone.set()

    def _authorization_refusal(self, key: bytes) -> str | None:
        if self.authorizer is None:
            return None
        if not self.authorizer.ready:
            return "authorizer_not_ready"
        return None if self.authorizer.allows(key) else "unauthorized"

    def _bind(self, conn: RelayConnection) -> None:
        assert conn.key is not None
        previous = self.routes.get(conn.key)
        self.routes[conn.key] = conn
        if previous is not None and previous is not conn:
            previous.close_with_error("replaced by a newer connection for this key", "replaced")
        if self.mesh is not None:
            self.mesh.local_registered(conn.key)

    def _unbind(self, conn: RelayConnection) -> None:
        if conn.key is not None and self.routes.get(conn.key) is conn:
            del self.routes[conn.key]
            if self.mesh is not None:
                self.mesh.local_released(conn.key)

    def evict(self, key: bytes) -> None:
        """Another replica holds a newer registration of ``key``: drop ours."""
        conn = self.routes.get(key)
        if conn is not None:
            conn.close_with_error("registered again through another relay replica", "replaced_elsewhere")

    def _revoke(self, keys: frozenset[bytes]) -> None:
        for key in keys:
            conn = self.routes.get(key)
            if conn is not None:
                conn.close_with_error("key is no longer authorized on this relay", "revoked")

    def _send_nat_probes(
        self, address: ipaddress.IPv4Address, port: int, bucket: TokenBucket
    ) -> str:
        refusal = self.settings.probe_target_policy(address, port)
        if refusal is not None:
            return f"refused_{refusal}"
        if self._stun is None or self._alternate is None:
            return "unavailable"
        if not bucket.take(asyncio.get_running_loop().time()):
            return "rate_limited"
        target = (str(address), port)
        self._stun.sendto(nat_probe_datagram(PROBE_FROM_STUN_PORT), target)
        self._alternate.sendto(nat_probe_datagram(PROBE_FROM_ALTERNATE_PORT), target)
        return "sent"

    # -- housekeeping -----------------------------------------------------------------------

    async def _sweep_idle(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.settings.idle_timeout
        interval = max(0.05, min(timeout / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            deadline = loop.time() - timeout
            for conn in list(self.routes.values()):
                if conn.last_rx < deadline:
                    conn.close_with_error("idle timeout: no keepalive", "idle")


class TlsFiles:
    """The WSS listener's certificate and key files, loaded into one server context that later
    connections use; reloaded when the files change."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._mtimes()
        self._context.load_cert_chain(cert, key)

    def context(self) -> ssl.SSLContext:
        return self._context

    def _mtimes(self) -> tuple[float, float]:
        return (os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime)

    def reload_if_changed(self) -> bool:
        stamp = self._mtimes()
        if stamp == self._stamp:
            return False
        self._context.load_cert_chain(self.cert, self.key)
        self._stamp = stamp
        return True


def _guarded(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a long-lived task that logs its own death."""
    task = asyncio.get_running_loop().create_task(coro, name=name)

    def _done(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            _log.opt(exception=t.exception()).error("task {} died", name)

    task.add_done_callback(_done)
    return task


def _sockaddr(name: Any) -> tuple[str, int] | None:
    return (str(name[0]), int(name[1])) if name else None


def _fmt(addr: tuple[str, int] | None) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "off"
