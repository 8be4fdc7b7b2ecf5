"""The relay protocol over WebSocket over TLS (issue 19).

The protocol probe written for raw TCP (``test_relay_handshake``: registration with proof of
ownership, hijack and replay refusal, malformed frames, timeouts, limits) runs here *unchanged*
over WSS: its ``SpecClient`` is given a stream over a WebSocket made by the ``websockets``
library's own asyncio client (not our bridge), to a relay that also listens for WSS with a
certificate from a CA made here.  Then what only WSS has: a bad upgrade, a text message, an
oversized message, a WSS client meeting a TCP client and replicas of the relay mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import tests.integration.test_relay_handshake as tcp_probe
from tests.integration import relay_support as support
from tests.integration.relay_support import (
    DATA,
    ERROR,
    LOCALHOST,
    REGISTERED,
    SpecClient,
    frame,
    raw_public,
    registered_spec_client,
    relay_settings,
    run,
    wait_until,
)
from wirekube.lab.certs import ServerCert, make_server_cert
from wirekube.relay.authz import PeerAuthorizer
from wirekube.relay.client import RelayClient, RelayClientSettings
from wirekube.relay.server import RelayServer, RelaySettings


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("wss-ca"), ["relay.test"], [LOCALHOST])


def client_context(cert: ServerCert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert.ca_file))


class WsReader:
    """``readexactly`` over the binary messages of a websockets connection."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.buffer = bytearray()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                message = await self.conn.recv()
            except ConnectionClosed:
                raise asyncio.IncompleteReadError(bytes(self.buffer), n) from None
            assert isinstance(message, bytes), "the relay sent a text message"
            self.buffer += message
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out


class WsWriter:
    """``write``/``drain``/``close`` as a StreamWriter, each write one binary message, in order."""

    # asyncio keeps only weak references to tasks: a writer the probe drops without close() (it
    # leaves refused clients unclosed) must not have its pending task garbage-collected inside a
    # later relay's loop ("Task was destroyed but it is pending", whenever the cyclic GC happens
    # to run). Held here until done; the loop's shutdown cancels what is left.
    running: ClassVar[set[asyncio.Future[None]]] = set()

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.task = self._hold(asyncio.ensure_future(self._send()))

    @classmethod
    def _hold(cls, task: asyncio.Future[None]) -> asyncio.Future[None]:
        cls.running.add(task)
        task.add_done_callback(cls.running.discard)
        return task

    async def _send(self) -> None:
        while True:
            data = await self.queue.get()
            with contextlib.suppress(ConnectionClosed):
                await self.conn.send(data)
            self.queue.task_done()

    def write(self, data: bytes) -> None:
        self.queue.put_nowait(bytes(data))

    async def drain(self) -> None:
        await self.queue.join()

    def close(self) -> None:
        self.task.cancel()
        self._hold(asyncio.ensure_future(self.conn.close()))

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()


class WssRoutes:
    """Which WSS address stands for a relay's TCP address while the probe runs over WSS."""

    def __init__(self, cert: ServerCert) -> None:
        self.cert = cert
        self.by_tcp: dict[tuple[str, int], tuple[str, int]] = {}

    async def open(self, address: tuple[str, int], sock: socket.socket | None = None) -> SpecClient:
        host, port = self.by_tcp[address]
        conn = await connect(f"wss://{host}:{port}/", ssl=client_context(self.cert), sock=sock,
                             server_hostname=host if sock is not None else None,
                             max_size=None, compression=None, open_timeout=10)
        return SpecClient(WsReader(conn), WsWriter(conn))  # type: ignore[arg-type]


def wss_settings(base: RelaySettings, cert: ServerCert) -> RelaySettings:
    return replace(base, wss_host=LOCALHOST, wss_port=0, tls_cert=str(cert.cert_file), tls_key=str(cert.key_file))


