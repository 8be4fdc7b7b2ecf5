"""The replica mesh's pure parts: its wire format, its authentication and the key directory."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirekube.relay.directory import KeyDirectory
from wirekube.relay.meshwire import (
    MAX_FORWARD_FRAMES,
    ROLE_ACCEPTOR,
    ROLE_DIALER,
    check_secret,
    encode_forward,
    encode_hello,
    encode_holds,
    encode_releases,
    mesh_proof,
    newer,
    next_stamp,
    parse_entries,
    parse_hello,
    verify_proof,
)
from wirekube.relay.protocol import (
    NEED_DATA,
    FrameDecoder,
    FrameType,
    RemoteProtocolError,
    count_data_frames,
    encode_data,
    split_frames,
)

KEY = st.binary(min_size=32, max_size=32)
ENTRIES = st.lists(st.tuples(KEY, st.integers(0, 2**64 - 1)), min_size=1, max_size=3000)


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    decoder = FrameDecoder()
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        out.append((frame.type, frame.body))  # type: ignore[union-attr]
    return out


@given(ENTRIES)
def test_holds_and_releases_round_trip_over_as_many_frames_as_needed(entries: list[tuple[bytes, int]]) -> None:
    for encode, ftype in ((encode_holds, FrameType.MESH_HOLD), (encode_releases, FrameType.MESH_RELEASE)):
        wire = b"".join(encode(entries))
        decoded = frames_of(wire)
        assert all(t == ftype for t, _ in decoded)
        assert [e for _, body in decoded for e in parse_entries(body)] == entries
        assert len(decoded) == -(-len(entries) // (65535 // 40))  # whole entries per frame, as few frames as fit


@given(st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=40), st.data())
def test_a_forward_frame_survives_any_split_and_carries_whole_data_frames(datagrams: list[bytes],
                                                                          data: st.DataObject) -> None:
    inner = b"".join(encode_data(os.urandom(32), d) for d in datagrams)
    wire = encode_forward(b"d" * 32, inner) + encode_hello(b"i" * 16, b"n" * 16)
    cut = data.draw(st.integers(0, len(wire)))
    decoder = FrameDecoder()
    decoder.feed(wire[:cut])
    got = []
    while (item := decoder.next_frame_view()) is not NEED_DATA:
        got.append(item)
    decoder.feed(wire[cut:])
    while (item := decoder.next_frame_view()) is not NEED_DATA:
        got.append(item)
    (ftype, body), (htype, hello) = got  # type: ignore[misc]
    assert ftype == FrameType.MESH_FORWARD and bytes(body[:32]) == b"d" * 32
    assert count_data_frames(body[32:]) == len(datagrams) and bytes(body[32:]) == inner
    assert htype == FrameType.MESH_HELLO and parse_hello(bytes(hello)) == (b"i" * 16, b"n" * 16)


def test_a_forwarded_batch_must_be_nothing_but_whole_data_frames() -> None:
    good = encode_data(b"k" * 32, b"x" * 10)
    with pytest.raises(RemoteProtocolError, match=r'ends inside a frame$'):
        count_data_frames(good[:-1])
    with pytest.raises(RemoteProtocolError, match='holds something other than Data frames'):
        count_data_frames(good + encode_hello(b"i" * 16, b"n" * 16))
    with pytest.raises(RemoteProtocolError, match='ends inside a frame header'):
        count_data_frames(good + b"\x00\x00")


def test_split_frames_keeps_whole_frames_within_the_limit() -> None:
    frames = b"".join(encode_data(b"k" * 32, bytes(n)) for n in (1000, 30000, 30000, 70, 20000))
    pieces, dropped, _ = split_frames(memoryview(frames), MAX_FORWARD_FRAMES)
    assert dropped == 0 and b"".join(bytes(p) for p in pieces) == frames
    assert all(len(p) <= MAX_FORWARD_FRAMES for p in pieces) and len(pieces) == 2
    too_big = encode_data(b"k" * 32, bytes(65000))
    pieces, dropped, nbytes = split_frames(memoryview(frames[:1037] + too_big), 60000)
    assert dropped == 1 and nbytes == len(too_big) and [bytes(p) for p in pieces] == [frames[:1037]]


def test_proofs_need_the_secret_the_nonces_and_the_right_role() -> None:
    secret = check_secret(b"  a secret of enough length\n")
    ids, nonces = (os.urandom(16), os.urandom(16)), (os.urandom(16), os.urandom(16))
    mac = mesh_proof(secret, ROLE_DIALER, *ids, *nonces)
    assert verify_proof(secret, ROLE_DIALER, *ids, *nonces, mac)
    assert not verify_proof(b"another secret of enough length", ROLE_DIALER, *ids, *nonces, mac)
    assert not verify_proof(secret, ROLE_ACCEPTOR, *ids, *nonces, mac)  # reflected back: refused
    assert not verify_proof(secret, ROLE_DIALER, *ids, nonces[0], os.urandom(16), mac)  # another connection
    with pytest.raises(ValueError, match="at least 16 bytes"):
        check_secret(b"short\n")
    with pytest.raises(RemoteProtocolError, match='mesh version 2 is not 1'):
        parse_hello(b"\x02" + bytes(32))


A, B, C, SELF = b"a" * 16, b"b" * 16, b"c" * 16, b"s" * 16
K = b"k" * 32


def test_the_newest_claim_of_a_key_wins_and_evicts_the_local_holder() -> None:
    d = KeyDirectory(SELF)
    stamp = d.register_local(K, now_us=1000)
    change = d.peer_holds(A, [(K, stamp - 1)])  # older: ours stays
    assert change.evict == [] and change.routes == {K: A} and d.holder(K) == A
    change = d.peer_holds(B, [(K, stamp + 5)])  # newer: ours must go, B is the holder
    assert change.evict == [K] and change.routes == {K: B}
    assert d.release_local(K) == stamp
    assert d.peer_releases(B, [(K, stamp + 5)]).routes == {K: A}
    assert d.peer_down(A).routes == {K: None} and d.holder(K) is None


def test_outranked_says_whether_a_newer_claim_than_ours_remains() -> None:
    d = KeyDirectory(SELF)
    stamp = d.register_local(K, now_us=1000)
    assert not d.outranked(K)
    d.peer_holds(A, [(K, stamp - 1)])
    assert not d.outranked(K)  # older claim elsewhere
    d.peer_holds(B, [(K, stamp + 5)])
    assert d.outranked(K)
    d.peer_releases(B, [(K, stamp + 5)])
    assert not d.outranked(K)  # the newer one went: ours is the newest again
    d.release_local(K)
    assert not d.outranked(K)


def test_stamps_follow_what_was_seen_even_with_a_slow_clock() -> None:
    d = KeyDirectory(SELF)
    d.peer_holds(A, [(K, 5_000_000)])
    assert d.register_local(b"x" * 32, now_us=10) == 5_000_001  # later than anything seen
    assert next_stamp(9, 3) == 9 and next_stamp(3, 9) == 10
    assert newer(5, B, 5, A) and not newer(5, A, 5, B)  # a tie goes to the larger replica id


def test_a_release_older_than_the_hold_does_not_remove_it_and_a_snapshot_lists_local_keys() -> None:
    d = KeyDirectory(SELF)
    d.peer_holds(C, [(K, 10)])
    assert d.peer_releases(C, [(K, 9)]).routes == {} and d.holder(K) == C
    d.register_local(b"y" * 32, now_us=50)
    assert d.snapshot() == [(b"y" * 32, 50)] and d.keys_of(C) == 1
    assert d.peer_up(C).routes == {K: None}  # a new link starts empty: the peer's snapshot follows on it
    assert d.keys_of(C) == 0 and d.holder(K) is None
