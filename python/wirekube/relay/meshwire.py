"""The replica mesh's wire format and its authentication: pure, no I/O, no clock.

Relay replicas behind one load balancer talk to each other over *mesh links*: TCP connections
carrying the relay's own framing (:mod:`wirekube.relay.protocol`) with the Mesh* frame types.

Handshake (both directions proven, with a secret shared by every replica; never WireGuard keys)::

    dialer   -> MeshHello(version, dialer id D, nonce Nd)
    acceptor -> MeshHello(version, acceptor id A, nonce Na)
    dialer   -> MeshAuth(HMAC(secret, LABEL + b"D" + D + A + Nd + Na))
    acceptor    checks it; a wrong proof gets an Error and the connection is closed: the dialer
                has learned nothing but a random id and nonce
    acceptor -> MeshAuth(HMAC(secret, LABEL + b"A" + D + A + Nd + Na))
    dialer      checks it before it sends anything else

Each side picks a fresh nonce per connection, so a proof seen once is worthless later; the role
byte keeps a proof from being reflected back at its sender.  Only after both proofs do the sides
exchange MeshHold (the keys each holds, as a full snapshot first, then as they change),
MeshRelease and MeshForward (Data frames for a key the other side holds).

Stamps order registrations of one key cluster-wide: a replica stamps a registration with
``max(now in microseconds, the largest stamp it has seen + 1)`` (a hybrid logical clock), so a
later registration wins even if it lands on another replica with a slower clock, as long as the
two replicas talked in between; ties go to the larger replica id.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator
from typing import Final

from wirekube.relay.protocol import (
    HEADER_LEN,
    KEY_LEN,
    MAC_LEN,
    MAX_BODY_LEN,
    MESH_ENTRY_LEN,
    NONCE_LEN,
    REPLICA_ID_LEN,
    FrameType,
    RemoteProtocolError,
    encode_frame,
)

MESH_VERSION: Final = 1
MESH_LABEL: Final = b"wirekube-relay-mesh-v1"
MIN_SECRET_LEN: Final = 16
ROLE_DIALER: Final = b"D"
ROLE_ACCEPTOR: Final = b"A"
_ENTRY = struct.Struct(">32sQ")
_FORWARD_HEADER = struct.Struct(">IB32s")
FORWARD_OVERHEAD: Final = HEADER_LEN + KEY_LEN
"""Bytes a MeshForward frame adds in front of the Data frames it carries."""
MAX_FORWARD_FRAMES: Final = MAX_BODY_LEN - KEY_LEN
"""The most bytes of Data frames one MeshForward carries."""
_ENTRIES_PER_FRAME: Final = MAX_BODY_LEN // MESH_ENTRY_LEN


def check_secret(secret: bytes) -> bytes:
    """The secret with surrounding whitespace removed; ``ValueError`` if it is too short."""
    cleaned = secret.strip()
    if len(cleaned) < MIN_SECRET_LEN:
        raise ValueError(f"the mesh secret must be at least {MIN_SECRET_LEN} bytes, not {len(cleaned)}")
    return cleaned


def encode_hello(replica_id: bytes, nonce: bytes) -> bytes:
    if len(replica_id) != REPLICA_ID_LEN or len(nonce) != NONCE_LEN:
        raise ValueError("a MeshHello needs a 16-byte id and a 16-byte nonce")
    return encode_frame(FrameType.MESH_HELLO, bytes((MESH_VERSION,)) + replica_id + nonce)


def parse_hello(body: bytes) -> tuple[bytes, bytes]:
    """(replica id, nonce) of a MeshHello body; :class:`RemoteProtocolError` for another version."""
    if body[0] != MESH_VERSION:
        raise RemoteProtocolError("mesh_version", f"mesh version {body[0]} is not {MESH_VERSION}")
    return bytes(body[1 : 1 + REPLICA_ID_LEN]), bytes(body[1 + REPLICA_ID_LEN :])


def mesh_proof(secret: bytes, role: bytes, dialer_id: bytes, acceptor_id: bytes,
               dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    """The MeshAuth body the side playing ``role`` sends."""
    message = MESH_LABEL + role + dialer_id + acceptor_id + dialer_nonce + acceptor_nonce
    return hmac.new(secret, message, hashlib.sha256).digest()


def verify_proof(secret: bytes, role: bytes, dialer_id: bytes, acceptor_id: bytes,
                 dialer_nonce: bytes, acceptor_nonce: bytes, mac: bytes) -> bool:
    if len(mac) != MAC_LEN:
        return False
    expected = mesh_proof(secret, role, dialer_id, acceptor_id, dialer_nonce, acceptor_nonce)
    return hmac.compare_digest(expected, mac)


def _encode_entries(ftype: FrameType, entries: Iterable[tuple[bytes, int]]) -> Iterator[bytes]:
    batch: list[bytes] = []
    for key, stamp in entries:
        batch.append(_ENTRY.pack(key, stamp))
        if len(batch) == _ENTRIES_PER_FRAME:
            yield encode_frame(ftype, b"".join(batch))
            batch = []
    if batch:
        yield encode_frame(ftype, b"".join(batch))


def encode_holds(entries: Iterable[tuple[bytes, int]]) -> list[bytes]:
    """MeshHold frames for ``(key, stamp)`` pairs (as many frames as needed)."""
    return list(_encode_entries(FrameType.MESH_HOLD, entries))


def encode_releases(entries: Iterable[tuple[bytes, int]]) -> list[bytes]:
    return list(_encode_entries(FrameType.MESH_RELEASE, entries))


def parse_entries(body: bytes | memoryview) -> list[tuple[bytes, int]]:
    """The ``(key, stamp)`` pairs of a MeshHold or MeshRelease body."""
    if len(body) % MESH_ENTRY_LEN:
        raise RemoteProtocolError("bad_length", f"a key list of {len(body)} bytes is not whole entries")
    return [(bytes(key), stamp) for key, stamp in _ENTRY.iter_unpack(body)]


def forward_header(destination: bytes, frames_len: int) -> bytes:
    """What precedes ``frames_len`` bytes of Data frames in a MeshForward frame."""
    return _FORWARD_HEADER.pack(1 + KEY_LEN + frames_len, FrameType.MESH_FORWARD, destination)


def encode_forward(destination: bytes, frames: bytes) -> bytes:
    if len(frames) > MAX_FORWARD_FRAMES:
        raise ValueError("too many bytes for one MeshForward")
    return forward_header(destination, len(frames)) + frames


def next_stamp(now_us: int, clock: int) -> int:
    """The stamp of a new local registration (see the module docstring)."""
    return max(now_us, clock + 1)


def newer(stamp_a: int, id_a: bytes, stamp_b: int, id_b: bytes) -> bool:
    """Whether claim A (stamp, replica id) beats claim B."""
    return (stamp_a, id_a) > (stamp_b, id_b)
