"""An asyncio client for the relay, for the agent's relay proxy and for tests.

::

    client = await RelayClient.connect(host, port, private_key, on_data=handle)
    client.send(peer_public_key, wireguard_datagram)      # never blocks
    rtt = await client.relay_probe()                        # seconds
    sent = await client.nat_probe("203.0.113.7", 51820)     # True once the relay sent both probes
    await client.close()

``connect`` returns only after the relay answered Registered: the proof of key ownership is done
(:mod:`wirekube.relay.auth`).  Received Data goes to ``on_data(source_key, datagram)`` when given
(called from the event loop, must not block), else into a bounded queue read with
:meth:`RelayClient.recv` (overflow drops the newest datagram and counts it).

The data path (the agent's relay proxy) uses the batch forms instead: ``on_frames(source_key,
frames)`` receives every Data frame from one source that a read brought, still in wire form, as a
view of the receive buffer (the socket reads straight into the frame decoder; nothing is copied
or allocated per datagram), and :meth:`RelayClient.send_frames` writes a batch of Data frames the
caller already encoded (``protocol.DATA_HEADER``).  ``on_flow(paused)`` reports the transport's
write flow control: ``True`` once more than ``write_high_water`` bytes wait to be sent, ``False``
when it has drained, so a sender can stop reading its own input instead of queueing without bound.

The client sends a Keepalive every ``keepalive_interval``; the relay answers each one, so a relay
that stays silent for ``dead_after`` seconds is taken as gone and the client closes.  Reconnecting
is the caller's business; :func:`backoff_delays` gives the reference schedule (the first retry
within 250 ms, jittered, growing to 30 s): behind a load balancer a retry usually lands on a
live replica, so the first one should come at once.

A relay that is shutting down sends GoAway: the client then opens a new connection to the same
address (the load balancer picks another replica), registers there, switches its traffic to it
and closes the old one, all inside this object (make before break); until the new one is
registered, the old one keeps carrying traffic.  ``fwmark`` (``SO_MARK``, set before connecting)
lets a caller keep the relay connection out of routing tables that would capture it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import cast

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.relay.auth import fingerprint, prove, public_bytes
from wirekube.relay.clientdial import Dialer, RelayError, RelayProxyRefused
from wirekube.relay.dial import Proxy, ProxyConfig, RelayURL
from wirekube.relay.protocol import (
    NEED_DATA,
    TOKEN_LEN,
    DataRun,
    Frame,
    FrameDecoder,
    FrameType,
    RemoteProtocolError,
    encode_auth,
    encode_data,
    encode_error,
    encode_keepalive,
    encode_nat_probe,
    encode_relay_probe,
    parse_error,
    run_datagrams,
)

DataHandler = Callable[[bytes, bytes], None]
"""``on_data(source_key, datagram)``."""
FramesHandler = Callable[[bytes, memoryview], None]
"""``on_frames(source_key, frames)``: whole Data frames from one source, in wire form."""
FlowHandler = Callable[[bool], None]
"""``on_flow(paused)``."""


class RelayRejected(RelayError):
    """The relay answered with an Error frame; ``reason`` is its text."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"relay refused: {reason}")
        self.reason = reason


