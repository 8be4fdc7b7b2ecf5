"""The agent's relay data path: a warm relay pool and one loopback UDP proxy per relayed peer.

    WireGuard --UDP--> 127.0.0.1:<proxy port for peer P>  (P's WireGuard endpoint while relayed)
              proxy --Data(P, datagram)--> relay (TCP) --> P's agent
    P's agent: relay --Data(us, datagram)--> its proxy for us --UDP--> its WireGuard

* **Warm**: one authenticated connection per relay address is kept open all the time
  (reconnect with backoff 1 s doubling to 30 s), so a failover only rewrites a WireGuard
  endpoint; nothing has to be dialled or proven at the moment a direct path dies.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.relay.client import RelayClient, RelayClientSettings, RelayError, RelayProxyRefused, backoff_delays
from wirekube.relay.dial import ProxyConfig, RelayURL
from wirekube.relay.protocol import DATA_HEADER, DATA_PREFIX_LEN, KEY_LEN, MAX_DATAGRAM, FrameType

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
class _RelaySlot:
    address: tuple[str, int]
    url: RelayURL
    fallback: bool = False
    """A WSS slot dialled only while no raw-TCP slot is connected (see :meth:`RelayPath.set_relays`)."""
    client: RelayClient | None = None
    task: asyncio.Task[None] | None = None
    connected_since: float = 0.0
    last_error: str = ""
    failures: int = 0
    """Failed attempts since the last success."""
    proxy_auth_failed: bool = False
    """The last attempt failed because the HTTP proxy refused the credentials."""


FALLBACK_HOLD_SECONDS = 10.0
"""A fallback (WSS) connection is closed only after raw TCP has been up this long, so a relay
that flaps on TCP does not make every node reconnect twice."""


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
    _slots: dict[tuple[str, int], _RelaySlot] = field(default_factory=dict)
    _fallbacks: dict[RelayURL, _RelaySlot] = field(default_factory=dict)
    _proxies: dict[bytes, PeerProxy] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _up: RelayClient | None = None
    """The connection datagrams to the relay go through (the first connected, by address)."""
    _paused: bool = False
    _batch: bytearray = field(default_factory=lambda: bytearray(BATCH_BYTES + DATA_PREFIX_LEN + MAX_DATAGRAM + 1))
    _batch_view: memoryview = field(init=False)
    _primary_changed: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self._batch_view = memoryview(self._batch)

    # ---- relays --------------------------------------------------------------------------------

    def set_relays(self, addresses: Iterable[tuple[str, int] | RelayURL],
                   fallbacks: Iterable[RelayURL] = ()) -> None:
        """Keep exactly one warm connection per address (new ones dialled, gone ones closed).

        ``addresses`` are ``(host, port)`` pairs or relay URLs (``tcp://`` or ``wss://``);
        ``fallbacks`` (the relay over WSS) are dialled only while no connection to ``addresses``
        is up and each of them has failed at least once (or there are none): raw TCP is
        preferred, and a fallback is dropped once TCP has been back for ``fallback_hold`` s."""
        wanted: dict[tuple[str, int], RelayURL] = {}
        for a in addresses:
            url = a if isinstance(a, RelayURL) else RelayURL("tcp", a[0], a[1])
            wanted[(url.host, url.port) if url.scheme == "tcp" else (str(url), 0)] = url
        for addr in list(self._slots):
            if addr not in wanted or self._slots[addr].url != wanted[addr]:
                self._drop(self._slots.pop(addr))
        for addr, url in wanted.items():
            if addr not in self._slots:
                slot = _RelaySlot(addr, url)
                self._slots[addr] = slot
                slot.task = self._spawn(self._keep_connected(slot), f"relay-{url}")
        wanted_fallbacks = dict.fromkeys(fallbacks)
        for url in list(self._fallbacks):
            if url not in wanted_fallbacks:
                self._drop(self._fallbacks.pop(url))
        for url in wanted_fallbacks:
            if url not in self._fallbacks:
                slot = _RelaySlot((str(url), 0), url, fallback=True)
                self._fallbacks[url] = slot
                slot.task = self._spawn(self._keep_connected(slot), f"relay-fallback-{url}")
        self._choose_up()

    def _drop(self, slot: _RelaySlot) -> None:
        if slot.task:
            slot.task.cancel()
        if slot.client:
            self._spawn(slot.client.close(), "relay-close")

    def _primary_up(self) -> bool:
        return any(s.client is not None and not s.client.closed for s in self._slots.values())

    def _fallback_up(self) -> bool:
        return any(s.client is not None and not s.client.closed for s in self._fallbacks.values())

    def _fallback_wanted(self) -> bool:
        """No raw-TCP relay connection is up, and every one has been tried and failed."""
        return not self._primary_up() and all(s.failures > 0 for s in self._slots.values())

    def _primary_event(self) -> asyncio.Event:
        if self._primary_changed is None:
            self._primary_changed = asyncio.Event()
        return self._primary_changed

    def _notify_primary(self) -> None:
        if self._primary_changed is not None:
            self._primary_changed.set()
            self._primary_changed = None

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._primary_event().wait()

    async def _keep_connected(self, slot: _RelaySlot) -> None:
        delays = backoff_delays()
        while True:
            if slot.fallback:
                await self._wait_for(self._fallback_wanted)
            try:
                client = await RelayClient.connect_url(
                    slot.url, self.private_key, on_frames=self._from_relay_frames, on_flow=self._on_flow,
                    settings=RelayClientSettings(fwmark=self.fwmark, proxy=self.proxy, ca_file=self.ca_file))
            except (OSError, RelayError, TimeoutError) as e:
                slot.last_error = str(e) or type(e).__name__
                slot.failures += 1
                slot.proxy_auth_failed = isinstance(e, RelayProxyRefused) and e.auth
                self._notify_primary()
                delay = next(delays)
                # Raw TCP failing again while the WSS fallback carries the traffic is expected
                # (a proxy that allows only 443): said once, then only at debug level.
                level = "DEBUG" if not slot.fallback and slot.failures > 1 and self._fallback_up() else "WARNING"
                logger.log(level, "relay {} unreachable ({}); retrying in {:.0f}s", slot.url, slot.last_error, delay)
                await asyncio.sleep(delay)
                continue
            slot.client, slot.connected_since, slot.last_error = client, time.monotonic(), ""
            slot.failures, slot.proxy_auth_failed = 0, False
            self._choose_up()
            self._notify_primary()
            delays = backoff_delays()
            logger.info("relay {} connected{}", slot.url, f" via proxy {client.proxy}" if client.proxy else "")
            try:
                if slot.fallback:
                    await self._hold_fallback(client)
                reason = await client.wait_closed()
            finally:
                slot.client = None
                self._choose_up()
                self._notify_primary()
            self.stats.relay_reconnects += 1
            slot.last_error = reason
            logger.warning("relay {} lost: {}", slot.url, reason)
            await asyncio.sleep(next(delays))

    async def _hold_fallback(self, client: RelayClient) -> None:
        """Keep a fallback connection until raw TCP has been back for ``fallback_hold`` s."""
        while not client.closed:
            if not self._primary_up():
                changed = asyncio.ensure_future(self._primary_event().wait())
                closed = asyncio.ensure_future(client.wait_closed())
                try:
                    await asyncio.wait({changed, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    closed.cancel()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.wait_closed(), self.fallback_hold)
            if self._primary_up() and not client.closed:
                logger.info("relay over raw TCP is back: closing the fallback {}", client.transport)
                await client.close()
                return

    def connected_relays(self) -> list[tuple[str, int]]:
        return [a for a, s in sorted(self._all_slots()) if s.client is not None and not s.client.closed]

    def _all_slots(self) -> list[tuple[tuple[str, int], _RelaySlot]]:
        return [*self._slots.items(), *((s.address, s) for s in self._fallbacks.values())]

    def _client(self) -> RelayClient | None:
        for slots in (self._slots, {s.address: s for s in self._fallbacks.values()}):
            for addr in sorted(slots):
                client = slots[addr].client
                if client is not None and not client.closed:
                    return client
        return None

    async def nat_probe(self, ip: str, port: int, timeout: float = 3.0) -> bool | None:
        """Ask a connected relay to send its two UDP probes to ``ip:port`` (see
        :meth:`RelayClient.nat_probe`); None when no relay is connected."""
        client = self._client()
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
        slots = [s for _, s in self._all_slots()]
        if not slots or any(s.client is not None and not s.client.closed for s in slots):
            return None
        tried = [s for s in slots if s.failures > 0]
        if len(tried) < len(slots):  # a fallback not tried yet may still work
            return None
        message = "; ".join(f"{s.url}: {s.last_error}" for s in tried)
        if any(s.proxy_auth_failed for s in tried):
            return "ProxyAuthenticationFailed", message
        return "Unreachable", message

    def _choose_up(self) -> None:
        """Re-pick the connection to send through (on every connect, loss and relay-set change)."""
        self._up = self._client()
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

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.opt(exception=t.exception()).error("task {} died", name)

        task.add_done_callback(done)
        return task

    async def close(self) -> None:
        for proxy in self._proxies.values():
            proxy.close()
        self._proxies.clear()
        for _, slot in self._all_slots():
            if slot.task:
                slot.task.cancel()
            if slot.client:
                with contextlib.suppress(Exception):
                    await slot.client.close()
        self._slots.clear()
        self._fallbacks.clear()
        self._up = None
        for task in list(self._tasks):
            task.cancel()
