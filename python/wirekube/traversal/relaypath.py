"""The agent's relay data path: a warm relay pool and one loopback UDP proxy per relayed peer.

    WireGuard --UDP--> 127.0.0.1:<proxy port for peer P>  (P's WireGuard endpoint while relayed)
              proxy --Data(P, datagram)--> relay (TCP) --> P's agent
    P's agent: relay --Data(us, datagram)--> its proxy for us --UDP--> its WireGuard

* **Warm**: one authenticated connection per relay address is kept open all the time
  (reconnect with backoff 1 s doubling to 30 s), so a failover only rewrites a WireGuard
  endpoint; nothing has to be dialled or proven at the moment a direct path dies
  (:class:`~wirekube.traversal.relaypool.RelayPool`).
* **Fast**: the per-packet work is a couple of C calls, and syscalls are batched.

  - *WireGuard -> relay*: each proxy is a plain non-blocking UDP socket *connected* to
    WireGuard's port (one 5-tuple, no per-packet address handling) and watched with
    ``add_reader``.  When it is readable, the proxy drains it with ``recv_into`` straight into
    one batch buffer, each datagram landing behind room for its frame header, which one
    ``struct.pack_into`` then fills (length, type, peer key); the whole batch (up to
    :data:`BATCH_BYTES`) leaves in one TCP write.  No ``bytes`` per datagram, no event-loop
    callback per datagram.
  - *relay -> WireGuard*: the relay client's socket reads straight into its frame decoder, which
    hands over all the frames from one source that a read brought, as a view
    (``RelayClient(on_frames=...)``).  Consecutive datagrams of one size (a TCP flow's full-sized
    segments, or its ACKs) go to WireGuard in one ``sendmsg`` with UDP GSO (``UDP_SEGMENT``):
    the kernel splits the batch into the same datagrams WireGuard would have received one by
    one, at a fraction of the per-datagram cost.  Where GSO is refused, plain ``send``.
  - TCP_NODELAY on the relay connection (its buffers left to TCP autotuning), 1 MiB buffers on
    the proxy sockets (UDP has no autotuning; a burst from WireGuard must fit).

* **Bounded**: the relay connection's write queue is held under
  ``RelayClientSettings.write_high_water``: above it the proxies stop reading (their kernel
  buffers then overflow and drop, as any congested UDP path does, and WireGuard's TCP flows back
  off); they resume once it has drained.  Nothing queues without bound in user space.
* **EPERM**: Cilium's socket-LB hook can refuse ``send`` on loopback with EPERM; the proxy
  recreates its socket on the same port after ``eperm_retry`` seconds and counts it; an EPERM
  that persists is reported (``eperm_active``) so the agent puts it in its status.

Everything runs on one asyncio loop (uvloop in the agent); :class:`RelayPath` methods must be
called on that loop (the agent uses ``loop.call_soon_threadsafe`` from other threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.relay.client import RelayClient, RelayClientSettings, RelayError
from wirekube.relay.dial import ProxyConfig, RelayURL
from wirekube.relay.protocol import DATA_HEADER, DATA_PREFIX_LEN, KEY_LEN, MAX_DATAGRAM, FrameType
from wirekube.traversal.relaypool import FALLBACK_HOLD_SECONDS, RelayPool

BATCH_BYTES = 128 * 1024
"""Datagrams read from one proxy socket per wake-up, at most (then other sockets get their turn)."""
SOCKET_BUFFER = 1 << 20
"""SO_RCVBUF/SO_SNDBUF asked for each proxy socket (capped by the kernel's rmem_max/wmem_max)."""
GSO_MAX_SEGMENTS = 64
"""UDP_MAX_SEGMENTS of every kernel with UDP GSO (newer ones allow 128)."""
GSO_MAX_BYTES = 65000
"""A GSO send is one UDP datagram to the kernel: its payload must stay under 65,507 bytes."""
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
SOL_UDP = getattr(socket, "SOL_UDP", 17)

_LENGTH = struct.Struct(">I")
_U16 = struct.Struct("=H")
_DATA = int(FrameType.DATA)
_BODY_OVERHEAD = 1 + KEY_LEN  # L counts the type byte and the key besides the datagram
_GSO_REFUSED = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE})
_SEND_DROPPED = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


