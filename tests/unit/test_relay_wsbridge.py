"""The WebSocket bridge's receive path (issue 19), with the ``websockets`` library's real client
state machine on the other end and an in-memory transport in place of TLS: how the stream bytes
of binary messages reach the inner protocol, however the messages and the reads are cut."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from wirekube.relay.wsbridge import WsBridge


class MemoryTransport(asyncio.Transport):
    """What the bridge writes, kept; what it asks of a transport, answered."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_reading(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Recorder(asyncio.BufferedProtocol):
    """An inner protocol with a small buffer: records each pass it is given."""

    def __init__(self, size: int, close_after: int | None = None) -> None:
        self.buf = bytearray(size)
        self.passes: list[bytes] = []
        self.close_after = close_after
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.passes.append(bytes(self.buf[:nbytes]))
        if self.close_after is not None and len(self.passes) >= self.close_after:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    @property
    def stream(self) -> bytes:
        return b"".join(self.passes)


def read(bridge: WsBridge, data: bytes, chunk: int) -> None:
    """Deliver ``data`` as TLS would, ``chunk`` bytes per read, into the bridge's own buffer."""
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        buf = bridge.get_buffer(len(piece))
        assert len(buf) >= len(piece)
        buf[:len(piece)] = piece
        bridge.buffer_updated(len(piece))


def opened(inner: Recorder) -> tuple[WsBridge, MemoryTransport, ClientProtocol]:
    bridge = WsBridge.server(lambda: inner, path="/relay")
    transport = MemoryTransport()
    bridge.connection_made(transport)
    client = ClientProtocol(parse_uri("wss://relay.test/relay"))
    client.send_request(client.connect())
    read(bridge, b"".join(client.data_to_send()), 4096)
    client.receive_data(bytes(transport.written))
    events = client.events_received()
    assert isinstance(events[0], Response) and events[0].status_code == 101
    assert client.state is State.OPEN and bridge.opened.done()
    return bridge, transport, client


def messages(client: ClientProtocol, stream: bytes, cuts: list[int]) -> bytes:
    """``stream`` cut at ``cuts`` into binary messages, on the wire (masked, as a client sends)."""
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        client.send_binary(stream[start:end])
    return b"".join(client.data_to_send())


def test_messages_of_one_read_reach_the_inner_protocol_in_buffer_sized_passes() -> None:
    async def body() -> None:
        inner = Recorder(1000)
        bridge, _, client = opened(inner)
        stream = os.urandom(5000)
        read(bridge, messages(client, stream, [1, 2, 2500, 2501, 4999]), 1 << 20)  # six messages, one read
        assert inner.stream == stream
        assert [len(p) for p in inner.passes] == [1000] * 5  # not one pass per message

    asyncio.run(body())


def test_a_stream_cut_anywhere_into_messages_and_reads_arrives_whole() -> None:
    async def body() -> None:
        inner = Recorder(333)
        bridge, _, client = opened(inner)
        stream = os.urandom(20000)
        cuts = sorted({int.from_bytes(os.urandom(2), "big") % len(stream) for _ in range(40)} - {0})
        for chunk in (1, 7, 1500, 16384):
            inner.passes.clear()
            read(bridge, messages(client, stream, cuts), chunk)
            assert inner.stream == stream, f"reads of {chunk} bytes"
        inner.passes.clear()  # an old client: one relay frame per message
        read(bridge, messages(client, stream, list(range(37, len(stream), 37))), 65536)
        assert inner.stream == stream

    asyncio.run(body())


def test_nothing_reaches_an_inner_protocol_after_it_closed() -> None:
    async def body() -> None:
        inner = Recorder(100, close_after=2)
        bridge, transport, client = opened(inner)
        read(bridge, messages(client, os.urandom(1000), [10, 500]), 1 << 20)
        assert len(inner.passes) == 2
        assert bridge.closing
        transport.written.clear()
        read(bridge, messages(client, os.urandom(100), []), 1 << 20)
        assert len(inner.passes) == 2

    asyncio.run(body())


def test_the_receive_buffer_grows_with_reads_and_shrinks_when_idle() -> None:
    async def body() -> None:
        inner = Recorder(1 << 20)
        bridge, _, client = opened(inner)
        read(bridge, messages(client, os.urandom(200_000), []), 200_100)
        assert len(bridge.get_buffer(0)) > 200_000  # one read of the whole message
        for _ in range(8):  # keepalive-sized reads
            read(bridge, messages(client, b"k", []), 16)
        assert len(bridge.get_buffer(0)) == 16 * 1024
        assert len(inner.stream) == 200_008

    asyncio.run(body())