class RelayClosed(RelayError):
    """The connection is closed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"relay connection closed: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class RelayClientSettings:
    connect_timeout: float = 5.0
    """Seconds for TCP connect plus registration."""
    keepalive_interval: float = 25.0
    dead_after: float = 75.0
    """Seconds without any frame from the relay before the connection is given up."""
    receive_queue: int = 4096
    """Datagrams held for :meth:`RelayClient.recv` when there is no ``on_data`` callback."""
    write_high_water: int = 256 * 1024
    """Bytes queued in the transport beyond which ``on_flow(True)`` is reported."""
    socket_buffer: int = 0
    """SO_SNDBUF and SO_RCVBUF for the TCP socket; 0 (the default) leaves them to the kernel's
    autotuning, which grows them with the path's bandwidth-delay product (a fixed 1 MiB would cap
    one connection at ~160 Mbit/s over 50 ms)."""
    fwmark: int | None = None
    """SO_MARK for the TCP socket, set before connecting (needs CAP_NET_ADMIN); None: unmarked."""
    migrate_for: float = 8.0
    """After a GoAway, how long the client keeps trying to register again while the old
    connection still works."""
    proxy: ProxyConfig = ProxyConfig()
    """HTTP CONNECT proxy for relay connections (the agent builds it from ``HTTPS_PROXY`` and
    ``NO_PROXY``); the default is none."""
    ca_file: str | None = None
    """CA bundle (PEM) that a ``wss://`` relay's certificate must chain to; ``None``: the system's."""


def backoff_delays(initial: float = 0.25, maximum: float = 30.0, factor: float = 1.6, quick: int = 3,
                   rng: random.Random | None = None) -> Iterator[float]:
    """Reconnect delays: each one a random value between half and all of a bound that stays at
    ``initial`` for the first ``quick`` retries, then grows by ``factor`` up to ``maximum``.  The
    first retry comes within ``initial`` seconds; behind a load balancer a retry that lands on a
    dead replica is refused at once, so a few quick ones find a live replica; the jitter keeps
    many clients that lost the same relay from retrying in step."""
    uniform = (rng or random).uniform
    bound = initial
    for attempt in itertools.count():
        yield uniform(bound / 2, bound)
        if attempt + 1 >= quick:
            bound = min(bound * factor, maximum)


