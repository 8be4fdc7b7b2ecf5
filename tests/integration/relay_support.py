"""Shared helpers for the relay's integration tests (real sockets on 127.0.0.1 only); a helper
module, not a test module, so no test runs twice by being imported.

:class:`SpecClient` is written from the protocol text in issue 3 alone: it imports nothing from
``wirekube.relay``, so it checks that the relay speaks what the text says, not what our codec
happens to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any, TypeVar, cast

import uvloop
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.fixtures.wait import wait_until as wait_until  # re-exported for the relay tests
from wirekube.relay.authz import PeerAuthorizer
from wirekube.relay.server import RelayServer, RelaySettings

T = TypeVar("T")
LOCALHOST = "127.0.0.1"

REGISTER, DATA, KEEPALIVE, NATPROBE, RELAYPROBE = 0x01, 0x02, 0x03, 0x04, 0x06
CHALLENGE, AUTH, REGISTERED, ERROR = 0x07, 0x08, 0x09, 0xFF


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test coroutine on uvloop with an overall deadline."""
    return uvloop.run(asyncio.wait_for(coro, timeout))


def relay_settings(**overrides: Any) -> RelaySettings:
    base = RelaySettings(
        listen_host=LOCALHOST, listen_port=0, stun_host=LOCALHOST, stun_port=0, close_grace=0.2
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running_relay(
    settings: RelaySettings | None = None, authorizer: PeerAuthorizer | None = None
) -> AsyncIterator[RelayServer]:
    """A relay on 127.0.0.1 in this event loop; any exception escaping a callback fails the test."""
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    relay = RelayServer(settings or relay_settings(), authorizer=authorizer)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close(timeout=2.0)
        loop.set_exception_handler(None)
    assert not escaped, f"exceptions escaped into the event loop: {escaped}"


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def frame(ftype: int, body: bytes = b"") -> bytes:
    """u32 big-endian L (= 1 + body length) + u8 type + body."""
    return struct.pack(">IB", len(body) + 1, ftype) + body


class SpecClient:
    """A relay client built from the protocol text only (no wirekube imports)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: tuple[str, int]) -> SpecClient:
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    def send(self, ftype: int, body: bytes = b"") -> None:
        self.writer.write(frame(ftype, body))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next frame, or ``None`` once the relay closed the connection."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(5), timeout)
            length, ftype = struct.unpack(">IB", header)
            body = await asyncio.wait_for(self.reader.readexactly(length - 1), timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        return ftype, body

    async def read_until_closed(self, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        frames = []
        while (f := await self.read(timeout)) is not None:
            frames.append(f)
        return frames

    async def register(self, private_key: X25519PrivateKey, claimed: bytes | None = None) -> tuple[int, bytes] | None:
        """Register ``claimed`` (default: our own key), proving with ``private_key``.

        Returns the relay's answer to Auth: (REGISTERED, b"") on success."""
        p = claimed if claimed is not None else raw_public(private_key)
        self.send(REGISTER, p)
        challenge = await self.read()
        if challenge is None or challenge[0] != CHALLENGE:
            return challenge
        self.send(AUTH, self.proof(private_key, challenge[1], p))
        return await self.read()

    @staticmethod
    def proof(private_key: X25519PrivateKey, challenge: bytes, p: bytes) -> bytes:
        e, nonce = challenge[:32], challenge[32:]
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(e))
        return hmac.new(shared, b"wirekube-relay-auth-v1" + nonce + p + e, hashlib.sha256).digest()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def registered_spec_client(address: tuple[str, int]) -> tuple[SpecClient, bytes]:
    key = X25519PrivateKey.generate()
    client = await SpecClient.open(address)
    assert await client.register(key) == (REGISTERED, b"")
    return client, raw_public(key)


class Collector(asyncio.DatagramProtocol):
    """Keeps every datagram it receives."""

    def __init__(self, into: list[tuple[bytes, tuple[str, int]]]) -> None:
        self.into = into

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.into.append((data, addr))


async def stalled_spec_client(address: tuple[str, int]) -> tuple[SpecClient, bytes]:
    """A registered client with a tiny receive buffer that then stops reading altogether."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    reader, writer = await asyncio.open_connection(sock=sock)
    client = SpecClient(reader, writer)
    key = X25519PrivateKey.generate()
    assert await client.register(key) == (REGISTERED, b"")
    cast(asyncio.ReadTransport, writer.transport).pause_reading()
    return client, raw_public(key)


def allow_loopback_targets(address: ipaddress.IPv4Address, port: int) -> str | None:
    """Test-only NAT-probe policy: 127.0.0.1 is allowed so the probe can be received here."""
    return None if address == ipaddress.IPv4Address(LOCALHOST) and port else "test_policy"


# ---- traffic ----------------------------------------------------------------------------------


def numbered(seq: int, size: int) -> bytes:
    return struct.pack(">I", seq) + bytes([seq % 251]) * (size - 4)


async def pump(sender: SpecClient, dest: bytes, count: int, sizes: list[int]) -> None:
    for seq in range(count):
        sender.send(DATA, dest + numbered(seq, sizes[seq % len(sizes)]))
        if seq % 64 == 0:
            await sender.writer.drain()
    await sender.writer.drain()


async def collect(receiver: SpecClient, source: bytes, count: int, sizes: list[int]) -> None:
    for seq in range(count):
        got = await receiver.read(timeout=10.0)
        assert got == (DATA, source + numbered(seq, sizes[seq % len(sizes)])), f"frame {seq}"


async def steady_pair(address: tuple[str, int], count: int, window: int = 32) -> int:
    """A pair exchanging ``count`` frames, ``window`` at a time (so it never outruns its own
    reader, and a drop can only be the relay's fault); returns how many arrived intact."""
    a, ka = await registered_spec_client(address)
    b, kb = await registered_spec_client(address)
    sizes = [200, 1400]
    for start in range(0, count, window):
        for seq in range(start, min(start + window, count)):
            a.send(DATA, kb + numbered(seq, sizes[seq % 2]))
        for seq in range(start, min(start + window, count)):
            assert await b.read(timeout=10.0) == (DATA, ka + numbered(seq, sizes[seq % 2])), f"frame {seq}"
    await a.close()
    await b.close()
    return count


# ---- the relay as a process, STUN from an independent client --------------------------------


class RelayCli:
    """The console entry point in a child process, on kernel-chosen loopback ports."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wirekube.relay.cli",
             "--listen", f"{LOCALHOST}:0", "--stun-listen", f"{LOCALHOST}:0",
             "--metrics-listen", f"{LOCALHOST}:0", "--log-format", "json", *extra],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read_logs, daemon=True).start()

    def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)["record"]
            except (ValueError, KeyError):
                continue
            self.lines.append(record)
            if record["message"] == "relay ready":
                self.ready.set()

    def address(self, name: str) -> tuple[str, int]:
        assert self.ready.wait(20), f"relay not ready: {self.lines}"
        record = next(r for r in self.lines if r["message"] == "relay ready")
        host, port = record["extra"][name].rsplit(":", 1)
        return host, int(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by the PID we started
            self.proc.wait(10)


async def http_get(address: tuple[str, int], path: str) -> str:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    return body


STUNCLIENT = shutil.which("turnutils_stunclient")


async def stunclient(port: int, timeout: float = 15.0) -> tuple[int, str]:
    assert STUNCLIENT, "turnutils_stunclient is missing: apt-get install -y --no-install-recommends coturn"
    proc = await asyncio.create_subprocess_exec(
        STUNCLIENT, "-p", str(port), LOCALHOST,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()  # by the PID we started
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])
