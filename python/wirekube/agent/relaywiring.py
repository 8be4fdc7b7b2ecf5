"""The traversal's wiring of the warm relay path: which relays, one proxy port per peer.

The relay datapath itself (:class:`~wirekube.traversal.relaypath.RelayPath`, or the relay-path
process of :mod:`wirekube.agent.relayproc`) runs on the owner's asyncio loop; this module tells it
what to keep.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from wirekube.agent.pathstate import raw
from wirekube.models import Mesh, RelayMode, RelayProvider

if TYPE_CHECKING:
    from wirekube.agent.traversal import Traversal


class RelayWiring:
    """Keeps the owner's relay datapath in step with the mesh: the relay addresses to hold warm
    connections to, and a relay proxy (a 127.0.0.1 port for WireGuard) for every peer. Holds no
    state of its own: the datapath, loop and peers are the owner's."""

    def __init__(self, owner: Traversal) -> None:
        self._t = owner

    def addresses(self, mesh: Mesh) -> list[tuple[str, int]]:
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
                self._t._log.warning("cannot resolve relay {}: {}", hp, e)
                continue
            out.extend(dict.fromkeys((str(i[4][0]), hp.port) for i in infos))
        return sorted(dict.fromkeys(out))

    def sync(self, mesh: Mesh) -> None:
        t = self._t
        if t._relay is None or t._loop is None:
            return
        never = mesh.spec.relay.mode is RelayMode.NEVER
        addrs = [] if never else self.addresses(mesh)
        wss = mesh.spec.relay.wss_endpoint
        fallbacks = [wss] if wss is not None and not never else []
        t._loop.call_soon_threadsafe(t._relay.set_relays, addrs, fallbacks)

    def ensure_proxy(self, name: str) -> None:
        t = self._t
        if t._relay is None or t._loop is None:
            return
        state = t._peers[name]
        try:
            state.proxy_port = int(t._call(t._relay.ensure_proxy(raw(state.key))))
        except Exception as e:  # noqa: BLE001 - keep deciding for the other peers
            t._log.warning("cannot open relay proxy for {}: {}", name, e)

    def drop_proxy(self, key: str) -> None:
        t = self._t
        if t._relay is not None and t._loop is not None:
            t._loop.call_soon_threadsafe(t._relay.remove_proxy, raw(key))

    def retain(self, keys: list[str]) -> None:
        """Proxies of peers gone meanwhile go."""
        t = self._t
        if t._relay is not None and t._loop is not None:
            t._loop.call_soon_threadsafe(t._relay.retain, [raw(k) for k in keys])

    def available(self) -> bool:
        relay = self._t._relay
        return relay is not None and bool(relay.connected_relays())

    def stats(self) -> Mapping[str, int]:
        relay = self._t._relay
        if relay is None:
            return {}
        s = relay.stats
        return {"relay_connections": len(relay.connected_relays()), "relay_reconnects": s.relay_reconnects,
                "eperm_events": s.eperm_events, "eperm_recoveries": s.eperm_recoveries}