@pytest.fixture
def over_wss(cert: ServerCert, monkeypatch: pytest.MonkeyPatch) -> Iterator[WssRoutes]:
    """Make the TCP probe's relays also listen for WSS, and its clients connect over WSS."""
    routes = WssRoutes(cert)
    plain_running_relay = support.running_relay

    @contextlib.asynccontextmanager
    async def running_relay(settings: RelaySettings | None = None,
                            authorizer: PeerAuthorizer | None = None) -> AsyncIterator[RelayServer]:
        async with plain_running_relay(wss_settings(settings or relay_settings(), cert), authorizer) as relay:
            assert relay.wss_address is not None
            routes.by_tcp[relay.address] = relay.wss_address
            yield relay

    async def open_over_wss(cls: type[SpecClient], address: tuple[str, int]) -> SpecClient:
        return await routes.open(address)

    async def stalled(address: tuple[str, int]) -> tuple[SpecClient, bytes]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, routes.by_tcp[address])
        client = await routes.open(address, sock=sock)
        key = X25519PrivateKey.generate()
        assert await client.register(key) == (REGISTERED, b"")
        return client, raw_public(key)  # and it never reads again

    monkeypatch.setattr(tcp_probe, "running_relay", running_relay)
    monkeypatch.setattr(tcp_probe, "stalled_spec_client", stalled)
    monkeypatch.setattr(SpecClient, "open", classmethod(open_over_wss))
    yield routes


PROBE = sorted(name for name in dir(tcp_probe) if name.startswith("test_"))


@pytest.mark.parametrize("name", PROBE)
def test_tcp_protocol_probe_passes_over_wss(name: str, over_wss: WssRoutes) -> None:
    getattr(tcp_probe, name)()


# -- what only WSS has ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def wss_relay(cert: ServerCert, **overrides: Any) -> AsyncIterator[RelayServer]:
    async with support.running_relay(wss_settings(relay_settings(**overrides), cert)) as relay:
        yield relay


async def raw_tls(cert: ServerCert, address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address, ssl=client_context(cert), server_hostname=LOCALHOST)


