"""The relay's wire format: a sans-I/O codec.

Frame = u32 big-endian ``L`` (= 1 + body length, 1..65536) + u8 type + body.

======  ===========  ==========================================================================
type    name         body
======  ===========  ==========================================================================
0x01    Register     client -> relay: the client's 32-byte X25519 (WireGuard) public key
0x07    Challenge    relay -> client: ephemeral X25519 public key (32) + nonce (16)
0x08    Auth         client -> relay: HMAC-SHA256 proof (32), see :mod:`wirekube.relay.auth`
0x09    Registered   relay -> client: empty; the key is now bound to this connection
0x02    Data         to relay: destination key (32) + datagram; from relay: source key + datagram
0x03    Keepalive    empty; the relay answers each one with a Keepalive
0x04    NATProbe     IPv4 (4) + port (2); the relay echoes the frame once both UDP probes are sent
0x06    RelayProbe   8-byte token, echoed
0xFF    Error        UTF-8 reason; the sender closes the connection after it
======  ===========  ==========================================================================

The decoder follows h11's shape: a ``bytearray`` receive buffer with a read offset, an explicit
:data:`NEED_DATA` result, a hard cap on the size of an incomplete frame (a header announcing more
than :data:`MAX_FRAME_LENGTH` is refused at once, before its body arrives), and two error types:
:class:`RemoteProtocolError` (the peer broke the protocol) and :class:`LocalProtocolError` (we
tried to put something invalid on the wire).

A relay forwards Data frames in their wire form: the outbound frame is the inbound frame with the
destination key replaced by the source key, so it has the same length.  :meth:`FrameDecoder.next_run`
hands the relay a :class:`DataRun`, all the consecutive Data frames for one destination that are
already buffered, so the per-frame work stays a header read and a key comparison.

Nothing here does I/O or reads the clock.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Final, NamedTuple

LENGTH_PREFIX_LEN: Final = 4
HEADER_LEN: Final = 5  # length prefix + type byte
MAX_FRAME_LENGTH: Final = 65536  # largest L (type byte + body)
MAX_BODY_LEN: Final = MAX_FRAME_LENGTH - 1
KEY_LEN: Final = 32
NONCE_LEN: Final = 16
MAC_LEN: Final = 32
TOKEN_LEN: Final = 8
NAT_PROBE_BODY_LEN: Final = 6
CHALLENGE_BODY_LEN: Final = KEY_LEN + NONCE_LEN
MIN_DATA_BODY_LEN: Final = KEY_LEN + 1  # a Data frame carries a non-empty datagram

_HEADER = struct.Struct(">IB")
_NAT_PROBE = struct.Struct(">4sH")


class FrameType(enum.IntEnum):
    REGISTER = 0x01
    DATA = 0x02
    KEEPALIVE = 0x03
    NAT_PROBE = 0x04
    RELAY_PROBE = 0x06
    CHALLENGE = 0x07
    AUTH = 0x08
    REGISTERED = 0x09
    ERROR = 0xFF


_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType)
_DATA: Final = int(FrameType.DATA)

# Exact body lengths for the fixed-size frame types; Data and Error are variable.
FIXED_BODY_LEN: Final[dict[FrameType, int]] = {
    FrameType.REGISTER: KEY_LEN,
    FrameType.KEEPALIVE: 0,
    FrameType.NAT_PROBE: NAT_PROBE_BODY_LEN,
    FrameType.RELAY_PROBE: TOKEN_LEN,
    FrameType.CHALLENGE: CHALLENGE_BODY_LEN,
    FrameType.AUTH: MAC_LEN,
    FrameType.REGISTERED: 0,
}


class RelayProtocolError(Exception):
    """Base of the codec's errors.  ``reason`` is a short label fit for a metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class RemoteProtocolError(RelayProtocolError):
    """The peer sent bytes that break the protocol; the connection cannot continue."""


class LocalProtocolError(RelayProtocolError):
    """We were asked to encode something that is not a valid frame (a bug on our side)."""


