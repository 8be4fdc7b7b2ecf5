"""The relay protocol over WebSocket (over TLS): a byte-stream bridge, both sides.

The relay's framed protocol is a byte stream; over WebSocket it travels as the payload of binary
messages, split anywhere (a message may hold part of a frame or many frames).  So the relay
server's :class:`~wirekube.relay.server.RelayConnection` and the client's connection protocol run
*unchanged* on top of a WebSocket: :class:`WsBridge` is an ``asyncio.Protocol`` on the TLS
transport that runs the `websockets` library's sans-I/O state machine (HTTP upgrade, framing,
masking, close handshake, size limits: no HTTP parsing of our own) and presents the inner
protocol with a transport (:class:`WsStreamTransport`) whose writes become binary messages and
whose flow control (write buffer size, pause/resume reading and writing) is the TLS transport's.
Proof of key ownership happens inside the stream exactly as over raw TCP.

Hostile input is refused by the library and closed here with one log line: a request that is not
a WebSocket upgrade (HTTP 4xx, then close), a text message (close 1003), a message larger than
``max_message`` (close 1009), a broken frame (close 1002), no upgrade within the handshake time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from loguru import logger
from websockets.client import ClientProtocol
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

MAX_MESSAGE = 1 << 20
"""Largest WebSocket message accepted (a relay frame is at most 64 KiB; writers send batches of
at most :data:`WRITE_CHUNK`)."""
WRITE_CHUNK = 256 * 1024
"""Writes larger than this are sent as several messages (the stream may be split anywhere)."""
READ_CHUNK = 256 * 1024
"""Largest read from TLS at a time (TLS decrypts straight into the bridge's buffer)."""
MIN_READ = 16 * 1024
"""Smallest receive buffer (an idle connection's)."""
OUTER_HIGH_WATER = 128 * 1024
"""Bytes the TLS transport may hold before the bridge keeps further writes in its own queue
(where they are counted as the stream's write buffer, and joined into fewer messages)."""

_log = logger.bind(component="relay-wss")

InnerProtocol = asyncio.BufferedProtocol | asyncio.Protocol
Payload = bytes | bytearray | memoryview
ViolationHook = Callable[[str], None]
"""``on_violation(reason)``: what a peer did wrong (for counters); the bridge logs it itself."""


class WsStreamTransport(asyncio.Transport):
    """What the inner protocol sees as its transport: a byte stream over one WebSocket."""

    def __init__(self, bridge: WsBridge) -> None:
        super().__init__()
        self._bridge = bridge
        self._closing = False

    # -- writing ------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._bridge._send_stream(data)

    def writelines(self, list_of_data: Any) -> None:
        if self._closing:
            return
        parts = list(list_of_data)
        if parts:
            self._bridge._send_stream(b"".join(parts))

    def can_write_eof(self) -> bool:
        return False  # a WebSocket ends with its close handshake

    def write_eof(self) -> None:
        raise NotImplementedError("a WebSocket stream cannot be half-closed")

    def get_write_buffer_size(self) -> int:
        """Stream bytes waiting in user space (not yet handed to TLS): what a writer's byte
        budget counts.  The TLS transport below holds at most :data:`OUTER_HIGH_WATER` more."""
        return self._bridge.queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._bridge.low_water, self._bridge.high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high = 64 * 1024 if high is None else high
        low = high // 4 if low is None else low
        self._bridge.high_water, self._bridge.low_water = high, min(low, high)
        self._bridge._inner_flow()

    # -- reading ------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        outer = self._bridge.transport
        if outer is not None and not outer.is_closing():
            outer.pause_reading()

    def resume_reading(self) -> None:
        outer = self._bridge.transport
        if outer is not None and not outer.is_closing():
            outer.resume_reading()

    def is_reading(self) -> bool:
        outer = self._bridge.transport
        return bool(outer is not None and outer.is_reading())

    # -- closing ------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._bridge.closing

    def close(self) -> None:
        """Start the WebSocket close handshake (what was written before still goes first)."""
        if not self._closing:
            self._closing = True
            self._bridge._close(CloseCode.NORMAL_CLOSURE, "")

    def abort(self) -> None:
        self._closing = True
        self._bridge._abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        outer = self._bridge.transport
        if name == "websocket_path":
            return self._bridge.path
        return outer.get_extra_info(name, default) if outer is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._bridge.inner = cast(InnerProtocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._bridge.inner is not None
        return self._bridge.inner


class WsBridge(asyncio.BufferedProtocol):
    """One WebSocket connection carrying a byte stream for ``inner``.

    Server side: build with :meth:`server`; the inner protocol is made (by ``factory``) and
    connected only once the upgrade succeeded.  Client side: build with :meth:`client` and await
    :attr:`opened` (the upgrade's result) before writing."""

    def __init__(self, ws: ServerProtocol | ClientProtocol, factory: Callable[[], InnerProtocol], *,
                 path: str | None = None, handshake_timeout: float = 10.0, close_timeout: float = 2.0,
                 on_violation: ViolationHook | None = None) -> None:
        self.ws = ws
        self._factory = factory
        self.inner: InnerProtocol | None = None
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self._lost = False
        self._stream = WsStreamTransport(self)
        self._close_timeout = close_timeout
        self._on_violation = on_violation
        self._rbuf = memoryview(bytearray(0))
        self._out: deque[bytes] = deque()
        self.queued = 0
        """Stream bytes in ``_out``."""
        self.high_water = 64 * 1024
        self.low_water = 16 * 1024
        self._outer_paused = False
        self._inner_paused = False
        self._reported = False
        self.peer = "?"
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.opened: asyncio.Future[None] = loop.create_future()
        self._upgrade = _Upgrade(self, handshake_timeout)

    @classmethod
    def server(cls, factory: Callable[[], InnerProtocol], *, path: str | None = None, max_message: int = MAX_MESSAGE,
               handshake_timeout: float = 10.0, close_timeout: float = 2.0,
               on_violation: ViolationHook | None = None) -> WsBridge:
        ws = ServerProtocol(max_size=max_message, logger=_quiet)
        return cls(ws, factory, path=path, handshake_timeout=handshake_timeout, close_timeout=close_timeout,
                   on_violation=on_violation)

    @classmethod
    def client(cls, url: str, inner: InnerProtocol, *, max_message: int = MAX_MESSAGE,
               handshake_timeout: float = 10.0, close_timeout: float = 2.0) -> WsBridge:
        ws = ClientProtocol(parse_uri(url), max_size=max_message, logger=_quiet)
        return cls(ws, lambda: inner, path=parse_uri(url).resource_name, handshake_timeout=handshake_timeout,
                   close_timeout=close_timeout)

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=OUTER_HIGH_WATER)
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self._upgrade.start()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where TLS decrypts to, with no ``bytes`` made per read (the copying read path of
        uvloop and asyncio allocates :data:`READ_CHUNK` bytes for every TLS record, which cost
        more than decrypting it).  One buffer per connection, reused: the ``websockets`` reader
        copies what it is given before :meth:`buffer_updated` returns.  It grows to what TLS has
        pending (``sizehint``), up to :data:`READ_CHUNK`, and halves while reads use a sliver."""
        want = min(max(sizehint, MIN_READ), READ_CHUNK)
        if len(self._rbuf) < want:
            self._rbuf = memoryview(bytearray(want))
        return self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        size = len(self._rbuf)
        self.data_received(self._rbuf[:nbytes])
        if nbytes * 16 < size and size > MIN_READ and len(self._rbuf) == size:
            self._rbuf = memoryview(bytearray(max(size // 2, MIN_READ)))

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        ws = self.ws
        try:
            ws.receive_data(cast(bytes, data))  # StreamReader.feed_data copies any buffer
        except EOFError:  # data after the peer's EOF: nothing to do
            return
        payloads: list[Payload] = []  # binary payloads of this read, fed to the inner protocol in one go
        for event in ws.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                    payloads.append(event.data)
                    continue
                if payloads:
                    self._feed(payloads)
                    payloads = []
                    if self._lost:
                        return
                self._frame(event)
            elif isinstance(event, Request):
                self._upgrade.request_received(event)
            elif isinstance(event, Response):
                self._upgrade.response_received(event)
            if self._lost:
                return
        if payloads:
            self._feed(payloads)
            if self._lost:
                return
        if ws.parser_exc is not None and ws.state is not State.OPEN:
            self._violation(_violation_reason(ws), str(ws.parser_exc))
            ws.parser_exc = None
        if ws.state is State.CONNECTING and ws.handshake_exc is not None and isinstance(ws, ServerProtocol):
            self._violation("bad_upgrade", f"not a WebSocket upgrade ({ws.handshake_exc})")
            ws.handshake_exc = None
        self._flush()

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        self._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.closing = True
        self._out.clear()
        self.queued = 0
        self._upgrade.cancel_timer()
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection closed before the WebSocket opened{_because(exc)}"))
            self.opened.exception()
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._outer_paused = True

    def resume_writing(self) -> None:
        self._outer_paused = False
        self._drain_out()

    # -- the upgrade (see _Upgrade) ----------------------------------------------------------

    def _open(self) -> None:
        self._upgrade.cancel_timer()
        inner = self._factory()
        self.inner = inner
        inner.connection_made(self._stream)
        if not self.opened.done():
            self.opened.set_result(None)

    # -- frames -------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        """A frame other than binary data (those go to :meth:`_feed`)."""
        if frame.opcode is Opcode.TEXT:
            self._violation("text_message", "text message (only binary messages carry the relay protocol)")
            self.ws.fail(CloseCode.UNSUPPORTED_DATA, "binary messages only")
            self._closing_started()
        elif frame.opcode is Opcode.CLOSE:
            self._closing_started()

    def _feed(self, payloads: list[Payload]) -> None:
        """Hand the stream bytes of one read's binary messages to the inner protocol: copied
        back to back into its buffer, so it parses (and forwards) them in one pass, as it would
        one read of a raw TCP socket, however many messages they came in."""
        inner = self.inner
        if inner is None or self.closing:
            return
        if not isinstance(inner, asyncio.BufferedProtocol):
            inner.data_received(b"".join(payloads))
            return
        remaining = sum(map(len, payloads))
        buf = memoryview(inner.get_buffer(remaining))
        filled = 0
        for data in payloads:
            view = memoryview(data)
            while view:
                n = min(len(buf) - filled, len(view))
                buf[filled:filled + n] = view[:n]
                filled += n
                remaining -= n
                view = view[n:]
                if filled == len(buf):  # the inner buffer is full: let it take this much first
                    buf.release()
                    inner.buffer_updated(filled)
                    if self.closing or self._lost or not remaining:
                        return
                    buf = memoryview(inner.get_buffer(remaining))
                    filled = 0
        buf.release()
        if filled:
            inner.buffer_updated(filled)

    def _send_stream(self, data: bytes | bytearray | memoryview) -> None:
        if self.ws.state is not State.OPEN:
            return
        if self._out or self._outer_paused:
            self._out.append(bytes(data))  # a copy: views of a receive buffer must not wait here
            self.queued += len(data)
            self._inner_flow()
            return
        self._emit(data)

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        ws = self.ws
        if len(data) <= WRITE_CHUNK:
            ws.send_binary(data)
        else:
            view = memoryview(data)
            for start in range(0, len(view), WRITE_CHUNK):
                ws.send_binary(view[start:start + WRITE_CHUNK])
        self._flush()

    def _drain_out(self) -> None:
        """The TLS transport has room again: send what waited, joined into large messages."""
        out = self._out
        while out and not self._outer_paused and not self._lost and self.ws.state is State.OPEN:
            batch = [out.popleft()]
            size = len(batch[0])
            while out and size + len(out[0]) <= WRITE_CHUNK:
                size += len(out[0])
                batch.append(out.popleft())
            self.queued -= size
            self._emit(batch[0] if len(batch) == 1 else b"".join(batch))
        self._inner_flow()

    def _inner_flow(self) -> None:
        """Tell the inner protocol to pause or resume writing, by the stream bytes queued here."""
        inner = self.inner
        if inner is None:
            return
        if not self._inner_paused and self.queued > self.high_water:
            self._inner_paused = True
            inner.pause_writing()
        elif self._inner_paused and self.queued <= self.low_water:
            self._inner_paused = False
            inner.resume_writing()

    # -- closing ------------------------------------------------------------------------------

    def _violation(self, reason: str, detail: str) -> None:
        """Log and count what the peer did wrong (once per connection) and start closing."""
        self._closing_started()
        if self._reported:
            return
        self._reported = True
        _log.info("closing WebSocket from {}: {}", self.peer, detail)
        if self._on_violation is not None:
            self._on_violation(reason)

    def _close(self, code: int, reason: str) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
        self._closing_started()
        self._flush()

    def _closing_started(self) -> None:
        if not self.closing:
            self.closing = True
            self._loop.call_later(self._close_timeout, self._abort)

    def _abort(self) -> None:
        self.closing = True
        self._upgrade.cancel_timer()
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        for data in self.ws.data_to_send():
            if data is SEND_EOF or data == b"":
                # TLS cannot be half-closed: close once what is queued has been written
                self.closing = True
                transport.close()
                return
            transport.write(data)
        if self.ws.close_expected():
            self._closing_started()


class _Upgrade:
    """The opening handshake of one :class:`WsBridge`: the HTTP upgrade (a server answers the
    client's request; a client sends one and reads the answer) and its deadline."""

    def __init__(self, bridge: WsBridge, timeout: float) -> None:
        self._bridge = bridge
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self.request: Request | None = None
        """A client's upgrade request, as sent."""

    def start(self) -> None:
        """The connection is made: start the deadline, and as a client send the request."""
        bridge = self._bridge
        self._timer = bridge._loop.call_later(self._timeout, self._expired)
        if isinstance(bridge.ws, ClientProtocol):
            self.request = bridge.ws.connect()
            bridge.ws.send_request(self.request)
            bridge._flush()

    def request_received(self, request: Request) -> None:
        bridge = self._bridge
        ws = cast(ServerProtocol, bridge.ws)
        if bridge.path is not None and request.path.split("?", 1)[0] != bridge.path:
            response = ws.reject(404, "no relay at this path\n")
            ws.send_response(response)
            bridge._violation("bad_path", f"upgrade for path {request.path[:80]!r}")
            return
        response = ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:
            bridge._violation("bad_upgrade", f"upgrade refused with {response.status_code} ({ws.handshake_exc})")
            return
        bridge._flush()
        bridge._open()

    def response_received(self, response: Response) -> None:
        bridge = self._bridge
        if bridge.ws.handshake_exc is not None:
            message = f"WebSocket upgrade refused: HTTP {response.status_code} {response.reason_phrase}"
            if not bridge.opened.done():
                bridge.opened.set_exception(ConnectionError(message))
                bridge.opened.exception()
            bridge._abort()
            return
        bridge._open()

    def _expired(self) -> None:
        self._timer = None
        bridge = self._bridge
        if bridge.ws.state is State.CONNECTING:
            if not bridge.opened.done():
                bridge.opened.set_exception(TimeoutError("WebSocket upgrade timed out"))
                bridge.opened.exception()
            if isinstance(bridge.ws, ServerProtocol):
                bridge._violation("upgrade_timeout", "no WebSocket upgrade in time")
            bridge._abort()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _violation_reason(ws: ServerProtocol | ClientProtocol) -> str:
    code = ws.close_sent.code if ws.close_sent is not None else None
    return {
        CloseCode.MESSAGE_TOO_BIG: "oversized_message",
        CloseCode.PROTOCOL_ERROR: "bad_frame",
        CloseCode.INVALID_DATA: "bad_frame",
    }.get(cast(Any, code), "closed_abnormally")


def _because(exc: Exception | None) -> str:
    return f": {exc}" if exc else ""


class _QuietLogger:
    """websockets logs through ``logging``; the bridge logs what matters itself (loguru)."""

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass

    info = warning = error = debug

    def isEnabledFor(self, level: int) -> bool:
        return False


_quiet: Any = _QuietLogger()

__all__ = ["MAX_MESSAGE", "WRITE_CHUNK", "WsBridge", "WsStreamTransport"]