@dataclass
class PathStats:
    to_relay_datagrams: int = 0
    to_relay_writes: int = 0
    """TCP writes that carried them (datagrams per write = how well the batching works)."""
    from_relay_datagrams: int = 0
    from_relay_runs: int = 0
    """Batches of frames from one source handed over by the relay client."""
    no_relay_drops: int = 0
    unknown_peer_drops: int = 0
    to_wireguard_drops: int = 0
    """Datagrams from the relay the proxy socket could not send (WireGuard gone, buffers full)."""
    oversized_drops: int = 0
    """Datagrams from WireGuard too large for a Data frame (never seen with a sane MTU)."""
    relay_reconnects: int = 0
    eperm_events: int = 0
    eperm_recoveries: int = 0
    paused_reading: int = 0
    """Times the proxies stopped reading because the relay connection's queue was full."""
    gso_sends: int = 0
    """sendmsg calls that carried several datagrams to WireGuard at once (UDP GSO)."""


@dataclass(eq=False)
class PeerProxy:
    """The loopback UDP socket standing for one remote peer."""

    path: RelayPath
    peer_key: bytes
    port: int = 0
    sock: socket.socket | None = None
    eperm_since: float | None = None
    _recreating: bool = False
    _reading: bool = False

    async def open(self) -> None:
        self._open()

    def _open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind(("127.0.0.1", self.port))
            sock.connect(("127.0.0.1", self.path.wireguard_port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.path._watch(self)

    # -- relay -> WireGuard ---------------------------------------------------------------

    def deliver(self, datagram: bytes) -> None:
        """One datagram from the relay, to WireGuard."""
        if self.sock is None:
            return
        try:
            self.sock.send(datagram)
        except PermissionError:
            self.on_eperm()
        except OSError:
            self.path.stats.to_wireguard_drops += 1

    def deliver_frames(self, frames: memoryview) -> int:
        """The datagrams carried by ``frames`` (whole Data frames, wire form), to WireGuard;
        returns how many there were.  Runs of equal-sized datagrams (the last may be shorter) go
        in one GSO ``sendmsg``."""
        unpack_from = _LENGTH.unpack_from
        size = len(frames)
        sock = self.sock
        if sock is None:
            count = 0
            off = 0
            while off < size:
                off += 4 + unpack_from(frames, off)[0]
                count += 1
            self.path.stats.to_wireguard_drops += count
            return count
        gso = self.path.gso
        send, sendmsg = sock.send, sock.sendmsg
        off = 0
        count = 0
        while off < size:
            (length,) = unpack_from(frames, off)
            end = off + 4 + length
            segment = length - _BODY_OVERHEAD
            if gso and end < size and unpack_from(frames, end)[0] == length:
                group = [frames[off + DATA_PREFIX_LEN : end]]
                total = segment
                off = end
                while off < size and len(group) < GSO_MAX_SEGMENTS:
                    (nxt,) = unpack_from(frames, off)
                    if nxt > length or total + nxt - _BODY_OVERHEAD > GSO_MAX_BYTES:
                        break
                    end = off + 4 + nxt
                    group.append(frames[off + DATA_PREFIX_LEN : end])
                    total += nxt - _BODY_OVERHEAD
                    off = end
                    if nxt != length:  # a shorter datagram may only end a GSO batch
                        break
                count += len(group)
                if len(group) == 1:  # the next one did not fit
                    self._send_one(send, group[0])
                    continue
                try:
                    sendmsg(group, [(SOL_UDP, UDP_SEGMENT, _U16.pack(segment))])
                    self.path.stats.gso_sends += 1
                except OSError as e:
                    if not self._send_failed(e, len(group)):
                        for datagram in group:  # GSO refused here: one by one, as before
                            self._send_one(send, datagram)
                continue
            count += 1
            self._send_one(send, frames[off + DATA_PREFIX_LEN : end])
            off = end
        return count

    def _send_one(self, send: object, datagram: memoryview) -> None:
        try:
            send(datagram)  # type: ignore[operator]
        except OSError as e:
            self._send_failed(e, 1)

    def _send_failed(self, e: OSError, count: int) -> bool:
        """Account for a failed send; ``False`` when GSO itself was refused (send one by one)."""
        if isinstance(e, PermissionError):
            self.on_eperm()
            self.path.stats.to_wireguard_drops += count
            return True
        if count > 1 and e.errno in _GSO_REFUSED:
            if self.path.gso:
                logger.info("relay-proxy: UDP GSO refused ({}); sending datagrams one by one", e)
            self.path.gso = False
            return False
        self.path.stats.to_wireguard_drops += count
        if e.errno not in _SEND_DROPPED:
            logger.debug("relay-proxy: send to WireGuard failed: {}", e)
        return True

    # -- WireGuard -> relay ---------------------------------------------------------------

    def pump(self) -> None:
        """Readable: drain the socket into one batch of Data frames, written to the relay at once."""
        sock = self.sock
        if sock is None:
            return
        path = self.path
        buf, view = path._batch, path._batch_view
        recv_into = sock.recv_into
        pack_into = DATA_HEADER.pack_into
        key = self.peer_key
        limit = BATCH_BYTES
        off = count = 0
        errors = 0
        while off < limit:
            try:
                n = recv_into(view[off + DATA_PREFIX_LEN :], MAX_DATAGRAM + 1)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:  # an ICMP error queued by an earlier send (WireGuard restarting)
                errors += 1
                if isinstance(e, PermissionError):
                    self.on_eperm()
                if errors > 8:
                    break
                continue
            if 0 < n <= MAX_DATAGRAM:
                pack_into(buf, off, n + _BODY_OVERHEAD, _DATA, key)
                off += DATA_PREFIX_LEN + n
                count += 1
            elif n:
                path.stats.oversized_drops += 1
        if not count:
            return
        client = path._up
        if client is None:
            path.stats.no_relay_drops += count
            return
        try:
            client.send_frames(bytes(view[:off]))
            path.stats.to_relay_datagrams += count
            path.stats.to_relay_writes += 1
        except (RelayError, RuntimeError):
            path.stats.no_relay_drops += count

    # -- EPERM and closing ----------------------------------------------------------------

    def on_eperm(self) -> None:
        stats = self.path.stats
        stats.eperm_events += 1
        if self.eperm_since is None:
            self.eperm_since = time.monotonic()
            logger.warning("relay-proxy: EPERM on port {}, scheduling socket recreation", self.port)
        if not self._recreating:
            self._recreating = True
            asyncio.get_running_loop().call_later(self.path.eperm_retry, self._recreate)

    def _recreate(self) -> None:
        try:
            self._close_socket()
            self._open()
            self.path.stats.eperm_recoveries += 1
            self.eperm_since = None
        except OSError as e:
            logger.error("relay-proxy: recreating the socket on port {} failed: {}", self.port, e)
        finally:
            self._recreating = False

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.path._unwatch(self)
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self._close_socket()


@dataclass(eq=False)
class RelayPath:
    private_key: X25519PrivateKey
    wireguard_port: int
    eperm_retry: float = 3.0
    eperm_persistent_after: float = 10.0
    stats: PathStats = field(default_factory=PathStats)
    gso: bool = True
    """Send runs of equal-sized datagrams to WireGuard with UDP GSO (turned off by itself if the
    kernel refuses it)."""
    fwmark: int | None = None
    """SO_MARK of the relay connections: the agent passes WireGuard's fwmark, so policy routing
    keeps them in the main table whatever a peer's AllowedIPs would capture."""
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    """HTTP CONNECT proxy for relay connections (``HTTPS_PROXY``/``NO_PROXY``)."""
    ca_file: str | None = None
    """CA bundle for ``wss://`` relays (``None``: the system's)."""
    fallback_hold: float = FALLBACK_HOLD_SECONDS
    _proxies: dict[bytes, PeerProxy] = field(default_factory=dict)
    _up: RelayClient | None = None
    """The connection datagrams to the relay go through (the first connected, by address)."""
    _paused: bool = False
    _batch: bytearray = field(default_factory=lambda: bytearray(BATCH_BYTES + DATA_PREFIX_LEN + MAX_DATAGRAM + 1))
    _batch_view: memoryview = field(init=False)
    _pool: RelayPool = field(init=False)
    """The warm relay connections."""

    def __post_init__(self) -> None:
        self._batch_view = memoryview(self._batch)
        settings = RelayClientSettings(fwmark=self.fwmark, proxy=self.proxy, ca_file=self.ca_file)
        self._pool = RelayPool(self.private_key, settings, self.stats, fallback_hold=self.fallback_hold,
                               on_frames=self._from_relay_frames, on_flow=self._on_flow, on_change=self._choose_up)

    # ---- relays --------------------------------------------------------------------------------

    def set_relays(self, addresses: Iterable[tuple[str, int] | RelayURL],
                   fallbacks: Iterable[RelayURL] = ()) -> None:
        """Keep exactly one warm connection per address (new ones dialled, gone ones closed).

        ``addresses`` are ``(host, port)`` pairs or relay URLs (``tcp://`` or ``wss://``);
        ``fallbacks`` (the relay over WSS) are dialled only while no connection to ``addresses``
        is up and each of them has failed at least once (or there are none): raw TCP is
        preferred, and a fallback is dropped once TCP has been back for ``fallback_hold`` s."""
        self._pool.set_relays(addresses, fallbacks)

    def connected_relays(self) -> list[tuple[str, int]]:
        return self._pool.connected_relays()

    async def nat_probe(self, ip: str, port: int, timeout: float = 3.0) -> bool | None:
        """Ask a connected relay to send its two UDP probes to ``ip:port`` (see
        :meth:`RelayClient.nat_probe`); None when no relay is connected."""
        client = self._pool.client()
        if client is None:
            return None
        return await client.nat_probe(ip, port, timeout=timeout)

    def transport(self) -> str:
        """How relayed traffic leaves: ``tcp``, ``wss``, with `` via proxy HOST:PORT`` when it
        goes through an HTTP proxy; ``""`` when no relay connection is up."""
        up = self._up
        if up is None or up.closed:
            return ""
        return f"{up.transport} via proxy {up.proxy}" if up.proxy is not None else up.transport

    def problem(self) -> tuple[str, str] | None:
        """Why no relay connection is up, once every relay address has been tried: (reason,
        message), reason ``ProxyAuthenticationFailed`` when a proxy refused the credentials,
        else ``Unreachable``.  ``None`` while one is up or attempts are still pending.  Safe to
        call from another thread (reads a snapshot)."""
        return self._pool.problem()

    def _choose_up(self) -> None:
        """Re-pick the connection to send through (on every connect, loss and relay-set change)."""
        self._up = self._pool.client()
        self._set_paused(self._up is not None and self._up.writing_paused)

    def _on_flow(self, paused: bool) -> None:
        """A relay client's write queue crossed its high-water mark (or drained); only the one
        datagrams go through matters."""
        self._set_paused(self._up is not None and self._up.writing_paused)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        if paused:
            self.stats.paused_reading += 1
        for proxy in self._proxies.values():
            if paused:
                self._unwatch(proxy)
            else:
                self._watch(proxy)

    # ---- proxies -------------------------------------------------------------------------------

    async def ensure_proxy(self, peer_key: bytes, port: int = 0) -> int:
        """The loopback port standing for ``peer_key`` (created on first use, on ``port`` when it
        is given and free: a proxy re-created after a restart keeps WireGuard's endpoint valid)."""
        proxy = self._proxies.get(peer_key)
        if proxy is None:
            if any(p.port == port for p in self._proxies.values()):
                port = 0  # SO_REUSEADDR would let two proxies share it
            proxy = PeerProxy(self, peer_key, port)
            try:
                await proxy.open()
            except OSError:
                if not port:
                    raise
                proxy = PeerProxy(self, peer_key)  # the old port is taken: any free one
                await proxy.open()
            self._proxies[peer_key] = proxy
        return proxy.port

    def retain(self, peer_keys: Iterable[bytes]) -> list[bytes]:
        """Close every proxy whose peer is not in ``peer_keys``; returns the keys closed."""
        keep = set(peer_keys)
        gone = [k for k in self._proxies if k not in keep]
        for key in gone:
            self.remove_proxy(key)
        return gone

    def remove_proxy(self, peer_key: bytes) -> None:
        proxy = self._proxies.pop(peer_key, None)
        if proxy is not None:
            proxy.close()

    def proxy_ports(self) -> dict[bytes, int]:
        return {k: p.port for k, p in self._proxies.items()}

    def eperm_active(self) -> list[int]:
        """Proxy ports whose EPERM has lasted longer than ``eperm_persistent_after``.  Safe to call
        from another thread: it reads a snapshot of the proxies (taken in one C call)."""
        now = time.monotonic()
        return [p.port for p in list(self._proxies.values())
                if p.eperm_since is not None and now - p.eperm_since > self.eperm_persistent_after]

    def _watch(self, proxy: PeerProxy) -> None:
        if proxy.sock is not None and not proxy._reading and not self._paused:
            asyncio.get_running_loop().add_reader(proxy.sock.fileno(), proxy.pump)
            proxy._reading = True

    def _unwatch(self, proxy: PeerProxy) -> None:
        if proxy.sock is not None and proxy._reading:
            asyncio.get_running_loop().remove_reader(proxy.sock.fileno())
            proxy._reading = False

    # ---- data ----------------------------------------------------------------------------------

    def _from_relay_frames(self, source_key: bytes, frames: memoryview) -> None:
        proxy = self._proxies.get(source_key)
        if proxy is None:
            off = count = 0
            while off < len(frames):
                off += 4 + _LENGTH.unpack_from(frames, off)[0]
                count += 1
            self.stats.unknown_peer_drops += count
            return
        self.stats.from_relay_datagrams += proxy.deliver_frames(frames)
        self.stats.from_relay_runs += 1

    def _from_relay(self, source_key: bytes, datagram: bytes) -> None:
        """One datagram from the relay (the per-datagram form of :meth:`_from_relay_frames`)."""
        proxy = self._proxies.get(source_key)
        if proxy is None:
            self.stats.unknown_peer_drops += 1
            return
        self.stats.from_relay_datagrams += 1
        proxy.deliver(datagram)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        for proxy in self._proxies.values():
            proxy.close()
        self._proxies.clear()
        await self._pool.close()
        self._up = None
