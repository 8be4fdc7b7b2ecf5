"""How a :class:`~wirekube.relay.client.RelayClient` opens one connection: a TCP socket (marked
with ``fwmark`` before connecting), the HTTP CONNECT tunnel when a proxy applies, TLS and the
WebSocket upgrade for ``wss://``, then Register and the proof of key ownership."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING

from wirekube.errors import WireKubeError
from wirekube.relay.dial import Proxy, ProxyError, RelayURL, open_tunnel
from wirekube.relay.protocol import encode_register
from wirekube.relay.wsbridge import WsBridge

if TYPE_CHECKING:
    from wirekube.relay.client import RelayClientSettings, _ClientProtocol


class RelayError(WireKubeError):
    """A relay connection failed or was refused."""


class RelayProxyRefused(RelayError):
    """The HTTP CONNECT proxy refused the tunnel (``auth``: it refused the credentials)."""

    def __init__(self, message: str, *, auth: bool) -> None:
        super().__init__(message)
        self.auth = auth


class Dialer:
    """Owns the address a client dials (``url``, and ``proxy`` when one applies to its host) and
    registers a given connection protocol there; the client dials again through it after a GoAway."""

    def __init__(self, url: RelayURL, proxy: Proxy | None, settings: RelayClientSettings, public_key: bytes) -> None:
        self.url = url
        self.proxy = proxy
        self._settings = settings
        self._public_key = public_key
        self._loop = asyncio.get_running_loop()

    async def dial(self, protocol: _ClientProtocol) -> None:
        """Connect ``protocol`` to the relay and register it (or abort it and raise)."""
        bridge: WsBridge | None = None
        try:
            url = self.url
            hop = self.proxy or url
            sock = await self._connected_socket(hop.host, hop.port)
            try:
                if self.proxy is not None:
                    await open_tunnel(sock, self.proxy, url.host, url.port)
            except ProxyError as e:
                sock.close()
                raise RelayProxyRefused(str(e), auth=e.auth) from None
            except BaseException:
                sock.close()
                raise
            if url.scheme == "wss":
                bridge = WsBridge.client(url.websocket_url, protocol, handshake_timeout=self._settings.connect_timeout)
                context = ssl.create_default_context(cafile=self._settings.ca_file)
                await self._loop.create_connection(lambda: bridge, sock=sock, ssl=context, server_hostname=url.host,
                                                   ssl_handshake_timeout=self._settings.connect_timeout)
                try:
                    await bridge.opened
                except ConnectionError as e:
                    raise RelayError(f"{url}: {e}") from None
            else:
                await self._loop.create_connection(lambda: protocol, sock=sock)
            protocol.write(encode_register(self._public_key))
            await protocol.registered
        except BaseException:
            protocol.abort()
            if bridge is not None:
                bridge._abort()
            raise

    async def _connected_socket(self, host: str, port: int) -> socket.socket:
        """A connected TCP socket, marked with ``fwmark`` before connecting when one is set."""
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        error: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                if self._settings.fwmark is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._settings.fwmark)
                await self._loop.sock_connect(sock, address)
                return sock
            except OSError as e:
                sock.close()
                error = e
            except BaseException:
                sock.close()
                raise
        raise error
