"""A relay's address: ``tcp://host:port`` (or bare ``host:port``) for the raw protocol,
``wss://host[:port]/path`` for the same protocol over WebSocket over TLS.  Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\s\[\]]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class RelayURL:
    scheme: str
    """``tcp`` or ``wss``."""
    host: str
    port: int
    path: str = "/"

    @classmethod
    def parse(cls, text: str) -> RelayURL:
        """``tcp://host:port``, ``wss://host[:port][/path]`` or ``host:port`` (tcp); ValueError
        with the reason otherwise."""
        text = text.strip()
        if "://" not in text:
            m = _HOSTPORT.match(text)
            if not m:
                raise ValueError(f"must be host:port, tcp://host:port or wss://host[:port]/path, got {text!r}")
            return cls("tcp", m["host"].strip("[]"), _port(m["port"]))
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in ("tcp", "wss"):
            raise ValueError(f"scheme must be tcp or wss, got {parts.scheme!r} in {text!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"a relay address carries no credentials: {scheme}://...")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {text!r}") from None
        host = parts.hostname or ""
        if not host:
            raise ValueError(f"no host in {text!r}")
        if scheme == "tcp":
            if port is None:
                raise ValueError(f"tcp:// needs a port, got {text!r}")
            if parts.path not in ("", "/") or parts.query:
                raise ValueError(f"tcp:// takes no path, got {text!r}")
            return cls("tcp", host, port)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls("wss", host, 443 if port is None else port, path)

    @property
    def websocket_url(self) -> str:
        return f"wss://{bracket(self.host)}:{self.port}{self.path}"

    def __str__(self) -> str:
        if self.scheme == "tcp":
            return f"tcp://{bracket(self.host)}:{self.port}"
        return self.websocket_url


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return port


def bracket(host: str) -> str:
    """``host`` as it goes before ``:port`` (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


__all__ = ["RelayURL", "bracket"]
