"""The test SpecClient (relay_support.py) frames exactly what the protocol text says."""

from __future__ import annotations

from tests.integration.relay_support import DATA, KEEPALIVE, frame


def test_spec_client_frames_match_the_protocol_text() -> None:
    assert frame(KEEPALIVE) == b"\x00\x00\x00\x01\x03"
    assert frame(DATA, b"k" * 32 + b"x") == b"\x00\x00\x00\x22\x02" + b"k" * 32 + b"x"
