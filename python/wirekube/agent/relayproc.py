"""The relay data path in a process of its own, so relayed traffic outlives the agent (issue 16).

WireGuard (the kernel device, or wireguard-go in its own session) already outlives the agent, so
direct peers lose nothing when the agent is killed or upgraded.  Relayed peers did: their
loopback UDP proxies and the warm relay connection lived inside the agent, and every restart
dropped them for as long as the agent took to come back.  They now live in
``wirekube-relaypath`` (:mod:`wirekube.agent.relayprocd`), a small process that runs the same
:class:`~wirekube.traversal.relaypath.RelayPath` and takes its orders over a Unix socket beside
wireguard-go's (``/run/wireguard/wirekube-relaypath.ctl``):

* ``--relay-process spawn`` (the default): the agent uses the running one, found by its socket,
  or starts one in a session of its own, which a kill -9 of the agent does not reach.
  ``external``: somebody else runs it (the chart's ``relaypath`` container, which survives an
  agent container restart); the agent waits for it and never starts one.  ``inprocess``: the
  old way, in the agent (tests, and nodes that want one process).
* A restarted agent *adopts* it: ``hello`` answers with the proxies it holds (peer key ->
  loopback port), ``ensure`` returns the same port, so every relayed peer keeps its WireGuard
  endpoint and nothing is rewritten.  The relay connection never dropped, so the relay never
  saw the node leave.
* On every (re)connect the agent states everything it wants (key, WireGuard's port, relays,
  peers, each proxy's port), so a process that restarted, or one left from before a key
  rotation, is brought in line; proxies are re-opened on their old ports.  Proxies of peers
  that went away while the agent was down are closed after its first pass with a view of the
  mesh (never on a timer: an agent back during an API-server outage keeps them all).
* ``wirekubectl cleanup`` stops it (:func:`stop_process`).

Protocol: one JSON object per line, a request then its answer (``{"error": "..."}`` on failure).
Only a process with the same uid may connect, checked on both ends with SO_PEERCRED; the socket
is 0600.  The node's private key crosses the socket (the process must prove it to the relay)
and is never logged by either side.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from loguru import logger

from wirekube.errors import DataplaneError
from wirekube.relay.dial import Proxy, ProxyConfig, RelayURL

PROTOCOL = 1
SOCKET_NAME = "wirekube-relaypath.ctl"
"""In the dataplane's runtime directory (/run/wireguard, a tmpfs: a Unix socket on a network or
9p filesystem cannot be connected to). Not ``*.sock``: ``wg`` lists those as interfaces."""
MAX_LINE = 1 << 20
"""Longest request or answer line (a node with thousands of relayed peers fits easily)."""
IO_TIMEOUT = 5.0
START_TIMEOUT = 20.0
"""How long a started process may take to answer (Python starts slowly on a loaded node)."""
POLL_SECONDS = 0.25


class RelayProcessMode(enum.Enum):
    SPAWN = "spawn"
    EXTERNAL = "external"
    INPROCESS = "inprocess"


class RelayStats(Protocol):
    relay_reconnects: int
    eperm_events: int
    eperm_recoveries: int


class RelayDatapath(Protocol):
    """What the traversal uses of a relay data path (a :class:`RelayPath` or a :class:`RemoteRelayPath`)."""

    def set_relays(self, addresses: Iterable[tuple[str, int] | RelayURL],
                   fallbacks: Iterable[RelayURL] = ()) -> None: ...
    async def ensure_proxy(self, peer_key: bytes, port: int = 0) -> int: ...
    def remove_proxy(self, peer_key: bytes) -> None: ...
    def retain(self, peer_keys: Iterable[bytes]) -> object: ...
    def connected_relays(self) -> list[tuple[str, int]]: ...
    def transport(self) -> str: ...
    def problem(self) -> tuple[str, str] | None: ...
    def eperm_active(self) -> list[int]: ...
    async def nat_probe(self, ip: str, port: int, timeout: float = 3.0) -> bool | None: ...
    async def close(self) -> None: ...
    @property
    def stats(self) -> RelayStats: ...


class RelayProcessError(DataplaneError):
    """The relay-path process could not be reached or refused a request."""


# ---------------------------------------------------------------------------------- wire format

@dataclass(frozen=True)
class PathConfig:
    """Everything a RelayPath is built from; equal configs mean "keep the running one"."""

    private_key: bytes = field(repr=False)
    wireguard_port: int
    fwmark: int | None = None
    proxy: ProxyConfig = ProxyConfig()
    ca_file: str | None = None

    @classmethod
    def of(cls, key: X25519PrivateKey, wireguard_port: int, *, fwmark: int | None = None,
           proxy: ProxyConfig = ProxyConfig(), ca_file: str | None = None) -> PathConfig:
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(raw, wireguard_port, fwmark, proxy, ca_file)

    def key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.private_key)

    def to_wire(self) -> dict[str, Any]:
        p = self.proxy.proxy
        return {
            "private_key": base64.b64encode(self.private_key).decode(),
            "wireguard_port": self.wireguard_port,
            "fwmark": self.fwmark,
            "proxy": None if p is None else {"host": p.host, "port": p.port, "username": p.username,
                                             "password": p.password},
            "no_proxy": list(self.proxy.no_proxy),
            "ca_file": self.ca_file,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> PathConfig:
        """ValueError naming the field when ``d`` is not a config."""
        try:
            raw = base64.b64decode(str(d["private_key"]), validate=True)
            port = int(d["wireguard_port"])
            fwmark = None if d.get("fwmark") is None else int(d["fwmark"])
            p = d.get("proxy")
            proxy = None if p is None else Proxy(str(p["host"]), int(p["port"]), str(p.get("username", "")),
                                                 str(p.get("password", "")))
            no_proxy = tuple(str(x) for x in d.get("no_proxy") or ())
            ca = d.get("ca_file")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad relay-path config: {type(e).__name__} {e}") from None
        if len(raw) != 32:
            raise ValueError("bad relay-path config: private_key must be 32 bytes")
        if not 1 <= port <= 65535:
            raise ValueError(f"bad relay-path config: wireguard_port {port}")
        return cls(raw, port, fwmark, ProxyConfig(proxy, no_proxy), None if ca is None else str(ca))


def relay_text(address: tuple[str, int] | RelayURL) -> str:
    return str(address if isinstance(address, RelayURL) else RelayURL("tcp", address[0], address[1]))


def key_text(key: bytes) -> str:
    return base64.b64encode(key).decode()


def key_bytes(text: object) -> bytes:
    try:
        raw = base64.b64decode(str(text), validate=True)
    except ValueError:
        raise ValueError("a key must be base64") from None
    if len(raw) != 32:
        raise ValueError("a key is 32 bytes")
    return raw


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return pid, uid


def socket_path(runtime_dir: Path) -> Path:
    return runtime_dir / SOCKET_NAME


# ---------------------------------------------------------------------------------- client

@dataclass
class RemoteStats:
    relay_reconnects: int = 0
    eperm_events: int = 0
    eperm_recoveries: int = 0


@dataclass(frozen=True)
class _Snapshot:
    connected: tuple[tuple[str, int], ...] = ()
    transport: str = ""
    problem: tuple[str, str] | None = None
    eperm: tuple[int, ...] = ()
    stats: RemoteStats = field(default_factory=RemoteStats)


class RemoteRelayPath:
    """A :class:`RelayDatapath` served by the relay-path process.  Lives on the traversal's event
    loop like a RelayPath; the read-only queries (``connected_relays``, ``transport``,
    ``problem``, ``eperm_active``, ``stats``) answer from a snapshot refreshed every
    ``POLL_SECONDS``, from any thread."""

    eperm_retry = 3.0
    eperm_persistent_after = 10.0

    def __init__(self, path: Path, config: PathConfig, *, spawn: Callable[[], None] | None,
                 start_timeout: float = START_TIMEOUT, io_timeout: float = IO_TIMEOUT) -> None:
        self.path = path
        self.config = config
        self._spawn = spawn
        self.start_timeout = start_timeout
        self.io_timeout = io_timeout
        self._relays: list[str] = []
        self._fallbacks: list[str] = []
        self._wanted: dict[bytes, int] = {}  # peer key -> its proxy's port (0 until known)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock: asyncio.Lock | None = None
        self._snap = _Snapshot()
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retained = False
        self._closed = False
        self._introduced = False
        self._last_error = ""
        self.pid: int | None = None
        """The process serving us (once connected)."""
        self.adopted: dict[bytes, int] = {}
        """The proxies the process held when we first connected (a restarted agent's inheritance)."""

    # ---- the RelayDatapath interface --------------------------------------------------------

    def set_relays(self, addresses: Iterable[tuple[str, int] | RelayURL], fallbacks: Iterable[RelayURL] = ()) -> None:
        self._relays = [relay_text(a) for a in addresses]
        self._fallbacks = [str(u) for u in fallbacks]
        self._start()
        self._fire({"op": "relays", "relays": self._relays, "fallbacks": self._fallbacks})

    async def ensure_proxy(self, peer_key: bytes, port: int = 0) -> int:
        self._start()
        self._wanted.setdefault(peer_key, port or self.adopted.get(peer_key, 0))
        answer = await self._request({"op": "ensure", "key": key_text(peer_key), "port": self._wanted[peer_key]})
        got = int(answer["port"])
        if peer_key in self._wanted:
            self._wanted[peer_key] = got
        return got

    def remove_proxy(self, peer_key: bytes) -> None:
        if self._wanted.pop(peer_key, None) is not None:
            self._fire({"op": "remove", "key": key_text(peer_key)})

    def proxy_ports(self) -> dict[bytes, int]:
        return {k: p for k, p in self._wanted.items() if p}

    def retain(self, peer_keys: Iterable[bytes]) -> None:
        """The traversal's full set of peers (after a pass with a view of the mesh): once per
        connection, the process closes the proxies of peers that went away while no agent was
        connected.  Never on a timer: an agent that comes back while the API server is down has
        no view yet, and must not close what still carries traffic."""
        keys = [key_text(k) for k in peer_keys]
        if self._conn is not None and not self._retained:
            self._retained = True
            self._fire({"op": "retain", "keys": keys})

    def connected_relays(self) -> list[tuple[str, int]]:
        return list(self._snap.connected)

    def transport(self) -> str:
        return self._snap.transport

    def problem(self) -> tuple[str, str] | None:
        return self._snap.problem

    def eperm_active(self) -> list[int]:
        return list(self._snap.eperm)

    @property
    def stats(self) -> RemoteStats:
        return self._snap.stats

    async def nat_probe(self, ip: str, port: int, timeout: float = 3.0) -> bool | None:
        answer = await self._request({"op": "nat_probe", "ip": ip, "port": port, "timeout": timeout},
                                     timeout=timeout + self.io_timeout)
        sent = answer.get("sent")
        return None if sent is None else bool(sent)

    async def close(self) -> None:
        """Disconnect; the process keeps carrying relayed traffic (that is its point)."""
        self._closed = True
        for task in [self._poller, *self._tasks]:
            if task is not None:
                task.cancel()
        self._drop_connection()

    # ---- connection ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._poller is None and not self._closed:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="relaypath-poll")

    def _fire(self, request: dict[str, Any]) -> None:
        """Send without waiting (the state is re-sent on every connect anyway)."""
        async def send() -> None:
            with contextlib.suppress(RelayProcessError):
                await self._request(request)

        task = asyncio.get_running_loop().create_task(send(), name=f"relaypath-{request['op']}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        while not self._closed:
            try:
                answer = await self._request({"op": "state"})
                try:
                    self._snap = _snapshot(answer)
                except (KeyError, TypeError, ValueError) as e:
                    raise RelayProcessError(f"state answer of the wrong shape: {type(e).__name__} {e}") from None
            except RelayProcessError as e:
                self._snap = _Snapshot(stats=self._snap.stats)
                if str(e) != self._last_error:
                    logger.warning("relay path process: {}", e)
                    self._last_error = str(e)
            await asyncio.sleep(POLL_SECONDS)

    async def _request(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                conn = await self._connection()  # (re)connecting restates everything: that can fail too
                return await self._roundtrip(conn, request, timeout or self.io_timeout)
            except RelayProcessError:
                raise
            except (OSError, EOFError, TimeoutError, ValueError, KeyError, TypeError) as e:
                # KeyError/TypeError: an answer of the wrong shape (a process of another version)
                self._drop_connection()
                raise RelayProcessError(f"{self.path}: {type(e).__name__} {e}".rstrip()) from None

    async def _roundtrip(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: dict[str, Any],
                         timeout: float) -> dict[str, Any]:
        reader, writer = conn
        writer.write(json.dumps(request).encode() + b"\n")
        async with asyncio.timeout(timeout):  # not wait_for: in 3.11 it can swallow a cancellation
            await writer.drain()
            line = await reader.readline()
        if not line:
            raise EOFError("the relay path process closed the connection")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError("answer is not an object")
        if "error" in answer:
            raise RelayProcessError(f"{request.get('op')}: {answer['error']}")
        return answer

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is not None:
            return self._conn
        conn = await self._open()
        try:
            await self._introduce(conn)
        except BaseException:
            conn[1].close()
            raise
        self._conn = conn
        self._retained = False
        return conn

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await self._dial()
        except OSError as e:
            if self._spawn is None:
                raise RelayProcessError(
                    f"{self.path}: {e.strerror or e} (is the relaypath container running?)") from None
        self._spawn()
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                return await self._dial()
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RelayProcessError(f"started, but {self.path} did not answer within "
                                            f"{self.start_timeout:.0f}s: {e.strerror or e}") from None
                await asyncio.sleep(0.05)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(self.io_timeout):
            reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
        sock = writer.get_extra_info("socket")
        pid, uid = peer_uid(sock) if sock is not None else (0, -1)
        if uid != os.geteuid():
            writer.close()
            raise RelayProcessError(f"{self.path} is served by uid {uid}, not ours ({os.geteuid()}): refused")
        self.pid = pid
        return reader, writer

    async def _introduce(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        """Tell a (possibly new, possibly old) process everything we want."""
        hello = await self._roundtrip(conn, {"op": "hello", "protocol": PROTOCOL}, self.io_timeout)
        held = {key_bytes(k): int(v) for k, v in dict(hello.get("proxies") or {}).items()}
        if not self._introduced and held:
            self.adopted = held
            logger.info("relay path process pid={} adopted with {} relayed peer(s)", self.pid, len(held))
        else:
            logger.info("relay path process pid={} connected", self.pid)
        self._last_error, self._introduced = "", True
        await self._roundtrip(conn, {"op": "configure", "config": self.config.to_wire()}, self.io_timeout)
        await self._roundtrip(conn, {"op": "relays", "relays": self._relays, "fallbacks": self._fallbacks},
                              self.io_timeout)
        for key, port in list(self._wanted.items()):
            answer = await self._roundtrip(conn, {"op": "ensure", "key": key_text(key),
                                                  "port": port or held.get(key, 0)},
                                           self.io_timeout)
            if key in self._wanted:
                self._wanted[key] = int(answer["port"])

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


def _snapshot(answer: Mapping[str, Any]) -> _Snapshot:
    problem = answer.get("problem")
    stats = answer.get("stats") or {}
    return _Snapshot(
        connected=tuple((str(h), int(p)) for h, p in answer.get("connected") or ()),
        transport=str(answer.get("transport") or ""),
        problem=None if not problem else (str(problem[0]), str(problem[1])),
        eperm=tuple(int(p) for p in answer.get("eperm") or ()),
        stats=RemoteStats(int(stats.get("relay_reconnects", 0)), int(stats.get("eperm_events", 0)),
                          int(stats.get("eperm_recoveries", 0))),
    )


# ---------------------------------------------------------------------------------- process

def spawner(path: Path, log_file: Path | None, log_level: str = "INFO") -> Callable[[], None]:
    """Start ``wirekube-relaypath`` for ``path`` in a session of its own (never a child the
    agent's death takes along): stdin closed, output to ``log_file`` (never a pipe)."""

    def spawn() -> None:
        argv = [sys.executable, "-m", "wirekube.agent.relayprocd", "--socket", str(path), "--log-level", log_level]
        if log_file is not None:
            argv += ["--log-file", str(log_file)]
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except OSError as e:
            raise RelayProcessError(f"cannot start the relay path process: {e}") from e
        logger.info("started the relay path process pid={}", child.pid)
        # Reaped if it ends while we run (no zombie); our own death does not reach it.
        threading.Thread(target=child.wait, name="relaypath-reaper", daemon=True).start()

    return spawn


def process_pid(path: Path) -> int | None:
    """The PID serving ``path``, or None when nothing answers there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(str(path))
            return peer_uid(s)[0]
    except OSError:
        return None


def stop_process(path: Path, timeout: float = 5.0) -> bool:
    """Ask the process serving ``path`` to stop (relayed peers go dark); True if one was running."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            pid = peer_uid(s)[0]
            s.sendall(b'{"op": "stop"}\n')
            s.recv(4096)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    return True
