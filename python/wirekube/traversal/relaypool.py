"""The relay data path's warm connections (see :mod:`wirekube.traversal.relaypath`): one
authenticated connection per relay address, kept open all the time (reconnect with backoff), and
the relay over WSS as a fallback, dialled only while raw TCP is down everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.relay.client import RelayClient, RelayClientSettings, RelayError, RelayProxyRefused, backoff_delays
from wirekube.relay.dial import RelayURL

if TYPE_CHECKING:
    from wirekube.traversal.relaypath import PathStats

FALLBACK_HOLD_SECONDS = 10.0
"""A fallback (WSS) connection is closed only after raw TCP has been up this long, so a relay
that flaps on TCP does not make every node reconnect twice."""


@dataclass(eq=False)
class _RelaySlot:
    address: tuple[str, int]
    url: RelayURL
    fallback: bool = False
    """A WSS slot dialled only while no raw-TCP slot is connected (see :meth:`RelayPool.set_relays`)."""
    client: RelayClient | None = None
    task: asyncio.Task[None] | None = None
    connected_since: float = 0.0
    last_error: str = ""
    failures: int = 0
    """Failed attempts since the last success."""
    proxy_auth_failed: bool = False
    """The last attempt failed because the HTTP proxy refused the credentials."""


class RelayPool:
    """Owns the relay connections (slots), the tasks that keep them connected, and why they fail.

    Received Data goes to ``on_frames``, write flow control to ``on_flow`` (as for
    :class:`RelayClient`); ``on_change()`` is called whenever a connection came up, went down or
    the relay set changed, so the owner re-picks the connection it sends through
    (:meth:`client`).  Runs on one asyncio loop."""

    def __init__(
        self,
        private_key: X25519PrivateKey,
        settings: RelayClientSettings,
        stats: PathStats,
        *,
        fallback_hold: float,
        on_frames: Callable[[bytes, memoryview], None],
        on_flow: Callable[[bool], None],
        on_change: Callable[[], None],
    ) -> None:
        self._private_key = private_key
        self._settings = settings
        self._stats = stats
        self._fallback_hold = fallback_hold
        self._on_frames = on_frames
        self._on_flow = on_flow
        self._on_change = on_change
        self._slots: dict[tuple[str, int], _RelaySlot] = {}
        self._fallbacks: dict[RelayURL, _RelaySlot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._primary_changed: asyncio.Event | None = None

    def set_relays(self, addresses: Iterable[tuple[str, int] | RelayURL], fallbacks: Iterable[RelayURL]) -> None:
        """See :meth:`wirekube.traversal.relaypath.RelayPath.set_relays`."""
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
        self._on_change()

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
                    slot.url, self._private_key, on_frames=self._on_frames, on_flow=self._on_flow,
                    settings=self._settings)
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
            self._on_change()
            self._notify_primary()
            delays = backoff_delays()
            logger.info("relay {} connected{}", slot.url, f" via proxy {client.proxy}" if client.proxy else "")
            try:
                if slot.fallback:
                    await self._hold_fallback(client)
                reason = await client.wait_closed()
            finally:
                slot.client = None
                self._on_change()
                self._notify_primary()
            self._stats.relay_reconnects += 1
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
                await asyncio.wait_for(client.wait_closed(), self._fallback_hold)
            if self._primary_up() and not client.closed:
                logger.info("relay over raw TCP is back: closing the fallback {}", client.transport)
                await client.close()
                return

    def connected_relays(self) -> list[tuple[str, int]]:
        return [a for a, s in sorted(self._all_slots()) if s.client is not None and not s.client.closed]

    def _all_slots(self) -> list[tuple[tuple[str, int], _RelaySlot]]:
        return [*self._slots.items(), *((s.address, s) for s in self._fallbacks.values())]

    def client(self) -> RelayClient | None:
        """The connection to send through: the first connected, by address (raw TCP first)."""
        for slots in (self._slots, {s.address: s for s in self._fallbacks.values()}):
            for addr in sorted(slots):
                client = slots[addr].client
                if client is not None and not client.closed:
                    return client
        return None

    def problem(self) -> tuple[str, str] | None:
        """See :meth:`wirekube.traversal.relaypath.RelayPath.problem`."""
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
        for _, slot in self._all_slots():
            if slot.task:
                slot.task.cancel()
            if slot.client:
                with contextlib.suppress(Exception):
                    await slot.client.close()
        self._slots.clear()
        self._fallbacks.clear()
        for task in list(self._tasks):
            task.cancel()