class _ClientProtocol(asyncio.BufferedProtocol):
    """One TCP connection of a client (a client has a second one while it moves after GoAway).
    The socket reads straight into the frame decoder's buffer (no per-read ``bytes``)."""

    def __init__(self, client: RelayClient) -> None:
        self._client = client
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.registered: asyncio.Future[None] = client._loop.create_future()
        self.lost = False
        self.told_to_go = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        settings = self._client.settings
        self.transport.set_write_buffer_limits(high=settings.write_high_water)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio and uvloop both default to it; a relayed WireGuard packet must not wait
            # for Nagle, so say it explicitly.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF) if settings.socket_buffer else ():
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, settings.socket_buffer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        client = self._client
        client._last_rx = time.monotonic()
        decoder = self._decoder
        decoder.buffer_updated(nbytes)
        try:
            while True:
                item = decoder.next_run()
                if item is NEED_DATA:
                    return
                if not self.registered.done():
                    if not self._handshake(item):  # type: ignore[arg-type]  # NEED_DATA returned above
                        decoder.clear()
                        return
                elif isinstance(item, DataRun):
                    client._on_run(item)
                else:
                    client._on_frame(self, item)  # type: ignore[arg-type]  # a Frame: NEED_DATA returned above
                if client.closed or self.lost:
                    decoder.clear()
                    return
        except RemoteProtocolError as e:
            self.fail(f"relay broke the protocol: {e}", send_error=True)

    def _handshake(self, item: Frame | DataRun) -> bool:
        """A frame before Registered; False once the connection is given up."""
        if isinstance(item, Frame) and item.type == FrameType.CHALLENGE:
            try:
                self.write(encode_auth(prove(self._client._private_key, item.body)))
            except ValueError as e:
                self.fail(f"relay sent an unusable challenge: {e}", send_error=True)
                return False
            return True
        if isinstance(item, Frame) and item.type == FrameType.REGISTERED:
            self.registered.set_result(None)
            return True
        if isinstance(item, Frame) and item.type == FrameType.ERROR:
            self.fail(parse_error(item.body), rejected=True)
            return False
        name = "Data" if isinstance(item, DataRun) else _type_name(item.type)
        self.fail(f"relay sent {name} before Registered", send_error=True)
        return False

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self, reason: str, *, rejected: bool = False, send_error: bool = False) -> None:
        """This connection is over: close it and tell the client."""
        if self.lost:
            return
        self.lost = True
        if not self.registered.done():
            self.registered.set_exception(RelayRejected(reason) if rejected else RelayError(reason))
            self.registered.exception()  # retrieved: whoever awaits it re-raises it
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if send_error:
                transport.write(encode_error(reason))
            transport.close()
        self._client._connection_over(self, reason, rejected)

    def retire(self) -> None:
        """Traffic moved to another connection: close this one quietly."""
        self.lost = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.fail("aborted")
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self._client._flow(self, True)

    def resume_writing(self) -> None:
        self._client._flow(self, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost: {exc}" if exc else "connection closed by relay")


class _Waiters:
    """The round trips a client waits for: RelayProbe echoes (by token) and NatProbe
    confirmations (by target)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._probes: dict[bytes, asyncio.Future[None]] = {}
        self._nat_acks: dict[bytes, asyncio.Future[None]] = {}

    async def relay_probe(self, transport: Callable[[], asyncio.Transport], timeout: float) -> float:
        token = os.urandom(TOKEN_LEN)
        waiter = self._loop.create_future()
        self._probes[token] = waiter
        started = time.monotonic()
        try:
            transport().write(encode_relay_probe(token))
            await _await(waiter, timeout)
        finally:
            self._probes.pop(token, None)
        return time.monotonic() - started

    async def nat_probe(self, transport: Callable[[], asyncio.Transport], ip: str, port: int, timeout: float) -> bool:
        frame = encode_nat_probe(ip, port)
        body = frame[5:]
        waiter = self._nat_acks.get(body)
        if waiter is None:
            waiter = self._nat_acks[body] = self._loop.create_future()
        try:
            transport().write(frame)
            await _await(waiter, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._nat_acks.pop(body, None)

    def relay_probe_answered(self, token: bytes) -> bool:
        """A RelayProbe came back; False when it is not one of ours (the relay asks)."""
        waiter = self._probes.get(token)
        if waiter is None:
            return False
        if not waiter.done():
            waiter.set_result(None)
        return True

    def nat_probe_sent(self, body: bytes) -> None:
        ack = self._nat_acks.get(body)
        if ack is not None and not ack.done():
            ack.set_result(None)

    def fail(self, reason: str) -> None:
        for waiter in [*self._probes.values(), *self._nat_acks.values()]:
            if not waiter.done():
                waiter.set_exception(RelayClosed(reason))
                waiter.exception()


async def _await(waiter: asyncio.Future[None], timeout: float) -> None:
    await asyncio.wait_for(asyncio.shield(waiter), timeout)


def _type_name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"0x{ftype:02x}"


class _Mover:
    """Moving after a GoAway (make before break): registers a new connection through the same
    address, then switches the client's traffic to it; the old one keeps carrying traffic until
    then.  Owns the connection being registered, the task doing it, and why the old connection
    ended if it did meanwhile."""

    def __init__(self, client: RelayClient) -> None:
        self._client = client
        self.moving: _ClientProtocol | None = None
        """The connection being registered after a GoAway (it replaces the client's once registered)."""
        self.task: asyncio.Task[None] | None = None
        self.old_lost: str | None = None
        self.migrations = 0

    def start(self) -> None:
        client = self._client
        if self.task is None and not client.closed:
            self.task = client._loop.create_task(self._migrate(), name=f"relay-move-{client.fingerprint}")

    def cancel(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    async def _migrate(self) -> None:
        client = self._client
        deadline = time.monotonic() + client.settings.migrate_for
        delays = backoff_delays(0.1, 1.0)
        try:
            while not client.closed:
                try:
                    protocol = await asyncio.wait_for(client._dial(moving=True), client.settings.connect_timeout)
                except (OSError, RelayError, TimeoutError) as e:
                    if self.old_lost is not None:
                        client._fail(self.old_lost)
                        return
                    if time.monotonic() > deadline:  # stay on the old connection while it lasts
                        client._log.warning("could not move after GoAway: {}", e or type(e).__name__)
                        return
                    await asyncio.sleep(next(delays))
                    continue
                if client.closed:
                    protocol.abort()
                    return
                if protocol.lost:
                    continue
                old, client._protocol = client._protocol, protocol
                self.old_lost = None
                self.migrations += 1
                if old is not None:
                    old.retire()
                if client.writing_paused:
                    client._flow(protocol, False)
                client._log.info("moved to a new relay connection")
                if protocol.told_to_go:
                    client._loop.call_soon(self.start)
                return
        finally:
            self.task = None


class RelayClient:
    """One registered connection to a relay.  Build it with :meth:`connect`."""

    def __init__(
        self,
        private_key: X25519PrivateKey,
        *,
        on_data: DataHandler | None = None,
        on_frames: FramesHandler | None = None,
        on_flow: FlowHandler | None = None,
        settings: RelayClientSettings = RelayClientSettings(),
    ) -> None:
        self._private_key = private_key
        self.public_key = public_bytes(private_key)
        self.fingerprint = fingerprint(self.public_key)
        self._on_data = on_data
        self._on_frames = on_frames
        self._on_flow = on_flow
        self.writing_paused = False
        self.settings = settings
        self._loop = asyncio.get_running_loop()
        self._protocol: _ClientProtocol | None = None
        """The connection traffic goes through."""
        self._mover = _Mover(self)
        self._dialer = Dialer(RelayURL("tcp", "", 0), None, settings, self.public_key)
        self.transport = "tcp"
        """How this client reaches the relay: ``tcp`` or ``wss``."""
        self.proxy: Proxy | None = None
        """The HTTP proxy the connection goes through, if any."""
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._inbox: deque[tuple[bytes, bytes]] = deque()
        self._inbox_ready = asyncio.Event()
        self._waiters = _Waiters(self._loop)
        self._keepalive: asyncio.Task[None] | None = None
        self._last_rx = time.monotonic()
        self.received_dropped = 0
        self.callback_errors = 0
        self._log = logger.bind(component="relay-client", peer=self.fingerprint)

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        private_key: X25519PrivateKey,
        *,
        on_data: DataHandler | None = None,
        on_frames: FramesHandler | None = None,
        on_flow: FlowHandler | None = None,
        settings: RelayClientSettings = RelayClientSettings(),
    ) -> RelayClient:
        """Connect and register; raises :class:`RelayRejected`, :class:`RelayError` or
        ``OSError``, and ``TimeoutError`` after ``settings.connect_timeout``.

        ``on_frames``, when given, takes received Data instead of ``on_data``/:meth:`recv`: it is
        called with the source key and a view of the Data frames (wire form: length, type, the
        source key, the datagram) from that source, from the event loop; it must not block."""
        return await cls.connect_url(RelayURL("tcp", host, port), private_key, on_data=on_data, on_frames=on_frames,
                                     on_flow=on_flow, settings=settings)

    @classmethod
    async def connect_url(
        cls,
        url: RelayURL | str,
        private_key: X25519PrivateKey,
        *,
        on_data: DataHandler | None = None,
        on_frames: FramesHandler | None = None,
        on_flow: FlowHandler | None = None,
        settings: RelayClientSettings = RelayClientSettings(),
    ) -> RelayClient:
        """:meth:`connect` to a relay URL (``tcp://host:port`` or ``wss://host[:port]/path``),
        through ``settings.proxy`` when it applies to the host.  A proxy's refusal raises
        :class:`RelayProxyRefused`."""
        client = cls(private_key, on_data=on_data, on_frames=on_frames, on_flow=on_flow, settings=settings)
        parsed = url if isinstance(url, RelayURL) else RelayURL.parse(url)
        client.transport = parsed.scheme
        client.proxy = settings.proxy.for_host(parsed.host)
        client._dialer = Dialer(parsed, client.proxy, settings, client.public_key)
        try:
            client._protocol = await asyncio.wait_for(client._dial(), settings.connect_timeout)
        except BaseException:
            client._abort()
            raise
        if client._protocol.lost:  # lost between Registered and now
            client._fail("connection lost right after registering")
            raise RelayClosed("connection lost right after registering")
        client._keepalive = asyncio.get_running_loop().create_task(
            client._keepalive_loop(), name=f"relay-keepalive-{client.fingerprint}"
        )
        return client

    async def _dial(self, *, moving: bool = False) -> _ClientProtocol:
        """A new connection to the relay address, registered (or an exception)."""
        protocol = _ClientProtocol(self)
        if moving:
            self._mover.moving = protocol
        try:
            await self._dialer.dial(protocol)
        finally:
            if moving:
                self._mover.moving = None
        return protocol

    # -- sending ----------------------------------------------------------------------------

    def send(self, destination: bytes, datagram: bytes) -> None:
        """Queue one datagram for ``destination``; never blocks (see :meth:`write_buffer_size`)."""
        self._transport().write(encode_data(destination, datagram))

    def send_many(self, destination: bytes, datagrams: Iterable[bytes]) -> None:
        """Queue several datagrams for one destination in one write."""
        self._transport().writelines([encode_data(destination, d) for d in datagrams])

    def send_frames(self, frames: bytes) -> None:
        """Queue Data frames already in wire form (each ``protocol.DATA_HEADER`` + datagram), in one
        write; never blocks.  The caller vouches for the framing: the relay closes a connection
        that breaks it."""
        self._transport().write(frames)

    def write_buffer_size(self) -> int:
        """Bytes queued locally and not yet handed to the kernel."""
        return self._transport().get_write_buffer_size()

    async def relay_probe(self, timeout: float = 5.0) -> float:
        """Round trip to the relay in seconds (a RelayProbe echoed by the relay)."""
        return await self._waiters.relay_probe(self._transport, timeout)

    async def nat_probe(self, ip: str, port: int, timeout: float = 5.0) -> bool:
        """Ask the relay to send its two UDP probes to ``ip:port``.

        True when the relay confirms it sent them; False when it did not answer in ``timeout``
        (refused target or rate limit: the relay sends no confirmation then).
        """
        return await self._waiters.nat_probe(self._transport, ip, port, timeout)

    # -- receiving --------------------------------------------------------------------------

    async def recv(self) -> tuple[bytes, bytes]:
        """The next (source key, datagram); only without an ``on_data`` callback."""
        while not self._inbox:
            if self._closed.done():
                raise RelayClosed(self._closed.result())
            self._inbox_ready.clear()
            await self._inbox_ready.wait()  # set on new data and on close
        return self._inbox.popleft()

    def _on_run(self, run: DataRun) -> None:
        source = run.key
        if self._on_frames is not None:
            try:
                self._on_frames(source, run.frames)
            except Exception:  # noqa: BLE001 - a handler bug must not cut the relay link
                self._handler_failed("on_frames")
            return
        datagrams = run_datagrams(run)
        if self._on_data is not None:
            for datagram in datagrams:
                try:
                    self._on_data(source, datagram)
                except Exception:  # noqa: BLE001 - a handler bug must not cut the relay link
                    self._handler_failed("on_data")
            return
        room = self.settings.receive_queue - len(self._inbox)
        self._inbox.extend((source, d) for d in datagrams[: max(room, 0)])
        self.received_dropped += max(0, len(datagrams) - max(room, 0))
        self._inbox_ready.set()

    def _handler_failed(self, name: str) -> None:
        """Called from an ``except`` block: count, and log the first failure with its traceback."""
        self.callback_errors += 1
        if self.callback_errors == 1:
            self._log.exception("{} handler failed (later failures are only counted)", name)

    def _flow(self, protocol: _ClientProtocol, paused: bool) -> None:
        if protocol is not self._protocol or paused == self.writing_paused:
            return
        self.writing_paused = paused
        if self._on_flow is not None:
            try:
                self._on_flow(paused)
            except Exception:  # noqa: BLE001 - as for on_data
                self._handler_failed("on_flow")

    def _on_frame(self, protocol: _ClientProtocol, frame: Frame) -> None:
        ftype = frame.type
        if ftype == FrameType.RELAY_PROBE:
            if not self._waiters.relay_probe_answered(frame.body):
                protocol.write(encode_relay_probe(frame.body))  # the relay asks: echo it
        elif ftype == FrameType.NAT_PROBE:
            self._waiters.nat_probe_sent(frame.body)
        elif ftype == FrameType.KEEPALIVE:
            pass
        elif ftype == FrameType.GOAWAY:
            protocol.told_to_go = True
            self._log.info("relay draining ({}): moving to another connection", parse_error(frame.body))
            if protocol is self._protocol:
                self._mover.start()
        elif ftype == FrameType.ERROR:
            protocol.fail(parse_error(frame.body), rejected=True)
        else:
            protocol.fail(f"relay sent an unexpected {_type_name(ftype)}", send_error=True)

    @property
    def migrations(self) -> int:
        """Times this client moved to another connection after a GoAway."""
        return self._mover.migrations

    def _connection_over(self, protocol: _ClientProtocol, reason: str, rejected: bool) -> None:
        """One of our connections ended (``_ClientProtocol.fail``)."""
        if protocol is not self._protocol:
            return  # a connection being set up (its dialer sees the failure) or a retired one
        if self._mover.task is not None:
            self._mover.old_lost = reason  # the move decides
            return
        self._fail(reason, rejected=rejected)

    # -- keepalive and closing --------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        s = self.settings
        tick = min(s.keepalive_interval, s.dead_after / 3)
        last_sent = time.monotonic()
        while not self.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self._last_rx > s.dead_after:
                self._fail(f"relay silent for {now - self._last_rx:.0f}s")
                return
            if now - last_sent >= s.keepalive_interval:
                self._write(encode_keepalive())
                last_sent = now

    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def close_reason(self) -> str | None:
        return self._closed.result() if self._closed.done() else None

    async def wait_closed(self) -> str:
        """Wait until the connection ends; returns why."""
        return await asyncio.shield(self._closed)

    async def close(self) -> None:
        """Close politely (the relay unbinds the key at once)."""
        if not self.closed:
            self._fail("closed by us")
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive

    def _fail(self, reason: str, *, rejected: bool = False, send_error: bool = False) -> None:
        if self._closed.done():
            return
        self._closed.set_result(reason)
        self._waiters.fail(reason)
        self._inbox_ready.set()
        for protocol in (self._protocol, self._mover.moving):
            if protocol is not None:
                protocol.fail(reason, rejected=rejected, send_error=send_error)
        self._mover.cancel()
        self._log.debug("relay connection closed: {}", reason)

    def _abort(self) -> None:
        self._fail("connect failed")
        for protocol in (self._protocol, self._mover.moving):
            if protocol is not None:
                protocol.abort()
        if self._keepalive is not None:
            self._keepalive.cancel()

    def _transport(self) -> asyncio.Transport:
        if self._closed.done():
            raise RelayClosed(self._closed.result())
        assert self._protocol is not None and self._protocol.transport is not None
        return self._protocol.transport

    def _write(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.write(data)


__all__ = [
    "DataHandler",
    "FlowHandler",
    "FramesHandler",
    "RelayClient",
    "RelayClientSettings",
    "RelayClosed",
    "RelayError",
    "RelayProxyRefused",
    "RelayRejected",
    "backoff_delays",
]
