"""Where a relay is and how to get a byte stream to it: relay URLs, HTTP CONNECT proxies.

A relay address is ``tcp://host:port`` (or a bare ``host:port``) for the raw protocol, or
``wss://host[:port]/path`` for the same protocol over WebSocket over TLS (port 443 by default).
Either can go through an HTTP CONNECT proxy (``HTTPS_PROXY``/``NO_PROXY``, or set explicitly),
with Basic credentials; the tunnel is opened with the ``h11`` HTTP/1.1 state machine, and the
credentials never appear in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11

from wirekube.errors import WireKubeError
from wirekube.relay.url import RelayURL, bracket


class ProxyError(WireKubeError):
    """The HTTP proxy refused or broke the tunnel; the message says which proxy and why."""

    def __init__(self, message: str, *, auth: bool = False) -> None:
        super().__init__(message)
        self.auth = auth
        """True when the proxy refused the credentials (or asked for some)."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP CONNECT proxy.  ``str()`` and ``repr()`` never show the credentials."""

    host: str
    port: int
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @classmethod
    def parse(cls, text: str) -> Proxy:
        """``http://[user:password@]host[:port]`` (port 3128 by default; the scheme may be left
        out).  An ``https://`` proxy (TLS to the proxy itself) is not supported."""
        raw = text.strip()
        if "://" not in raw:
            raw = "http://" + raw
        parts = urlsplit(raw)
        if parts.scheme.lower() != "http":
            raise ValueError(f"proxy scheme must be http (CONNECT over plain HTTP), got {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("proxy URL has no host")
        try:
            port = parts.port or 3128
        except ValueError:
            raise ValueError("proxy URL has a bad port") from None
        return cls(parts.hostname, port, unquote(parts.username or ""), unquote(parts.password or ""))

    def with_credentials(self, text: str) -> Proxy:
        """The same proxy with ``user:password`` (e.g. the content of a Secret's file)."""
        user, sep, password = text.strip("\r\n").partition(":")
        if not sep or not user:
            raise ValueError("proxy credentials must be user:password")
        return Proxy(self.host, self.port, user, password)

    def __str__(self) -> str:
        return f"{bracket(self.host)}:{self.port}"


@dataclass(frozen=True)
class ProxyConfig:
    """Which relay hosts go through which proxy (``NO_PROXY`` lists the exceptions)."""

    proxy: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxyConfig:
        """``HTTPS_PROXY``/``https_proxy`` and ``NO_PROXY``/``no_proxy``; ValueError naming the
        variable when the proxy URL is unusable."""
        for name in ("HTTPS_PROXY", "https_proxy"):
            value = env.get(name, "").strip()
            if value:
                try:
                    proxy = Proxy.parse(value)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                break
        else:
            return cls()
        no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
        return cls(proxy, tuple(x.strip().lower() for x in no_proxy.split(",") if x.strip()))

    def for_host(self, host: str) -> Proxy | None:
        if self.proxy is None or _bypassed(host.lower().strip("[]"), self.no_proxy):
            return None
        return self.proxy


def _bypassed(host: str, patterns: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for pattern in patterns:
        if pattern == "*":
            return True
        if ip is not None and "/" in pattern:
            try:
                if ip in ipaddress.ip_network(pattern, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = pattern.strip("[]")
        if ":" in name and not name.count(":") > 1:  # host:port entries: the port is ignored
            name = name.rsplit(":", 1)[0]
        name = name.lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


async def open_tunnel(sock: socket.socket, proxy: Proxy, host: str, port: int) -> None:
    """Ask ``proxy`` (``sock`` is connected to it) for a CONNECT tunnel to ``host:port``;
    returns once the tunnel is open, raises :class:`ProxyError` with the proxy's answer."""
    loop = asyncio.get_running_loop()
    target = f"{bracket(host)}:{port}"
    headers = [("Host", target), ("User-Agent", "wirekube-agent")]
    if proxy.username:
        token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
        headers.append(("Proxy-Authorization", f"Basic {token}"))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
    await loop.sock_sendall(sock, conn.send(h11.Request(method="CONNECT", target=target, headers=headers)))
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise ProxyError(f"proxy {proxy} broke HTTP answering CONNECT {target}: {e}") from None
        if event is h11.NEED_DATA:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise ProxyError(f"proxy {proxy} closed the connection answering CONNECT {target}")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            break
        raise ProxyError(f"proxy {proxy} answered CONNECT {target} with {type(event).__name__}")
    status = event.status_code
    reason = event.reason.decode("latin-1", "replace")
    if 200 <= status < 300:
        if conn.trailing_data[0]:
            raise ProxyError(f"proxy {proxy} sent data before the tunnel to {target} opened")
        return
    if status == 407:
        what = "refused the proxy credentials" if proxy.username else "needs credentials (none configured)"
        raise ProxyError(f"proxy {proxy} {what} for CONNECT {target}: {status} {reason}", auth=True)
    raise ProxyError(f"proxy {proxy} refused CONNECT {target}: {status} {reason}")


__all__ = ["Proxy", "ProxyConfig", "ProxyError", "RelayURL", "open_tunnel"]
