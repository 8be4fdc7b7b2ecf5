"""The decoder's bulk paths: runs of large frames checked BLOCK_FRAMES at a time and rewritten
without a Python-level loop, and receive chunks filled again once nobody holds a view of them.

Checked against a naive reference: split the stream frame by frame, then group consecutive Data
frames by key."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from wirekube.relay.protocol import (
    BLOCK_FRAMES,
    KEY_LEN,
    NEED_DATA,
    DataRun,
    Frame,
    FrameDecoder,
    FrameType,
    encode_data,
    encode_keepalive,
    frame_bounds,
    run_datagrams,
)

KEYS = [bytes([i]) * KEY_LEN for i in range(3)]
SOURCE = b"s" * KEY_LEN


def reference(wire: bytes) -> list[tuple[str, bytes, list[bytes]]]:
    """(kind, key, datagrams) per run, the slow obvious way."""
    out: list[tuple[str, bytes, list[bytes]]] = []
    off = 0
    while off < len(wire):
        (length,) = struct.unpack_from(">I", wire, off)
        ftype, body = wire[off + 4], wire[off + 5 : off + 4 + length]
        off += 4 + length
        if ftype != FrameType.DATA:
            out.append(("frame", b"", [body]))
        elif out and out[-1][0] == "data" and out[-1][1] == body[:KEY_LEN]:
            out[-1][2].append(body[KEY_LEN:])
        else:
            out.append(("data", body[:KEY_LEN], [body[KEY_LEN:]]))
    return out


def decode(wire: bytes, rewrite: bytes | None, read_size: int) -> list[tuple[str, bytes, list[bytes]]]:
    decoder = FrameDecoder()
    out: list[tuple[str, bytes, list[bytes]]] = []
    for at in range(0, len(wire), read_size):
        decoder.feed(wire[at : at + read_size])
        while (item := decoder.next_run(rewrite)) is not NEED_DATA:
            if isinstance(item, DataRun):
                keys = {bytes(item.frames[s + 5 : s + 5 + KEY_LEN]) for s, _ in frame_bounds(item.frames)}
                assert keys == {rewrite if rewrite is not None else item.key}
                assert item.frame_count == len(frame_bounds(item.frames))
                if out and out[-1][0] == "data" and out[-1][1] == item.key:  # a run may come in parts
                    out[-1][2].extend(run_datagrams(item))
                else:
                    out.append(("data", item.key, run_datagrams(item)))
            else:
                assert isinstance(item, Frame)
                out.append(("frame", b"", [item.body]))
    return out


def numbered(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def test_a_long_run_of_large_frames_is_one_run_rewritten_throughout() -> None:
    datagrams = [numbered(i, 1400) for i in range(3 * BLOCK_FRAMES + 5)]
    wire = b"".join(encode_data(KEYS[0], d) for d in datagrams)
    decoder = FrameDecoder(min_chunk=1 << 20, max_chunk=1 << 20)
    decoder.feed(wire)
    run = decoder.next_run(SOURCE)
    assert isinstance(run, DataRun) and run.key == KEYS[0] and run.frame_count == len(datagrams)
    assert bytes(run.frames) == b"".join(encode_data(SOURCE, d) for d in datagrams)
    assert decoder.next_run(SOURCE) is NEED_DATA


def test_one_odd_frame_inside_a_block_splits_the_run_exactly_there() -> None:
    for odd_at in (0, 1, BLOCK_FRAMES - 1, BLOCK_FRAMES, BLOCK_FRAMES + 7, 2 * BLOCK_FRAMES - 1):
        for odd in ("other key", "other length", "keepalive"):
            frames = [encode_data(KEYS[0], numbered(i, 1400)) for i in range(2 * BLOCK_FRAMES + 3)]
            if odd == "other key":
                frames[odd_at] = encode_data(KEYS[1], numbered(odd_at, 1400))
            elif odd == "other length":
                frames[odd_at] = encode_data(KEYS[0], numbered(odd_at, 1399))
            else:
                frames[odd_at] = encode_keepalive()
            wire = b"".join(frames)
            assert decode(wire, SOURCE, len(wire)) == reference(wire), (odd_at, odd)
            assert decode(wire, None, len(wire)) == reference(wire), (odd_at, odd)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from([40, 600, 1400, 1452, 9000]), st.integers(1, 150)),
             min_size=1, max_size=6),
    st.sampled_from([1000, 4096, 65536, 1 << 20]),
    st.booleans(),
)
def test_bulk_decoding_matches_the_reference(runs: list[tuple[int, int, int]], read_size: int,
                                             rewrite: bool) -> None:
    wire = b"".join(encode_data(KEYS[k], numbered(i, size)) for k, size, n in runs for i in range(n))
    assert decode(wire, SOURCE if rewrite else None, read_size) == reference(wire)


def test_a_chunk_nobody_holds_a_view_of_is_filled_again() -> None:
    frame = encode_data(KEYS[0], bytes(1000))
    decoder = FrameDecoder(min_chunk=16 * 1024, max_chunk=16 * 1024)
    decoder.feed(frame * 4)
    first_chunk = decoder._buf
    while decoder.next_run() is not NEED_DATA:
        pass  # the runs are dropped at once
    for _ in range(40):  # far more than one chunk holds
        decoder.feed(frame)
        run = decoder.next_run()
        assert isinstance(run, DataRun) and run_datagrams(run) == [bytes(1000)]
        del run
    assert decoder._buf is first_chunk  # filled again from the start, never replaced

    decoder.feed(frame)
    held = decoder.next_run()
    assert isinstance(held, DataRun)
    kept = bytes(held.frames)
    for i in range(40):  # a view is held: the chunk is left alone and a new one taken
        decoder.feed(encode_data(KEYS[1], bytes([i]) * 1000))
        assert decoder.next_run() is not NEED_DATA
    assert decoder._buf is not first_chunk and bytes(held.frames) == kept
