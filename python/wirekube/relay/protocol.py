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
0x0A    GoAway       relay -> client: UTF-8 reason; the relay is draining: register elsewhere
                     (through the same address) now; this connection keeps working until the
                     relay closes it or the client does
0xFF    Error        UTF-8 reason; the sender closes the connection after it
======  ===========  ==========================================================================

Between relay replicas (the replica mesh, :mod:`wirekube.relay.mesh`; never on a client port):

======  ===========  ==========================================================================
0x20    MeshHello    version (1) + replica id (16) + nonce (16); each side sends one first
0x21    MeshAuth     HMAC-SHA256 proof of the shared mesh secret (32), see :mod:`wirekube.relay.meshwire`
0x22    MeshHold     one or more (key 32 + stamp u64): the sender holds these keys
0x23    MeshRelease  one or more (key 32 + stamp u64): the sender no longer holds these keys
0x24    MeshForward  destination key (32) + one or more whole Data frames carrying the source key
======  ===========  ==========================================================================

The decoder follows h11's shape: a ``bytearray`` receive buffer with a read offset, an explicit
:data:`NEED_DATA` result, a hard cap on the size of an incomplete frame (a header announcing more
than :data:`MAX_FRAME_LENGTH` is refused at once, before its body arrives), and two error types:
:class:`RemoteProtocolError` (the peer broke the protocol) and :class:`LocalProtocolError` (we
tried to put something invalid on the wire).

A relay forwards Data frames in their wire form: the outbound frame is the inbound frame with the
destination key replaced by the source key, so it has the same length.  :meth:`FrameDecoder.next_run`
hands out a :class:`DataRun`, all the consecutive Data frames for one key that are already
buffered, as a view of the receive buffer (no copy), optionally with the key already rewritten.
Per frame that costs one ``startswith`` (header and key compared at once) and, when rewriting, one
slice assignment.  The receive buffer is a series of fixed-size chunks that are never resized or
reused while anyone holds a view of them, so a view stays valid for as long as it is held, and a
socket can read straight into the decoder (:meth:`FrameDecoder.get_buffer` / :meth:`FrameDecoder.buffer_updated`).

Nothing here does I/O or reads the clock.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from collections import deque
from itertools import repeat
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
REPLICA_ID_LEN: Final = 16
MESH_HELLO_BODY_LEN: Final = 1 + REPLICA_ID_LEN + NONCE_LEN
MESH_ENTRY_LEN: Final = KEY_LEN + 8  # key + u64 stamp, in MeshHold / MeshRelease
MIN_MESH_FORWARD_BODY_LEN: Final = KEY_LEN + HEADER_LEN + MIN_DATA_BODY_LEN

_HEADER = struct.Struct(">IB")
_LENGTH = struct.Struct(">I")
DATA_HEADER: Final = struct.Struct(">IB32s")
"""What precedes the datagram in a Data frame: ``DATA_HEADER.pack_into(buf, offset, 1 + KEY_LEN +
len(datagram), FrameType.DATA, key)`` frames a datagram already placed at ``offset + DATA_PREFIX_LEN``."""
DATA_PREFIX_LEN: Final = 4 + 1 + 32
MAX_DATAGRAM: Final = 65536 - 1 - 32
"""The largest datagram a Data frame carries (L is at most 65536)."""
_KEY = struct.Struct("32s")
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
    GOAWAY = 0x0A
    MESH_HELLO = 0x20
    MESH_AUTH = 0x21
    MESH_HOLD = 0x22
    MESH_RELEASE = 0x23
    MESH_FORWARD = 0x24
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
    FrameType.MESH_HELLO: MESH_HELLO_BODY_LEN,
    FrameType.MESH_AUTH: MAC_LEN,
}

