"""The agent's relay data path: a warm relay pool and one loopback UDP proxy per relayed peer.

    WireGuard --UDP--> 127.0.0.1:<proxy port for peer P>  (P's WireGuard endpoint while relayed)
              proxy --Data(P, datagram)--> relay (TCP) --> P's agent
    P's agent: relay --Data(us, datagram)--> its proxy for us --UDP--> its WireGuard

* **Warm**: one authenticated connection per relay address is kept open all the time
  (reconnect with backoff 1 s doubling to 30 s), so a failover only rewrites a WireGuard
  endpoint; nothing has to be dialled or proven at the moment a direct path dies.
* **Fast**: each proxy socket is *connected* to WireGuard's port (one 5-tuple, no per-packet
  address handling); datagrams from WireGuard are batched per destination and written once per
  event-loop pass (``writelines``); TCP_NODELAY is on in the relay client. These choices (and
  uvloop) are what environment-notes.md measured to matter.
* **EPERM**: Cilium's socket-LB hook can refuse ``sendto`` on loopback with EPERM; the proxy
  recreates its socket on the same port after ``eperm_retry`` seconds and counts it; an EPERM
  that persists is reported (``eperm_active``) so the agent puts it in its status.

Everything runs on one asyncio loop (uvloop in the agent); :class:`RelayPath` methods must be
called on that loop (the agent uses ``loop.call_soon_threadsafe`` from other threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.relay.client import RelayClient, RelayError, backoff_delays


@dataclass
class PathStats:
    to_relay_datagrams: int = 0
    from_relay_datagrams: int = 0
    no_relay_drops: int = 0
    unknown_peer_drops: int = 0
    relay_reconnects: int = 0
    eperm_events: int = 0
    eperm_recoveries: int = 0


class _ProxyProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: PeerProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy.path._queue_out(self.proxy.peer_key, data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EPERM:
            self.proxy.on_eperm()


@dataclass(eq=False)
class PeerProxy:
    """The loopback UDP socket standing for one remote peer."""

    path: RelayPath
    peer_key: bytes
    port: int = 0
    transport: asyncio.DatagramTransport | None = None
    eperm_since: float | None = None
    _recreating: bool = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ProxyProtocol(self),
            local_addr=("127.0.0.1", self.port),
            remote_addr=("127.0.0.1", self.path.wireguard_port),
        )
        self.transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])

    def deliver(self, datagram: bytes) -> None:
        """A datagram from the relay, to WireGuard."""
        if self.transport is None:
            return
        try:
            self.transport.sendto(datagram)
        except PermissionError:
            self.on_eperm()

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
        async def again() -> None:
            try:
                if self.transport is not None:
                    self.transport.abort()
                    self.transport = None
                await self.open()
                self.path.stats.eperm_recoveries += 1
                self.eperm_since = None
            except OSError as e:
                logger.error("relay-proxy: recreating the socket on port {} failed: {}", self.port, e)
            finally:
                self._recreating = False

        self.path._spawn(again(), f"proxy-recreate-{self.port}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


@dataclass(eq=False)
class _RelaySlot:
    address: tuple[str, int]
    client: RelayClient | None = None
    task: asyncio.Task[None] | None = None
    connected_since: float = 0.0
    last_error: str = ""


@dataclass(eq=False)
class RelayPath:
    private_key: X25519PrivateKey
    wireguard_port: int
    eperm_retry: float = 3.0
    eperm_persistent_after: float = 10.0
    stats: PathStats = field(default_factory=PathStats)
    _slots: dict[tuple[str, int], _RelaySlot] = field(default_factory=dict)
    _proxies: dict[bytes, PeerProxy] = field(default_factory=dict)
    _out: dict[bytes, list[bytes]] = field(default_factory=dict)
    _flush_scheduled: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # ---- relays --------------------------------------------------------------------------------

    def set_relays(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Keep exactly one warm connection per address (new ones dialled, gone ones closed)."""
        wanted = set(addresses)
        for addr in list(self._slots):
            if addr not in wanted:
                slot = self._slots.pop(addr)
                if slot.task:
                    slot.task.cancel()
                if slot.client:
                    self._spawn(slot.client.close(), "relay-close")
        for addr in wanted - set(self._slots):
            slot = _RelaySlot(addr)
            self._slots[addr] = slot
            slot.task = self._spawn(self._keep_connected(slot), f"relay-{addr[0]}:{addr[1]}")

    async def _keep_connected(self, slot: _RelaySlot) -> None:
        delays = backoff_delays()
        while True:
            try:
                client = await RelayClient.connect(slot.address[0], slot.address[1], self.private_key,
                                                   on_data=self._from_relay)
            except (OSError, RelayError, TimeoutError) as e:
                slot.last_error = str(e) or type(e).__name__
                delay = next(delays)
                logger.warning("relay {}:{} unreachable ({}); retrying in {:.0f}s", *slot.address, slot.last_error, delay)
                await asyncio.sleep(delay)
                continue
            slot.client, slot.connected_since, slot.last_error = client, time.monotonic(), ""
            delays = backoff_delays()
            logger.info("relay {}:{} connected", *slot.address)
            reason = await client.wait_closed()
            slot.client = None
            self.stats.relay_reconnects += 1
            slot.last_error = reason
            logger.warning("relay {}:{} lost: {}", *slot.address, reason)
            await asyncio.sleep(next(delays))

    def connected_relays(self) -> list[tuple[str, int]]:
        return [a for a, s in sorted(self._slots.items()) if s.client is not None and not s.client.closed]

    def _client(self) -> RelayClient | None:
        for addr in sorted(self._slots):
            client = self._slots[addr].client
            if client is not None and not client.closed:
                return client
        return None

    # ---- proxies -------------------------------------------------------------------------------

    async def ensure_proxy(self, peer_key: bytes) -> int:
        """The loopback port standing for ``peer_key`` (created on first use)."""
        proxy = self._proxies.get(peer_key)
        if proxy is None:
            proxy = PeerProxy(self, peer_key)
            await proxy.open()
            self._proxies[peer_key] = proxy
        return proxy.port

    def remove_proxy(self, peer_key: bytes) -> None:
        proxy = self._proxies.pop(peer_key, None)
        if proxy is not None:
            proxy.close()

    def proxy_ports(self) -> dict[bytes, int]:
        return {k: p.port for k, p in self._proxies.items()}

    def eperm_active(self) -> list[int]:
        """Proxy ports whose EPERM has lasted longer than ``eperm_persistent_after``."""
        now = time.monotonic()
        return [p.port for p in self._proxies.values()
                if p.eperm_since is not None and now - p.eperm_since > self.eperm_persistent_after]

    # ---- data ----------------------------------------------------------------------------------

    def _queue_out(self, peer_key: bytes, datagram: bytes) -> None:
        batch = self._out.get(peer_key)
        if batch is None:
            self._out[peer_key] = [datagram]
        else:
            batch.append(datagram)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, {}
        client = self._client()
        for key, datagrams in out.items():
            if client is None:
                self.stats.no_relay_drops += len(datagrams)
                continue
            try:
                client.send_many(key, datagrams)
                self.stats.to_relay_datagrams += len(datagrams)
            except (RelayError, RuntimeError):
                self.stats.no_relay_drops += len(datagrams)

    def _from_relay(self, source_key: bytes, datagram: bytes) -> None:
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
        for slot in self._slots.values():
            if slot.task:
                slot.task.cancel()
            if slot.client:
                with contextlib.suppress(Exception):
                    await slot.client.close()
        self._slots.clear()
        for task in list(self._tasks):
            task.cancel()
