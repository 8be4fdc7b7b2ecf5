"""``wirekube-relaypath``: the relay data path as a long-lived process (see :mod:`wirekube.agent.relayproc`).

Usage: ``wirekube-relaypath --socket /run/wireguard/wirekube-relaypath.ctl [--log-file PATH]``.  The
agent starts it by itself (``--relay-process spawn``); the chart runs it as a container of its
own (``--relay-process external``).  It carries relayed WireGuard packets between loopback UDP
proxies and the relay until it is told to stop (``wirekubectl cleanup``) or gets SIGTERM; the
agent's death does not stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from loguru import logger

from wirekube import logsetup
from wirekube.agent.relayproc import MAX_LINE, PROTOCOL, PathConfig, key_bytes, key_text, peer_uid, process_pid
from wirekube.entrypoint import console_script
from wirekube.errors import InvalidConfig
from wirekube.relay.dial import RelayURL
from wirekube.traversal.relaypath import RelayPath

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class RelayPathProcess:
    """Serves the agent's requests on a Unix socket with one :class:`RelayPath`."""

    def __init__(self, path: Path) -> None:
        self.socket_path = path
        self.path: RelayPath | None = None
        self.config: PathConfig | None = None
        self._stopped = asyncio.Event()
        self._handlers: dict[str, Handler] = {
            "hello": self._hello, "configure": self._configure, "relays": self._relays,
            "ensure": self._ensure, "remove": self._remove, "retain": self._retain, "state": self._state,
            "nat_probe": self._nat_probe, "stop": self._stop,
        }

    async def run(self) -> None:
        running = process_pid(self.socket_path)
        if running is not None:
            raise InvalidConfig(f"{self.socket_path} is already served by pid {running}")
        if self.socket_path.is_socket():
            self.socket_path.unlink()  # left by a process that died
        old_umask = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path), limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, stat.S_IRUSR | stat.S_IWUSR)
        inode = self.socket_path.stat().st_ino
        logger.info("relay path process pid={} serving {}", os.getpid(), self.socket_path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        try:
            await self._stopped.wait()
        finally:
            server.close()
            if self.socket_path.exists() and self.socket_path.stat().st_ino == inode:
                self.socket_path.unlink()
            if self.path is not None:
                await self.path.close()
            logger.info("relay path process stopped")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket | None = writer.get_extra_info("socket")
        pid, uid = peer_uid(sock) if sock is not None else (0, -1)
        if uid != os.geteuid():
            logger.warning("refused a connection from pid {} uid {} (not uid {})", pid, uid, os.geteuid())
            writer.close()
            return
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"error": "request line too long"}\n')
                    break
                if not line:
                    break
                answer = await self._answer(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"error": "request is not JSON"}
        if not isinstance(request, dict):
            return {"error": "request is not an object"}
        handler = self._handlers.get(str(request.get("op")))
        if handler is None:
            return {"error": f"unknown op {request.get('op')!r}"}
        try:
            return await handler(request)
        except (KeyError, TypeError, ValueError) as e:
            return {"error": f"bad {request.get('op')} request: {type(e).__name__} {e}"}
        except OSError as e:
            return {"error": f"{request.get('op')}: {e.strerror or e}"}

    def _path(self) -> RelayPath:
        if self.path is None:
            raise ValueError("not configured yet (send configure first)")
        return self.path

    # ---- handlers -----------------------------------------------------------------------------

    async def _hello(self, request: dict[str, Any]) -> dict[str, Any]:
        ports = self.path.proxy_ports() if self.path is not None else {}
        return {"protocol": PROTOCOL, "pid": os.getpid(), "configured": self.path is not None,
                "proxies": {key_text(k): p for k, p in ports.items()}}

    async def _configure(self, request: dict[str, Any]) -> dict[str, Any]:
        config = PathConfig.from_wire(request["config"])
        if config == self.config:
            return {"changed": False}
        ports: dict[bytes, int] = {}
        if self.path is not None:  # a new key or WireGuard port: same proxies, same ports, new path
            ports = self.path.proxy_ports()
            await self.path.close()
            logger.info("configuration changed: relay path rebuilt")
        self.config = config
        self.path = RelayPath(config.key(), config.wireguard_port, fwmark=config.fwmark, proxy=config.proxy,
                              ca_file=config.ca_file)
        for key, port in ports.items():
            await self.path.ensure_proxy(key, port)
        return {"changed": True}

    async def _relays(self, request: dict[str, Any]) -> dict[str, Any]:
        relays = [RelayURL.parse(str(x)) for x in request.get("relays") or ()]
        fallbacks = [RelayURL.parse(str(x)) for x in request.get("fallbacks") or ()]
        self._path().set_relays(relays, fallbacks)
        return {}

    async def _ensure(self, request: dict[str, Any]) -> dict[str, Any]:
        port = int(request.get("port") or 0)
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port}")
        return {"port": await self._path().ensure_proxy(key_bytes(request["key"]), port)}

    async def _remove(self, request: dict[str, Any]) -> dict[str, Any]:
        self._path().remove_proxy(key_bytes(request["key"]))
        return {}

    async def _retain(self, request: dict[str, Any]) -> dict[str, Any]:
        gone = self._path().retain(key_bytes(k) for k in request.get("keys") or ())
        if gone:
            logger.info("closed {} relay proxies of peers gone while the agent was away", len(gone))
        return {"closed": len(gone)}

    async def _state(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.path is None:
            return {"connected": [], "transport": "", "problem": None, "eperm": [], "stats": {}}
        p, s = self.path, self.path.stats
        return {"connected": p.connected_relays(), "transport": p.transport(), "problem": p.problem(),
                "eperm": p.eperm_active(), "proxies": len(p.proxy_ports()),
                "stats": {"relay_reconnects": s.relay_reconnects, "eperm_events": s.eperm_events,
                          "eperm_recoveries": s.eperm_recoveries}}

    async def _nat_probe(self, request: dict[str, Any]) -> dict[str, Any]:
        timeout = min(float(request.get("timeout", 3.0)), 10.0)
        return {"sent": await self._path().nat_probe(str(request["ip"]), int(request["port"]), timeout)}

    async def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        logger.info("asked to stop")
        asyncio.get_running_loop().call_soon(self._stopped.set)
        return {"stopping": True}


@console_script("wirekube-relaypath")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wirekube-relaypath", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket the agent talks to")
    p.add_argument("--log-file", type=Path, default=None, help="append the log here (default: stderr)")
    p.add_argument("--log-level", default=os.environ.get("WIREKUBE_LOG_LEVEL", "INFO"))
    p.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("WIREKUBE_LOG_FORMAT", "text"))
    a = p.parse_args(argv)
    if a.log_file is not None:
        sink = open(a.log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        logsetup.configure_logging(a.log_format, a.log_level, sink=sink, component="relaypath")
    else:
        logsetup.configure_logging(a.log_format, a.log_level, component="relaypath")
    uvloop.run(RelayPathProcess(a.socket).run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