# Shortest bodies of the variable-size types (longest: MAX_BODY_LEN).
MIN_BODY_LEN: Final[dict[FrameType, int]] = {
    FrameType.DATA: MIN_DATA_BODY_LEN,
    FrameType.MESH_HOLD: MESH_ENTRY_LEN,
    FrameType.MESH_RELEASE: MESH_ENTRY_LEN,
    FrameType.MESH_FORWARD: MIN_MESH_FORWARD_BODY_LEN,
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

    ``key`` is the key the frames carried when they arrived (the destination, on the way to the
    relay).  ``frames`` is a read-write view of the decoder's buffer holding ``frame_count`` whole
    frames; it stays valid however long it is kept.  A client takes the datagrams out with
    :func:`run_datagrams`.
    """

    key: bytes
    frames: memoryview
    frame_count: int


BLOCK_FRAMES: Final = 64
"""Small frames of one length and key are rewritten this many at a time (see ``_block_run``)."""
BLOCK_MAX_FRAME: Final = 512
"""Frames up to this size take the block path; beyond it copying payloads costs more than the
per-frame loop saves."""


_CHECK_BLOCKS: Final = (BLOCK_FRAMES, 16, 4)


@functools.lru_cache(maxsize=192)
def _check_struct(size: int, count: int) -> struct.Struct:
    """``count`` frames of ``size`` bytes: their 37-byte prefixes, payloads skipped (not copied)."""
    return struct.Struct(f"{HEADER_LEN + KEY_LEN}s{size - HEADER_LEN - KEY_LEN}x" * count)


@functools.lru_cache(maxsize=64)
def _block_struct(size: int) -> struct.Struct:
    payload = size - HEADER_LEN - KEY_LEN
    return struct.Struct(f"{HEADER_LEN + KEY_LEN}s{payload}s" * BLOCK_FRAMES)


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


def encode_goaway(reason: str) -> bytes:
    """A GoAway frame (relay -> client): register elsewhere now; truncated to fit one frame."""
    return encode_frame(FrameType.GOAWAY, reason.encode("utf-8", "replace")[:MAX_BODY_LEN])


def encode_error(reason: str) -> bytes:
    """An Error frame; the reason is truncated to fit one frame."""
    body = reason.encode("utf-8", "replace")[:MAX_BODY_LEN]
    return encode_frame(FrameType.ERROR, body)


# -- decoding helpers for bodies --------------------------------------------------------------


def parse_nat_probe(body: bytes) -> tuple[ipaddress.IPv4Address, int]:
    """(address, port) of a NATProbe body."""
    packed_ip, port = _NAT_PROBE.unpack(body)
    return ipaddress.IPv4Address(packed_ip), port


def parse_error(body: bytes) -> str:
    return body.decode("utf-8", "replace")


def frame_bounds(frames: memoryview | bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) of each whole frame in ``frames`` (which must hold whole frames only)."""
    bounds = []
    start, size = 0, len(frames)
    while start < size:
        (length,) = _LENGTH.unpack_from(frames, start)
        end = start + LENGTH_PREFIX_LEN + length
        bounds.append((start, end))
        start = end
    return bounds


def run_datagrams(run: DataRun) -> list[bytes]:
    """The datagrams carried by a run, in order (copies)."""
    skip = HEADER_LEN + KEY_LEN
    frames = run.frames
    return [bytes(frames[start + skip : end]) for start, end in frame_bounds(frames)]


def count_data_frames(frames: memoryview | bytes | bytearray) -> int:
    """How many Data frames ``frames`` holds; :class:`RemoteProtocolError` unless it is nothing
    but whole, valid Data frames (the check a relay makes on a batch another replica forwards)."""
    count, start, size = 0, 0, len(frames)
    unpack_from = _HEADER.unpack_from
    while start < size:
        if size - start < HEADER_LEN:
            raise RemoteProtocolError("bad_length", "a forwarded batch ends inside a frame header")
        length, ftype = unpack_from(frames, start)
        if ftype != _DATA or not MIN_DATA_BODY_LEN < length <= MAX_FRAME_LENGTH:
            raise RemoteProtocolError("bad_frame", "a forwarded batch holds something other than Data frames")
        start += LENGTH_PREFIX_LEN + length
        if start > size:
            raise RemoteProtocolError("bad_length", "a forwarded batch ends inside a frame")
        count += 1
    return count


def split_frames(frames: memoryview, limit: int) -> tuple[list[memoryview], int, int]:
    """Cut whole frames into pieces of at most ``limit`` bytes each (views, no copy).

    Returns the pieces and how many frames (and bytes) did not fit any piece (a single frame
    longer than ``limit``)."""
    pieces: list[memoryview] = []
    dropped = dropped_bytes = 0
    piece_start = end = 0
    for start, stop in frame_bounds(frames):
        if stop - start > limit:
            if end > piece_start:
                pieces.append(frames[piece_start:end])
            dropped += 1
            dropped_bytes += stop - start
            piece_start = end = stop
            continue
        if stop - piece_start > limit:
            pieces.append(frames[piece_start:end])
            piece_start = start
        end = stop
    if end > piece_start:
        pieces.append(frames[piece_start:end])
    return pieces, dropped, dropped_bytes


def truncate_run(run: DataRun, limit: int) -> tuple[DataRun, int]:
    """Keep the leading frames of ``run`` that fit in ``limit`` bytes.

    Returns the shortened run and how many frames were cut off.
    """
    frames = run.frames
    if len(frames) <= limit:
        return run, 0
    kept = 0
    end = 0
    while end < len(frames):
        (length,) = _LENGTH.unpack_from(frames, end)
        nxt = end + LENGTH_PREFIX_LEN + length
        if nxt > limit:
            break
        kept += 1
        end = nxt
    return DataRun(run.key, frames[:end], kept), run.frame_count - kept


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
    shortest = MIN_BODY_LEN.get(ftype)
    if shortest is not None and body_len < shortest:
        raise error(
            "bad_length", f"{ftype.name} body must be at least {shortest} bytes, not {body_len}"
        )


# -- the decoder ------------------------------------------------------------------------------


class FrameDecoder:
    """Splits a byte stream into frames.

    Give it bytes with :meth:`feed` (a copy), or let a socket read straight into
    :meth:`get_buffer` and then call :meth:`buffer_updated`.  Then call :meth:`next_frame` (or
    :meth:`next_run`) until it returns :data:`NEED_DATA`.  A :class:`RemoteProtocolError` is final:
    the decoder refuses to go on afterwards, as the stream position is lost.

    Memory: the decoder holds one chunk, sized like TCP autotuning sizes a socket buffer: it
    doubles (up to ``max_chunk``) while reads fill what was offered and halves (down to
    ``min_chunk``) while they use a sliver of it, so a busy connection reads 256 KiB at a time and
    a quiet one holds 16 KiB.  A chunk is larger only to fit a frame that straddles chunks (at
    most :data:`MAX_FRAME_LENGTH` + 4).  A new chunk starts when the current one has less than a
    quarter of the target size left, taking over the unfinished frame.  A chunk is never resized, and
    it is filled again from the start only when no view of it is held any more (otherwise a fresh
    one is allocated, and the old one lives on only while someone holds a view of it).
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_end",
        "_max_chunk",
        "_min_chunk",
        "_off",
        "_offered",
        "_target",
        "_view",
    )

    def __init__(self, min_chunk: int = 16 * 1024, max_chunk: int = 256 * 1024) -> None:
        self._min_chunk = max(64, min_chunk)
        self._max_chunk = max(self._min_chunk, max_chunk)
        self._target = self._min_chunk  # size of the next chunk
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._off = 0  # first byte not yet returned
        self._end = 0  # end of the bytes received
        self._offered = 0  # free bytes the last get_buffer() offered
        self._broken: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._end - self._off

    @property
    def capacity(self) -> int:
        """Size of the chunk currently receiving."""
        return len(self._buf)

    def get_buffer(self, min_free: int = 0) -> memoryview:
        """A writable view of free buffer space, at least ``min_free`` bytes (and at least a
        quarter of the target chunk size); report what was written with :meth:`buffer_updated`."""
        want = max(min_free, self._target // 4)
        idle_and_oversized = self._off == self._end and len(self._buf) > 2 * self._target
        if len(self._buf) - self._end < want or idle_and_oversized:
            self._new_chunk(want)
        view = self._view[self._end :]
        self._offered = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the view :meth:`get_buffer` returned."""
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise LocalProtocolError("bad_length", f"buffer_updated({nbytes}) beyond the free space")
        self._end += nbytes
        if nbytes * 4 >= self._offered * 3:
            self._target = min(self._target * 2, self._max_chunk)
        elif nbytes * 16 < self._offered:
            self._target = max(self._target // 2, self._min_chunk)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append a copy of ``data``."""
        size = len(data)
        if size:
            self.get_buffer(size)[:size] = data
            self.buffer_updated(size)

    def clear(self) -> None:
        """Forget every buffered byte (a closing connection discards what still arrives)."""
        self._off = self._end

    def _new_chunk(self, want: int) -> None:
        pending = self._end - self._off
        size = max(self._target, pending + want)
        if pending >= LENGTH_PREFIX_LEN:  # room for the whole unfinished frame, copied only once
            (length,) = _LENGTH.unpack_from(self._buf, self._off)
            size = max(size, LENGTH_PREFIX_LEN + min(length, MAX_FRAME_LENGTH) + want)
        old = self._buf
        if size <= len(old) <= 2 * size:
            tail = bytes(self._view[self._off : self._end])
            if self._unshared():
                old[:pending] = tail
                self._view = memoryview(old)
                self._off, self._end = 0, pending
                return
        chunk = bytearray(size)
        chunk[:pending] = self._view[self._off : self._end]
        self._buf = chunk
        self._view = memoryview(chunk)
        self._off, self._end = 0, pending

    def _unshared(self) -> bool:
        """Whether nobody else holds a view of the current chunk, so it can be filled again from
        the start (saving the allocation and zeroing of a new one).  Releases our own view; a
        bytearray refuses to change size while any view of it exists, so shrinking it by one
        byte and growing it back (within its allocation: no copy) tells."""
        buf = self._buf
        self._view.release()
        try:
            last = buf.pop()
        except BufferError:
            self._view = memoryview(buf)  # still shared: the caller takes a new chunk
            return False
        buf.append(last)
        return True

    def next_frame(self) -> Frame | NeedData:
        """The next complete frame, one at a time, whatever its type (the body is a copy)."""
        header = self._peek_header()
        if header is NEED_DATA:
            return NEED_DATA
        length, ftype = header  # type: ignore[misc]
        start = self._off + HEADER_LEN
        end = self._off + LENGTH_PREFIX_LEN + length
        if end > self._end:
            return NEED_DATA
        self._off = end
        return Frame(ftype, bytes(self._view[start:end]))

    def next_frame_view(self) -> tuple[int, memoryview] | NeedData:
        """Like :meth:`next_frame`, but the body is a read-write view of the receive buffer (no
        copy); it stays valid however long it is held."""
        header = self._peek_header()
        if header is NEED_DATA:
            return NEED_DATA
        length, ftype = header  # type: ignore[misc]
        start = self._off + HEADER_LEN
        end = self._off + LENGTH_PREFIX_LEN + length
        if end > self._end:
            return NEED_DATA
        self._off = end
        return ftype, self._view[start:end]

    def next_run(self, rewrite: bytes | None = None) -> Frame | DataRun | NeedData:
        """Like :meth:`next_frame`, but consecutive Data frames with one key come as one
        :class:`DataRun`, a view of the buffer.  With ``rewrite``, every frame of the run has its
        key replaced by ``rewrite`` (in the buffer: the bytes are consumed anyway); the run's
        ``key`` is still the key that arrived."""
        header = self._peek_header()
        if header is NEED_DATA:
            return NEED_DATA
        length, ftype = header  # type: ignore[misc]
        first = self._off
        end = first + LENGTH_PREFIX_LEN + length
        if end > self._end:
            return NEED_DATA
        if ftype != _DATA:
            self._off = end
            return Frame(ftype, bytes(self._view[first + HEADER_LEN : end]))
        key = bytes(self._view[first + HEADER_LEN : first + HEADER_LEN + KEY_LEN])
        size = LENGTH_PREFIX_LEN + length
        if rewrite is not None and size <= BLOCK_MAX_FRAME and self._end - first >= BLOCK_FRAMES * size:
            block = self._block_run(first, size, key, rewrite)
            if block is not None:
                return block
        off, count = self._scan_run(first, key, rewrite)
        self._off = off
        return DataRun(key, self._view[first:off], count)

    def _block_run(self, first: int, size: int, key: bytes, rewrite: bytes) -> DataRun | None:
        """Small frames, rewritten :data:`BLOCK_FRAMES` at a time with one ``struct`` call.

        For a block of frames of ``size`` bytes, one ``unpack_from`` splits it into 37-byte
        prefixes (length, type, key) and payloads.  If every prefix equals the first one, each
        frame really has that length, so the framing assumed is the framing there is (nothing in a
        payload can fake it: only prefixes at the computed offsets are compared); the outbound
        form is then the payloads joined by the rewritten prefix, a new ``bytes``.  Returns
        ``None`` if not even the first block is uniform."""
        view = self._view
        prefix = bytes(view[first : first + HEADER_LEN + KEY_LEN])
        unpack_from = _block_struct(size).unpack_from
        step = BLOCK_FRAMES * size
        payloads: list[bytes] = [b""]
        off, last = first, self._end - step
        while off <= last:
            parts = unpack_from(view, off)
            if parts[0::2].count(prefix) != BLOCK_FRAMES:
                break
            payloads += parts[1::2]
            off += step
        if off == first:
            return None
        self._off = off
        frames = (prefix[:HEADER_LEN] + rewrite).join(payloads)
        return DataRun(key, memoryview(frames), (off - first) // size)

    def _scan_run(self, first: int, key: bytes, rewrite: bytes | None) -> tuple[int, int]:
        """Walk complete, valid Data frames carrying ``key`` from ``first`` (itself one, already
        checked); return where the run ends and how many frames it holds.

        Anything else (another type or key, a bad length, a partial frame) ends the run; the next
        call deals with it.  This is the relay's per-frame cost: frames of the same length and
        key share their first 37 bytes, so comparing those checks length, type and key at once,
        for 64, then 16, then 4 frames per ``struct`` call while that many are buffered, then one
        ``startswith`` per frame.  If every prefix in a block equals the first, each of those
        frames really has that length, so the framing assumed is the framing there is (only
        prefixes at the computed offsets are compared: nothing in a payload can fake it).  The
        key is then rewritten at the known offsets, by ``map`` for longer runs (no Python-level
        loop).
        """
        buf, view, limit = self._buf, self._view, self._end
        startswith = buf.startswith
        unpack_from = _HEADER.unpack_from
        put_key = _KEY.pack_into
        key_at = HEADER_LEN
        key_end = HEADER_LEN + KEY_LEN
        off, count = first, 0
        while True:
            # a frame of a new length (or the first): full header check
            if off + key_end > limit:
                break
            length, ftype = unpack_from(buf, off)
            size = LENGTH_PREFIX_LEN + length
            if (
                ftype != _DATA
                or length > MAX_FRAME_LENGTH
                or length <= MIN_DATA_BODY_LEN
                or off + size > limit
                or not startswith(key, off + key_at)
            ):
                break
            prefix = bytes(view[off : off + key_end])
            # then every following frame of the same length and key: first BLOCK_FRAMES at a
            # time (one struct call returns their 37-byte prefixes, skipping the payloads), then
            # one comparison each
            start = off
            for block in _CHECK_BLOCKS:  # 64 at a time, then 16, then 4
                step = block * size
                if limit - off >= step:
                    check = _check_struct(size, block).unpack_from
                    while off <= limit - step and check(buf, off).count(prefix) == block:
                        off += step
            last = limit - size
            if off == start:
                off += size  # the first frame is checked already
            while off <= last and startswith(prefix, off):
                off += size
            frames = (off - start) // size
            count += frames
            if rewrite is not None:
                if frames < 8:
                    for at in range(start + key_at, off, size):
                        put_key(view, at, rewrite)
                else:  # the loop in C: map() calls pack_into for each offset
                    deque(map(put_key, repeat(view), range(start + key_at, off, size), repeat(rewrite)), 0)
        return off, count

    def _peek_header(self) -> tuple[int, int] | NeedData:
        if self._broken is not None:
            raise self._broken
        off = self._off
        if self._end - off < HEADER_LEN:
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
    limits = _BODY_LIMITS.get(ftype)
    if limits is None:
        raise RemoteProtocolError("unknown_type", f"unknown frame type 0x{ftype:02x}")
    if not limits[0] <= length - 1 <= limits[1]:
        _check_body_len(FrameType(ftype), length - 1, RemoteProtocolError)  # raises, with detail


def _body_limits(ftype: FrameType) -> tuple[int, int]:
    fixed = FIXED_BODY_LEN.get(ftype)
    if fixed is not None:
        return fixed, fixed
    return MIN_BODY_LEN.get(ftype, 0), MAX_BODY_LEN


# (shortest, longest) body per type, by the type's integer value: the per-frame check is a lookup.
_BODY_LIMITS: Final[dict[int, tuple[int, int]]] = {int(t): _body_limits(t) for t in FrameType}


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
