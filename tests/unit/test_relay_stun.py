"""The STUN responder's decision function (wire format from aioice)."""

from __future__ import annotations

import struct

from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from wirekube.relay.stun import answer

CLIENT = ("198.51.100.7", 40123)


def binding_request(**attributes: object) -> stun.Message:
    return stun.Message(stun.Method.BINDING, stun.Class.REQUEST, attributes=dict(attributes))


def test_binding_request_gets_its_mapped_address() -> None:
    request = binding_request()
    reply, label = answer(bytes(request), CLIENT)
    assert label == "ok" and reply is not None
    response = stun.parse_message(reply)  # also checks FINGERPRINT
    assert response.message_class == stun.Class.RESPONSE
    assert response.transaction_id == request.transaction_id
    assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert response.attributes["MAPPED-ADDRESS"] == CLIENT
    assert "FINGERPRINT" in response.attributes


def test_xor_mapped_address_is_really_xored_on_the_wire() -> None:
    reply, _ = answer(bytes(binding_request()), CLIENT)
    assert reply is not None
    port_plain = struct.pack("!H", CLIENT[1])
    xport = struct.pack("!H", CLIENT[1] ^ (stun.COOKIE >> 16))
    attr_at = reply.index(struct.pack("!HH", 0x0020, 8))  # XOR-MAPPED-ADDRESS, IPv4
    assert reply[attr_at + 6 : attr_at + 8] == xport != port_plain


def test_ipv6_client() -> None:
    reply, label = answer(bytes(binding_request()), ("2001:db8::5", 3478))
    assert label == "ok" and reply is not None
    assert stun.parse_message(reply).attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::5", 3478)


def test_change_request_is_refused_with_420() -> None:
    reply, label = answer(bytes(binding_request(**{"CHANGE-REQUEST": 0x06})), CLIENT)
    assert label == "change_request_refused" and reply is not None
    assert stun.parse_message(reply).error_code == 420


def test_change_request_without_flags_is_a_plain_binding() -> None:
    reply, label = answer(bytes(binding_request(**{"CHANGE-REQUEST": 0})), CLIENT)
    assert label == "ok" and reply is not None


def test_responses_indications_and_noise_are_ignored() -> None:
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)
    indication = stun.Message(stun.Method.BINDING, stun.Class.INDICATION)
    allocate = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)
    assert answer(bytes(response), CLIENT) == (None, "not_binding_request")
    assert answer(bytes(indication), CLIENT) == (None, "not_binding_request")
    assert answer(bytes(allocate), CLIENT) == (None, "not_binding_request")
    assert answer(b"\x01\x00", CLIENT) == (None, "not_stun")
    no_cookie = bytearray(bytes(binding_request()))
    no_cookie[4:8] = b"\x00\x00\x00\x00"  # an RFC 3489 request
    assert answer(bytes(no_cookie), CLIENT) == (None, "not_stun")


def test_bad_fingerprint_is_malformed() -> None:
    request = binding_request()
    request.add_fingerprint()
    data = bytearray(bytes(request))
    data[-1] ^= 0xFF
    assert answer(bytes(data), CLIENT) == (None, "malformed")


@settings(max_examples=500)
@given(st.binary(min_size=0, max_size=120))
def test_fuzz_answer_never_raises(tail: bytes) -> None:
    """Bytes that pass the cheap STUN checks (cookie, length) but are otherwise arbitrary."""
    body = tail[: len(tail) - len(tail) % 4]
    data = struct.pack("!HHI", 0x0001, len(body), stun.COOKIE) + b"t" * 12 + body
    reply, label = answer(data, CLIENT)
    assert label in {"ok", "malformed", "not_binding_request", "change_request_refused"}
    assert (reply is None) == (label in {"malformed", "not_binding_request"})