class NeedData:
    """The buffer holds no complete frame yet; feed more bytes."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class Frame(NamedTuple):
    """One decoded frame.  ``type`` is a :class:`FrameType` value (an int)."""

    type: int
    body: bytes


class DataRun(NamedTuple):
    """Consecutive Data frames carrying the same key, in wire form.

    ``key`` is the destination on the way to the relay and the source on the way back.
    ``frames`` is a private copy of the frames' bytes; ``offsets`` holds where each frame starts
    in it.  The relay turns the run into its outbound form with :func:`rewrite_source`; a client
    takes the datagrams out with :func:`run_datagrams`.
    """

    key: bytes
    frames: bytearray
    offsets: list[int]


# -- encoding ---------------------------------------------------------------------------------


def encode_frame(frame_type: FrameType, body: bytes = b"") -> bytes:
    """One frame in wire form.  Raises :class:`LocalProtocolError` for a body of the wrong size."""
    if int(frame_type) not in _KNOWN_TYPES:
        raise LocalProtocolError("unknown_type", f"unknown frame type {frame_type!r}")
    ftype = FrameType(frame_type)
    _check_body_len(ftype, len(body), LocalProtocolError)
    return _HEADER.pack(len(body) + 1, ftype) + body


def encode_register(public_key: bytes) -> bytes:
    return encode_frame(FrameType.REGISTER, public_key)


def encode_challenge(ephemeral_public: bytes, nonce: bytes) -> bytes:
    return encode_frame(FrameType.CHALLENGE, ephemeral_public + nonce)


def encode_auth(mac: bytes) -> bytes:
    return encode_frame(FrameType.AUTH, mac)


def encode_registered() -> bytes:
    return encode_frame(FrameType.REGISTERED)


def encode_data(key: bytes, datagram: bytes) -> bytes:
    """A Data frame: ``key`` is the destination (to the relay) or the source (from the relay)."""
    if len(key) != KEY_LEN:
        raise LocalProtocolError("bad_key", f"Data key must be {KEY_LEN} bytes, not {len(key)}")
    return encode_frame(FrameType.DATA, key + datagram)


def encode_keepalive() -> bytes:
    return encode_frame(FrameType.KEEPALIVE)


def encode_nat_probe(ip: str, port: int) -> bytes:
    try:
        packed_ip = ipaddress.IPv4Address(ip).packed
    except ValueError as e:
        raise LocalProtocolError("bad_address", f"NATProbe needs an IPv4 address: {e}") from e
    if not 0 < port < 65536:
        raise LocalProtocolError("bad_port", f"NATProbe port {port} out of range")
    return encode_frame(FrameType.NAT_PROBE, _NAT_PROBE.pack(packed_ip, port))


def encode_relay_probe(token: bytes) -> bytes:
    return encode_frame(FrameType.RELAY_PROBE, token)


def encode_error(reason: str) -> bytes:
    """An Error frame; the reason is truncated to fit one frame."""
    body = reason.encode("utf-8", "replace")[:MAX_BODY_LEN]
    return encode_frame(FrameType.ERROR, body)


# -- decoding helpers for bodies --------------------------------------------------------------


def parse_data(body: bytes) -> tuple[bytes, bytes]:
    """(key, datagram) of a Data body."""
    return body[:KEY_LEN], body[KEY_LEN:]


def parse_challenge(body: bytes) -> tuple[bytes, bytes]:
    """(ephemeral public key, nonce) of a Challenge body."""
    return body[:KEY_LEN], body[KEY_LEN:]


def parse_nat_probe(body: bytes) -> tuple[ipaddress.IPv4Address, int]:
    """(address, port) of a NATProbe body."""
    packed_ip, port = _NAT_PROBE.unpack(body)
    return ipaddress.IPv4Address(packed_ip), port


def parse_error(body: bytes) -> str:
    return body.decode("utf-8", "replace")


def rewrite_source(run: DataRun, source: bytes) -> bytearray:
    """Turn a run of inbound Data frames into outbound ones: the key becomes ``source``.

    Rewrites ``run.frames`` in place (the run owns its copy) and returns it.
    """
    frames = run.frames
    for start in run.offsets:
        frames[start + HEADER_LEN : start + HEADER_LEN + KEY_LEN] = source
    return frames


def run_datagrams(run: DataRun) -> list[bytes]:
    """The datagrams carried by a run, in order."""
    frames, offsets = run.frames, run.offsets
    bounds = offsets[1:] + [len(frames)]
    skip = HEADER_LEN + KEY_LEN
    return [bytes(frames[start + skip : end]) for start, end in zip(offsets, bounds)]


def truncate_run(run: DataRun, limit: int) -> tuple[DataRun, int]:
    """Keep the leading frames of ``run`` that fit in ``limit`` bytes.

    Returns the shortened run and how many frames were cut off.
    """
    frames, offsets = run.frames, run.offsets
    if len(frames) <= limit:
        return run, 0
    kept = 0
    for start in offsets:
        if _frame_end(frames, start) > limit:
            break
        kept += 1
    # The last frame ends at len(frames) > limit, so at least one frame is cut.
    end = offsets[kept]
    return DataRun(run.key, frames[:end], offsets[:kept]), len(offsets) - kept


def _frame_end(frames: bytearray, start: int) -> int:
    (length,) = struct.unpack_from(">I", frames, start)
    return start + LENGTH_PREFIX_LEN + int(length)


def _check_body_len(
    ftype: FrameType, body_len: int, error: type[RelayProtocolError]
) -> None:
    if body_len > MAX_BODY_LEN:
        raise error("oversized", f"{ftype.name} body of {body_len} bytes exceeds {MAX_BODY_LEN}")
    expected = FIXED_BODY_LEN.get(ftype)
    if expected is not None and body_len != expected:
        raise error(
            "bad_length", f"{ftype.name} body must be {expected} bytes, not {body_len}"
        )
    if ftype is FrameType.DATA and body_len < MIN_DATA_BODY_LEN:
        raise error(
            "bad_length", f"DATA body must be at least {MIN_DATA_BODY_LEN} bytes, not {body_len}"
        )


# -- the decoder ------------------------------------------------------------------------------


class FrameDecoder:
    """Splits a byte stream into frames.

    ``feed()`` bytes as they arrive, then call :meth:`next_frame` (or :meth:`next_run`) until it
    returns :data:`NEED_DATA`.  A :class:`RemoteProtocolError` is final: the decoder refuses to go
    on afterwards, as the stream position is lost.
    """

    __slots__ = ("_buf", "_off", "_broken")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._off = 0
        self._broken: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._off

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        buf = self._buf
        if self._off:
            del buf[: self._off]  # cheap: CPython advances the bytearray's start
            self._off = 0
        buf += data

    def next_frame(self) -> Frame | NeedData:
        """The next complete frame, one at a time, whatever its type."""
        header = self._peek_header()
        if header is NEED_DATA:
            return NEED_DATA
        length, ftype = header  # type: ignore[misc]
        start = self._off + HEADER_LEN
        end = self._off + LENGTH_PREFIX_LEN + length
        if end > len(self._buf):
            return NEED_DATA
        self._off = end
        return Frame(ftype, bytes(self._buf[start:end]))

    def next_run(self) -> Frame | DataRun | NeedData:
        """Like :meth:`next_frame`, but consecutive Data frames for one destination come as one
        :class:`DataRun`."""
        header = self._peek_header()
        if header is NEED_DATA:
            return NEED_DATA
        length, ftype = header  # type: ignore[misc]
        buf, first = self._buf, self._off
        end = first + LENGTH_PREFIX_LEN + length
        if end > len(buf):
            return NEED_DATA
        if ftype != _DATA:
            self._off = end
            return Frame(ftype, bytes(buf[first + HEADER_LEN : end]))
        key_at = first + HEADER_LEN
        destination = bytes(buf[key_at : key_at + KEY_LEN])
        offsets = [0]
        off = end
        off = self._extend_run(destination, off, first, offsets)
        self._off = off
        return DataRun(destination, buf[first:off], offsets)

    def _extend_run(self, destination: bytes, off: int, first: int, offsets: list[int]) -> int:
        """Walk the following frames while they are complete, valid Data for ``destination``.

        Anything else (another type, a bad length, a partial frame) ends the run; the next call
        to :meth:`next_run` deals with it.  This loop is the relay's per-frame cost.
        """
        buf = self._buf
        size = len(buf)
        unpack_from = _HEADER.unpack_from
        startswith = buf.startswith
        while off + HEADER_LEN + KEY_LEN <= size:
            length, ftype = unpack_from(buf, off)
            nxt = off + LENGTH_PREFIX_LEN + length
            if (
                ftype != _DATA
                or nxt > size
                or length > MAX_FRAME_LENGTH
                or length <= MIN_DATA_BODY_LEN
                or not startswith(destination, off + HEADER_LEN)
            ):
                break
            offsets.append(off - first)
            off = nxt
        return off

    def _peek_header(self) -> tuple[int, int] | NeedData:
        if self._broken is not None:
            raise self._broken
        off = self._off
        if len(self._buf) - off < HEADER_LEN:
            return NEED_DATA
        length, ftype = _HEADER.unpack_from(self._buf, off)
        try:
            _check_header(length, ftype)
        except RemoteProtocolError as e:
            self._broken = e
            raise
        return length, ftype


def _check_header(length: int, ftype: int) -> None:
    if length == 0:
        raise RemoteProtocolError("zero_length", "frame length is zero")
    if length > MAX_FRAME_LENGTH:
        raise RemoteProtocolError(
            "oversized", f"frame length {length} exceeds {MAX_FRAME_LENGTH}"
        )
    if ftype not in _KNOWN_TYPES:
        raise RemoteProtocolError("unknown_type", f"unknown frame type 0x{ftype:02x}")
    _check_body_len(FrameType(ftype), length - 1, RemoteProtocolError)


# -- the UDP datagrams a NATProbe asks for ----------------------------------------------------

NAT_PROBE_MAGIC: Final = b"WKNP"
NAT_PROBE_VERSION: Final = 1
PROBE_FROM_STUN_PORT: Final = 0
"""The probe sent from the relay's STUN port (the port the agent's NAT has already seen)."""
PROBE_FROM_ALTERNATE_PORT: Final = 1
"""The probe sent from a second port: only an endpoint-independent (full cone) filter lets it in."""


def nat_probe_datagram(source: int) -> bytes:
    """The UDP payload of a NAT probe: b"WKNP" + version + which relay port sent it."""
    return NAT_PROBE_MAGIC + bytes((NAT_PROBE_VERSION, source))


def parse_nat_probe_datagram(payload: bytes) -> int | None:
    """Which relay port sent a NAT probe datagram, or ``None`` if ``payload`` is not one."""
    if len(payload) != 6 or not payload.startswith(NAT_PROBE_MAGIC):
        return None
    if payload[4] != NAT_PROBE_VERSION or payload[5] not in (
        PROBE_FROM_STUN_PORT,
        PROBE_FROM_ALTERNATE_PORT,
    ):
        return None
    return payload[5]