def test_bad_upgrades_are_refused_with_http_and_counted(cert: ServerCert) -> None:
    async def scenario() -> None:
        async with wss_relay(cert, wss_path="/relay", handshake_timeout=1.0) as relay:
            assert relay.wss_address is not None
            # plain HTTP without an upgrade
            reader, writer = await raw_tls(cert, relay.wss_address)
            writer.write(b"GET /relay HTTP/1.1\r\nHost: relay.test\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 426 ")
            # not HTTP at all: the relay protocol spoken straight into TLS, first with a line end
            reader, writer = await raw_tls(cert, relay.wss_address)
            writer.write(frame(0x01, b"k" * 32) + b"\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            # ... and without one: nothing to parse, so the upgrade's time runs out
            reader, writer = await raw_tls(cert, relay.wss_address)
            writer.write(frame(0x01, b"k" * 32))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            # a WebSocket for another path
            with pytest.raises(InvalidStatus, match="HTTP 404") as refused:
                await connect(f"wss://{LOCALHOST}:{relay.wss_address[1]}/other", ssl=client_context(cert))
            assert refused.value.response.status_code == 404
            await wait_until(lambda: sum(relay.stats.wss_refused.values()) == 4, what="four refusals counted")
            assert relay.stats.wss_refused == {"bad_upgrade": 2, "bad_path": 1, "upgrade_timeout": 1}
            # the relay goes on serving
            good = await connect(f"wss://{LOCALHOST}:{relay.wss_address[1]}/relay", ssl=client_context(cert))
            client = SpecClient(WsReader(good), WsWriter(good))  # type: ignore[arg-type]
            assert await client.register(X25519PrivateKey.generate()) == (REGISTERED, b"")

    run(scenario())


def test_text_and_oversized_messages_close_only_that_connection(cert: ServerCert) -> None:
    async def scenario() -> None:
        async with wss_relay(cert) as relay:
            assert relay.wss_address is not None
            url = f"wss://{LOCALHOST}:{relay.wss_address[1]}/"
            bystander, bystander_key = await registered_spec_client(relay.address)
            sender, sender_key = await registered_spec_client(relay.address)
            for message, code in (("a text message", 1003), (b"\x00" * (2 << 20), 1009)):
                conn = await connect(url, ssl=client_context(cert), max_size=None)
                client = SpecClient(WsReader(conn), WsWriter(conn))  # type: ignore[arg-type]
                assert await client.register(X25519PrivateKey.generate()) == (REGISTERED, b"")
                await conn.send(message)
                await asyncio.wait_for(conn.wait_closed(), 5)
                assert conn.close_code == code
            assert relay.stats.wss_refused == {"text_message": 1, "oversized_message": 1}
            sender.send(DATA, bystander_key + b"still flowing")
            assert await bystander.read() == (DATA, sender_key + b"still flowing")

    run(scenario())


def test_frames_split_anywhere_across_messages(cert: ServerCert) -> None:
    async def scenario() -> None:
        async with wss_relay(cert) as relay:
            assert relay.wss_address is not None
            receiver, receiver_key = await registered_spec_client(relay.address)
            conn = await connect(f"wss://{LOCALHOST}:{relay.wss_address[1]}/", ssl=client_context(cert))
            sender = SpecClient(WsReader(conn), WsWriter(conn))  # type: ignore[arg-type]
            key = X25519PrivateKey.generate()
            assert await sender.register(key) == (REGISTERED, b"")
            stream = b"".join(frame(DATA, receiver_key + bytes([i]) * (i * 7 + 1)) for i in range(40))
            for cut in range(0, len(stream), 13):  # 13-byte messages: headers and bodies split
                await conn.send(stream[cut:cut + 13])
            for i in range(40):
                assert await receiver.read() == (DATA, raw_public(key) + bytes([i]) * (i * 7 + 1))

    run(scenario())


def test_wss_and_tcp_clients_meet_through_the_relay_mesh(cert: ServerCert, tmp_path: Path) -> None:
    """A WSS client is just another client: registered on one replica, reached from a TCP client on
    the other, through the mesh link; and the agent's own client over WSS."""
    from wirekube.relay.mesh import MeshSettings, RelayMesh

    async def scenario() -> None:
        secret = b"s" * 32
        async with support.running_relay(wss_settings(relay_settings(), cert)) as a, \
                support.running_relay(relay_settings()) as b:
            mesh_a = RelayMesh(a, MeshSettings(secret=secret, listen_host=LOCALHOST, listen_port=0))
            mesh_b = RelayMesh(b, MeshSettings(secret=secret, listen_host=LOCALHOST, listen_port=0))
            await mesh_a.start()
            await mesh_b.start()
            try:
                assert mesh_b.address is not None
                mesh_a.set_peers([mesh_b.address])
                await wait_until(lambda: bool(mesh_a.links) and bool(mesh_b.links), what="the mesh link")
                assert a.wss_address is not None
                got: list[tuple[bytes, bytes]] = []
                wss_client = await RelayClient.connect_url(
                    f"wss://{LOCALHOST}:{a.wss_address[1]}/", X25519PrivateKey.generate(),
                    on_data=lambda k, d: got.append((k, d)),
                    settings=RelayClientSettings(ca_file=str(cert.ca_file)))
                tcp_client, tcp_key = await registered_spec_client(b.address)
                await wait_until(lambda: wss_client.public_key in b.remote_routes, what="the key to reach b")
                tcp_client.send(DATA, wss_client.public_key + b"over the mesh")
                await wait_until(lambda: bool(got), what="data at the WSS client")
                assert got == [(tcp_key, b"over the mesh")]
                wss_client.send(tcp_key, b"and back")
                assert await tcp_client.read() == (DATA, wss_client.public_key + b"and back")
                assert wss_client.transport == "wss"
                await wss_client.close()
            finally:
                await mesh_a.close()
                await mesh_b.close()

    run(scenario())


def test_bad_frame_header_inside_wss_is_a_relay_protocol_error(cert: ServerCert) -> None:
    async def scenario() -> None:
        async with wss_relay(cert) as relay:
            assert relay.wss_address is not None
            conn = await connect(f"wss://{LOCALHOST}:{relay.wss_address[1]}/", ssl=client_context(cert))
            client = SpecClient(WsReader(conn), WsWriter(conn))  # type: ignore[arg-type]
            client.send_raw(struct.pack(">IB", 65537, DATA))
            frames = await client.read_until_closed()
            assert [f[0] for f in frames] == [ERROR]
            assert relay.stats.protocol_errors["oversized"] == 1
            assert not relay.stats.wss_refused  # the WebSocket itself was fine

    run(scenario())
