"""The relay's sans-I/O framing: round trips, arbitrary splits, runs, errors and a fuzz run."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirekube.relay.protocol import (
    FIXED_BODY_LEN,
    HEADER_LEN,
    KEY_LEN,
    MAX_BODY_LEN,
    MAX_FRAME_LENGTH,
    MIN_BODY_LEN,
    NEED_DATA,
    PROBE_FROM_ALTERNATE_PORT,
    PROBE_FROM_STUN_PORT,
    DataRun,
    Frame,
    FrameDecoder,
    FrameType,
    LocalProtocolError,
    NeedData,
    RemoteProtocolError,
    encode_data,
    encode_error,
    encode_frame,
    encode_nat_probe,
    frame_bounds,
    nat_probe_datagram,
    parse_nat_probe,
    parse_nat_probe_datagram,
    run_datagrams,
    truncate_run,
)

KEYS = st.sampled_from([bytes([i]) * KEY_LEN for i in range(3)])


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    ftype = draw(st.sampled_from(list(FrameType)))
    if ftype is FrameType.DATA:
        body = draw(KEYS) + draw(st.binary(min_size=1, max_size=300))
    elif ftype in (FrameType.ERROR, FrameType.GOAWAY):
        body = draw(st.binary(max_size=100))
    elif ftype in MIN_BODY_LEN:  # the mesh's variable-size frames
        body = draw(st.binary(min_size=MIN_BODY_LEN[ftype], max_size=MIN_BODY_LEN[ftype] + 80))
    else:
        body = draw(st.binary(min_size=FIXED_BODY_LEN[ftype], max_size=FIXED_BODY_LEN[ftype]))
    return Frame(int(ftype), body)


def wire(fs: list[Frame]) -> bytes:
    return b"".join(encode_frame(FrameType(f.type), f.body) for f in fs)


def drain_frames(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (f := decoder.next_frame()) is not NEED_DATA:
        assert isinstance(f, Frame)
        out.append(f)
    return out


def drain_runs(decoder: FrameDecoder) -> list[Frame | DataRun]:
    out: list[Frame | DataRun] = []
    while not isinstance(item := decoder.next_run(), NeedData):
        out.append(item)
    return out


def expand(items: list[Frame | DataRun]) -> list[Frame]:
    out: list[Frame] = []
    for item in items:
        if isinstance(item, DataRun):
            out.extend(Frame(FrameType.DATA, item.key + d) for d in run_datagrams(item))
        else:
            out.append(item)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.lists(frames(), max_size=20))
def test_round_trip(fs: list[Frame]) -> None:
    decoder = FrameDecoder()
    decoder.feed(wire(fs))
    assert drain_frames(decoder) == fs
    assert decoder.buffered == 0


@given(st.lists(frames(), min_size=1, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_split_anywhere(fs: list[Frame], cuts: list[int]) -> None:
    decoder = FrameDecoder()
    got: list[Frame] = []
    for piece in split(wire(fs), cuts):
        decoder.feed(piece)
        got.extend(drain_frames(decoder))
    assert got == fs


@given(st.lists(frames(), min_size=1, max_size=30), st.lists(st.integers(min_value=0), max_size=30))
def test_runs_carry_the_same_frames_as_single_frames(fs: list[Frame], cuts: list[int]) -> None:
    decoder = FrameDecoder()
    items: list[Frame | DataRun] = []
    for piece in split(wire(fs), cuts):
        decoder.feed(piece)
        items.extend(drain_runs(decoder))
    assert expand(items) == fs
    for item in items:
        if isinstance(item, DataRun):
            # every frame of a run carries the run's key, and the count is right
            bounds = frame_bounds(item.frames)
            assert len(bounds) == item.frame_count
            assert all(item.frames[a + HEADER_LEN : a + HEADER_LEN + KEY_LEN] == item.key for a, _ in bounds)


def test_consecutive_data_for_one_key_is_one_run() -> None:
    a, b = b"a" * KEY_LEN, b"b" * KEY_LEN
    decoder = FrameDecoder()
    decoder.feed(encode_data(a, b"1") + encode_data(a, b"22") + encode_data(b, b"3") + encode_data(a, b"4"))
    items = drain_runs(decoder)
    assert [(i.key, run_datagrams(i)) for i in items if isinstance(i, DataRun)] == [
        (a, [b"1", b"22"]),
        (b, [b"3"]),
        (a, [b"4"]),
    ]


def test_rewrite_swaps_the_key_and_keeps_length() -> None:
    dest, other, src = b"d" * KEY_LEN, b"o" * KEY_LEN, b"s" * KEY_LEN
    decoder = FrameDecoder()
    inbound = encode_data(dest, b"x" * 10) + encode_data(dest, b"y" * 3) + encode_data(other, b"z")
    decoder.feed(inbound)
    run = decoder.next_run(rewrite=src)
    assert isinstance(run, DataRun)
    assert run.key == dest and run.frame_count == 2
    assert bytes(run.frames) == encode_data(src, b"x" * 10) + encode_data(src, b"y" * 3)
    nxt = decoder.next_run(rewrite=src)
    assert isinstance(nxt, DataRun) and nxt.key == other and bytes(nxt.frames) == encode_data(src, b"z")


@given(st.lists(frames(), max_size=30), st.lists(st.integers(min_value=0), max_size=10))
def test_rewritten_runs_equal_the_input_with_the_key_replaced(fs: list[Frame], cuts: list[int]) -> None:
    """Whatever the mix of sizes, keys and control frames, and wherever the stream is split."""
    src = b"S" * KEY_LEN
    expected = [Frame(f.type, src + f.body[KEY_LEN:]) if f.type == FrameType.DATA else f for f in fs]
    decoder = FrameDecoder(min_chunk=256, max_chunk=1024)  # small chunks: frames straddle them
    got: list[Frame] = []
    for piece in split(wire(fs), cuts):
        decoder.feed(piece)
        while (item := decoder.next_run(rewrite=src)) is not NEED_DATA:
            if isinstance(item, DataRun):
                frames = bytes(item.frames)
                got.extend(Frame(FrameType.DATA, frames[a + HEADER_LEN : b]) for a, b in frame_bounds(frames))
            else:
                got.append(item)  # type: ignore[arg-type]
    assert got == expected


@st.composite
def uniform_streams(draw: st.DrawFn) -> list[Frame]:
    """Long stretches of same-size, same-key Data (the block path), broken up now and then."""
    out: list[Frame] = []
    for _ in range(draw(st.integers(1, 4))):
        key = draw(KEYS)
        size = draw(st.sampled_from([1, 63, 100, 400, 475, 476, 600]))  # datagram bytes
        count = draw(st.integers(1, 200))
        payload = draw(st.sampled_from([b"\x00", b"\x02", b"k", b"\x00\x00\x00\x89\x02" + bytes(range(32))]))
        datagram = (payload * size)[:size]  # some payloads mimic a frame prefix on purpose
        out += [Frame(FrameType.DATA, key + datagram)] * count
        if draw(st.booleans()):
            out.append(draw(frames()))
    return out


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(uniform_streams(), st.lists(st.integers(min_value=0), max_size=6))
def test_block_rewrite_equals_the_input_with_the_key_replaced(fs: list[Frame], cuts: list[int]) -> None:
    src = b"S" * KEY_LEN
    expected = [Frame(f.type, src + f.body[KEY_LEN:]) if f.type == FrameType.DATA else f for f in fs]
    decoder = FrameDecoder()
    got: list[Frame] = []
    for piece in split(wire(fs), cuts):
        decoder.feed(piece)
        while (item := decoder.next_run(rewrite=src)) is not NEED_DATA:
            if isinstance(item, DataRun):
                data = bytes(item.frames)
                assert len(frame_bounds(data)) == item.frame_count
                got.extend(Frame(FrameType.DATA, data[a + HEADER_LEN : b]) for a, b in frame_bounds(data))
            else:
                got.append(item)  # type: ignore[arg-type]
    assert got == expected


def test_block_path_stops_exactly_where_a_frame_differs() -> None:
    key, other, src = b"k" * KEY_LEN, b"o" * KEY_LEN, b"S" * KEY_LEN
    stream = [encode_data(key, bytes([i % 251]) * 100) for i in range(200)]
    stream[130] = encode_data(other, b"x" * 100)  # same length, other key, inside the third block
    decoder = FrameDecoder()
    decoder.feed(b"".join(stream))
    counts: list[tuple[bytes, int]] = []
    while (item := decoder.next_run(rewrite=src)) is not NEED_DATA:
        assert isinstance(item, DataRun)
        if counts and counts[-1][0] == item.key:  # a key's frames may come in several runs
            counts[-1] = (item.key, counts[-1][1] + item.frame_count)
        else:
            counts.append((item.key, item.frame_count))
    assert counts == [(key, 130), (other, 1), (key, 69)]


def test_views_stay_valid_after_more_data_arrives() -> None:
    """A run is a view of the buffer; later reads must never overwrite it."""
    key = b"k" * KEY_LEN
    decoder = FrameDecoder(min_chunk=256, max_chunk=256)
    decoder.feed(encode_data(key, b"first" * 10))
    run = decoder.next_run()
    assert isinstance(run, DataRun)
    kept = bytes(run.frames)
    for i in range(50):  # many new chunks, partial frames carried over
        decoder.feed(encode_data(key, bytes([i]) * 100)[:70])
        decoder.feed(encode_data(key, bytes([i]) * 100)[70:])
        assert decoder.next_run() is not NEED_DATA
    assert bytes(run.frames) == kept


def test_reading_straight_into_the_buffer() -> None:
    key = b"k" * KEY_LEN
    wire_bytes = encode_data(key, b"a" * 500) + encode_data(key, b"b" * 500)
    decoder = FrameDecoder(min_chunk=400, max_chunk=400)
    got: list[bytes] = []
    pos = 0
    while pos < len(wire_bytes):
        view = decoder.get_buffer()
        assert len(view) >= 100  # a quarter of the chunk at least
        n = min(len(view), 333, len(wire_bytes) - pos)
        view[:n] = wire_bytes[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n
        while (item := decoder.next_run()) is not NEED_DATA:
            assert isinstance(item, DataRun)
            got.extend(run_datagrams(item))
    assert got == [b"a" * 500, b"b" * 500]
    with pytest.raises(LocalProtocolError, match="beyond the free space"):
        decoder.buffer_updated(10**9)


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=10), st.integers(0, 800))
def test_truncate_run_keeps_whole_frames_within_the_limit(datagrams: list[bytes], limit: int) -> None:
    key = b"k" * KEY_LEN
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_data(key, d) for d in datagrams))
    run = decoder.next_run()
    assert isinstance(run, DataRun)
    kept, cut = truncate_run(run, limit)
    assert len(kept.frames) <= max(limit, 0) or cut == 0
    assert run_datagrams(kept) == datagrams[: len(datagrams) - cut]
    assert kept.frame_count + cut == run.frame_count == len(datagrams)
    # it kept as many frames as fit
    sizes = [HEADER_LEN + KEY_LEN + len(d) for d in datagrams]
    assert sum(sizes[: kept.frame_count]) <= limit or cut == 0
    if cut:
        assert sum(sizes[: kept.frame_count + 1]) > limit


def test_largest_frame_is_accepted() -> None:
    body = b"k" * KEY_LEN + b"x" * (MAX_BODY_LEN - KEY_LEN)
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.DATA, body))
    assert decoder.next_frame() == Frame(FrameType.DATA, body)


def test_chunks_grow_under_bulk_reads_and_shrink_when_quiet() -> None:
    decoder = FrameDecoder(min_chunk=1024, max_chunk=16 * 1024)
    key = b"k" * KEY_LEN
    frame = encode_data(key, b"x" * 200)
    for _ in range(12):  # reads that fill whatever is offered
        view = decoder.get_buffer()
        n = len(view) - len(view) % len(frame)
        view[:n] = frame * (n // len(frame))
        decoder.buffer_updated(n)
        while decoder.next_run() is not NEED_DATA:
            pass
    assert decoder.capacity == 16 * 1024
    for _ in range(12):  # then a trickle
        decoder.get_buffer()[: len(frame)] = frame
        decoder.buffer_updated(len(frame))
        assert decoder.next_run() is not NEED_DATA
    decoder.get_buffer()
    assert decoder.capacity <= 2 * 1024


# What each refusal reason says (the start of its message).
SAYS = {"zero_length": "frame length is zero", "oversized": "exceeds", "unknown_type": "unknown frame type",
        "bad_length": "body must be"}


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (struct.pack(">IB", 0, 2), "zero_length"),
        (struct.pack(">IB", MAX_FRAME_LENGTH + 1, 2), "oversized"),
        (struct.pack(">IB", 0xFFFFFFFF, 2), "oversized"),
        (struct.pack(">IB", 5, 0x42), "unknown_type"),
        (struct.pack(">IB", 5, 0x05), "unknown_type"),
        (struct.pack(">IB", 32, FrameType.REGISTER), "bad_length"),
        (struct.pack(">IB", 33, FrameType.DATA), "bad_length"),
        (struct.pack(">IB", 2, FrameType.KEEPALIVE), "bad_length"),
    ],
)
def test_bad_headers_are_refused_before_the_body_arrives(header: bytes, reason: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(header)  # only the header: a cap on an incomplete frame is enforced up front
    with pytest.raises(RemoteProtocolError, match=SAYS[reason]) as e:
        decoder.next_frame()
    assert e.value.reason == reason
    decoder.feed(encode_frame(FrameType.KEEPALIVE))
    with pytest.raises(RemoteProtocolError, match=SAYS[reason]):  # the stream position is lost: it stays broken
        decoder.next_frame()


def test_bad_frame_after_a_run_is_reported_on_the_next_call() -> None:
    key = b"k" * KEY_LEN
    decoder = FrameDecoder()
    decoder.feed(encode_data(key, b"ok") + struct.pack(">IB", 0, 2))
    run = decoder.next_run()
    assert isinstance(run, DataRun) and run_datagrams(run) == [b"ok"]
    with pytest.raises(RemoteProtocolError, match="frame length is zero"):
        decoder.next_run()


def test_partial_header_needs_data() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is NEED_DATA
    assert decoder.next_run() is NEED_DATA


@pytest.mark.parametrize(
    ("ftype", "body", "reason"),
    [
        (FrameType.DATA, b"k" * (MAX_BODY_LEN + 1), "oversized"),
        (FrameType.DATA, b"k" * KEY_LEN, "bad_length"),
        (FrameType.REGISTER, b"k" * 31, "bad_length"),
        (FrameType.AUTH, b"", "bad_length"),
        (0x42, b"", "unknown_type"),
    ],
)
def test_encoding_invalid_frames_is_our_error(ftype: int, body: bytes, reason: str) -> None:
    with pytest.raises(LocalProtocolError, match=SAYS[reason]) as e:
        encode_frame(ftype, body)  # type: ignore[arg-type]
    assert e.value.reason == reason


def test_data_key_must_be_32_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="key must be 32 bytes, not 5"):
        encode_data(b"short", b"x")


def test_error_reason_is_truncated_to_one_frame() -> None:
    frame = encode_error("é" * 70000)
    assert len(frame) == HEADER_LEN + MAX_BODY_LEN


def test_nat_probe_body_round_trip() -> None:
    frame = encode_nat_probe("203.0.113.9", 51820)
    address, port = parse_nat_probe(frame[HEADER_LEN:])
    assert (str(address), port) == ("203.0.113.9", 51820)
    with pytest.raises(LocalProtocolError, match="needs an IPv4 address"):
        encode_nat_probe("::1", 1)
    with pytest.raises(LocalProtocolError, match="port 0 out of range"):
        encode_nat_probe("192.0.2.1", 0)


def test_nat_probe_datagrams_say_which_port_sent_them() -> None:
    assert parse_nat_probe_datagram(nat_probe_datagram(PROBE_FROM_STUN_PORT)) == PROBE_FROM_STUN_PORT
    assert parse_nat_probe_datagram(nat_probe_datagram(PROBE_FROM_ALTERNATE_PORT)) == PROBE_FROM_ALTERNATE_PORT
    assert parse_nat_probe_datagram(b"WKNP\x01\x07") is None
    assert parse_nat_probe_datagram(b"\x01\x00\x00\x00" * 8) is None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=12), st.booleans())
def test_fuzz_decoder_only_returns_frames_or_raises_remote_error(chunks: list[bytes], runs: bool) -> None:
    """Arbitrary bytes: the decoder never raises anything but RemoteProtocolError, never returns a
    frame it did not receive, and never holds more than what was fed."""
    decoder = FrameDecoder()
    fed = consumed = 0
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            fed += len(chunk)
            for item in drain_runs(decoder) if runs else drain_frames(decoder):
                consumed += len(item.frames) if isinstance(item, DataRun) else HEADER_LEN + len(item.body)
            assert consumed + decoder.buffered == fed
    except RemoteProtocolError as e:
        assert e.reason in {"zero_length", "oversized", "unknown_type", "bad_length"}


@settings(max_examples=200)
@given(st.lists(frames(), max_size=5), st.binary(min_size=1, max_size=64))
def test_fuzz_valid_prefix_then_garbage(fs: list[Frame], garbage: bytes) -> None:
    """Frames before garbage are all delivered intact whatever the garbage is."""
    decoder = FrameDecoder()
    decoder.feed(wire(fs) + garbage)
    got: list[Frame] = []
    try:
        while (f := decoder.next_frame()) is not NEED_DATA:
            got.append(f)  # type: ignore[arg-type]
    except RemoteProtocolError:
        pass
    assert got[: len(fs)] == fs
