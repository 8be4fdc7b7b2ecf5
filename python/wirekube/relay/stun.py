"""A STUN Binding responder (RFC 5389), so a cluster has a STUN server without the internet.

The wire format is aioice's (:mod:`aioice.stun`); this module adds only the server's decision
(:func:`answer`, pure) and a thin asyncio ``DatagramProtocol``.

A Binding request is answered with XOR-MAPPED-ADDRESS (RFC 5389), MAPPED-ADDRESS (for RFC 3489
clients), SOFTWARE and FINGERPRINT.  The relay has a single address, so a request with a
CHANGE-REQUEST asking for another address or port (RFC 5780) is answered with error 420.
Anything else (responses, indications, other methods, non-STUN bytes) is ignored.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from typing import Final, cast

from aioice import stun

SOFTWARE: Final = "wirekube-relay"
MAGIC_COOKIE: Final = stun.COOKIE
_CHANGE_FLAGS: Final = 0x06  # change IP (0x04) | change port (0x02)

Address = tuple[str, int]


def answer(data: bytes, addr: Address) -> tuple[bytes | None, str]:
    """The reply to one datagram from ``addr`` and a label saying what happened.

    The label is one of ``ok``, ``change_request_refused``, ``not_stun``, ``malformed``,
    ``not_binding_request``.  The reply is ``None`` when nothing should be sent.
    """
    if not _looks_like_stun(data):
        return None, "not_stun"
    try:
        request = stun.parse_message(data)
    except (ValueError, struct.error, IndexError):
        return None, "malformed"
    if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
        return None, "not_binding_request"
    if int(request.attributes.get("CHANGE-REQUEST", 0)) & _CHANGE_FLAGS:
        return _error(request, 420, "Unknown Attribute: no alternate address"), "change_request_refused"
    return _binding_success(request, addr), "ok"


def _looks_like_stun(data: bytes) -> bool:
    """RFC 5389 section 6: the two top bits are zero, the length is a multiple of 4, the cookie
    is present."""
    if len(data) < stun.HEADER_LENGTH or data[0] & 0xC0:
        return False
    length, cookie = struct.unpack_from("!HI", data, 2)
    return bool(length % 4 == 0 and cookie == MAGIC_COOKIE)


def _binding_success(request: stun.Message, addr: Address) -> bytes:
    mapped = (addr[0], addr[1])
    response = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.RESPONSE,
        transaction_id=request.transaction_id,
        attributes={
            "XOR-MAPPED-ADDRESS": mapped,
            "MAPPED-ADDRESS": mapped,
            "SOFTWARE": SOFTWARE,
        },
    )
    response.add_fingerprint()
    return bytes(response)


def _error(request: stun.Message, code: int, reason: str) -> bytes:
    response = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.ERROR,
        transaction_id=request.transaction_id,
        attributes={"ERROR-CODE": (code, reason), "SOFTWARE": SOFTWARE},
    )
    response.add_fingerprint()
    return bytes(response)


class StunResponder(asyncio.DatagramProtocol):
    """Answers Binding requests; ``results`` counts :func:`answer`'s labels."""

    def __init__(self, results: Counter[str]) -> None:
        self.results = results
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's are not subclasses

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply, label = answer(data, addr)
        self.results[label] += 1
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (the client went away); nothing to do but count.
        self.results["send_error"] += 1
