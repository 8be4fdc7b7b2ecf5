"""wireguard-go's cross-platform UAPI text protocol (https://www.wireguard.com/xplatform/).

A request is ``get=1`` or ``set=1`` followed by ``key=value`` lines and a blank line; the answer
to ``get`` is the same kind of lines, and every answer ends with ``errno=N`` and a blank line.
Keys travel as lowercase hex.

Pure module: encoding and parsing only; the socket lives in :mod:`wirekube.agent.wg.userspace`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Iterable, Sequence
from typing import cast

from wirekube.agent.keys import public_key_of
from wirekube.agent.wg.base import (
    PutPeer,
    RemovePeer,
    SetDevice,
    WgDeviceState,
    WgOp,
    WgPeerConfig,
    WgPeerState,
    sorted_nets,
)
from wirekube.models import Endpoint, IPNetwork

GET_REQUEST = b"get=1\n\n"
ZERO_KEY_HEX = "0" * 64


class UapiProtocolError(ValueError):
    """The daemon's answer does not follow the protocol."""


def key_to_hex(key_b64: str) -> str:
    return base64.b64decode(key_b64).hex()


def hex_to_key(hex_key: str) -> str:
    try:
        raw = binascii.unhexlify(hex_key)
    except binascii.Error:
        raise UapiProtocolError(f"key is not hex: {hex_key[:8]}...") from None
    if len(raw) != 32:
        raise UapiProtocolError(f"key has {len(raw)} bytes, expected 32")
    return base64.b64encode(raw).decode()


def encode_set(ops: Sequence[WgOp], private_key: str) -> bytes:
    """One ``set=1`` transaction applying ``ops`` in order."""
    lines = ["set=1"]
    for op in ops:
        lines.extend(_op_lines(op, private_key))
    return ("\n".join(lines) + "\n\n").encode()


def _op_lines(op: WgOp, private_key: str) -> Iterable[str]:
    if isinstance(op, SetDevice):
        if op.private_key:
            yield f"private_key={key_to_hex(private_key)}"
        if op.listen_port is not None:
            yield f"listen_port={op.listen_port}"
        if op.fwmark is not None:
            yield f"fwmark={op.fwmark}"
    elif isinstance(op, RemovePeer):
        yield f"public_key={key_to_hex(op.public_key)}"
        yield "remove=true"
    else:
        yield from _put_peer_lines(op)


def _put_peer_lines(op: PutPeer) -> Iterable[str]:
    cfg = op.config
    yield f"public_key={key_to_hex(cfg.public_key)}"
    if not op.create:
        yield "update_only=true"
    if op.set_endpoint and cfg.endpoint is not None:
        yield f"endpoint={cfg.endpoint}"
    if op.set_keepalive:
        yield f"persistent_keepalive_interval={cfg.persistent_keepalive}"
    if op.set_allowed_ips:
        yield "replace_allowed_ips=true"
        for net in cfg.allowed_ips:
            yield f"allowed_ip={net}"


def parse_errno(answer: bytes) -> int:
    """The errno of a ``set`` answer."""
    for line in answer.decode(errors="replace").splitlines():
        if line.startswith("errno="):
            try:
                return int(line[6:])
            except ValueError:
                raise UapiProtocolError(f"bad errno line {line!r}") from None
    raise UapiProtocolError("answer has no errno line")


def parse_get(answer: bytes) -> WgDeviceState:
    """Parse the answer to ``get=1`` into the device state."""
    device: dict[str, str] = {}
    peers: list[dict[str, object]] = []
    errno: int | None = None
    for line in answer.decode(errors="replace").splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiProtocolError(f"line without '=': {line[:40]!r}")
        if key == "errno":
            errno = int(value) if value.lstrip("-").isdigit() else -1
        elif key == "public_key":
            peers.append({"public_key": value, "allowed_ip": []})
        elif key == "allowed_ip" and peers:
            cast(list[str], peers[-1]["allowed_ip"]).append(value)
        elif peers:
            peers[-1][key] = value
        else:
            device[key] = value
    if errno is None:
        raise UapiProtocolError("answer has no errno line")
    if errno != 0:
        raise UapiProtocolError(f"get failed with errno={errno}")
    return _device_state(device, peers)


def _device_state(device: dict[str, str], peers: list[dict[str, object]]) -> WgDeviceState:
    private_hex = device.get("private_key", "")
    public_key = public_key_of(hex_to_key(private_hex)) if private_hex and private_hex != ZERO_KEY_HEX else None
    states = [_peer_state(p) for p in peers]
    return WgDeviceState(
        public_key=public_key,
        listen_port=_int(device.get("listen_port", "0"), "listen_port"),
        fwmark=_int(device.get("fwmark", "0"), "fwmark"),
        peers={s.config.public_key: s for s in states},
    )


def _peer_state(p: dict[str, object]) -> WgPeerState:
    endpoint_text = str(p.get("endpoint", ""))
    try:
        endpoint = Endpoint.parse(endpoint_text) if endpoint_text else None
    except ValueError:
        raise UapiProtocolError(f"bad endpoint {endpoint_text!r}") from None
    nets: list[IPNetwork] = []
    for text in cast(list[str], p["allowed_ip"]):
        try:
            nets.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError:
            raise UapiProtocolError(f"bad allowed_ip {text!r}") from None
    sec = _int(str(p.get("last_handshake_time_sec", "0")), "last_handshake_time_sec")
    nsec = _int(str(p.get("last_handshake_time_nsec", "0")), "last_handshake_time_nsec")
    return WgPeerState(
        config=WgPeerConfig(
            public_key=hex_to_key(str(p["public_key"])),
            endpoint=endpoint,
            allowed_ips=sorted_nets(nets),
            persistent_keepalive=_int(str(p.get("persistent_keepalive_interval", "0")), "keepalive"),
        ),
        rx_bytes=_int(str(p.get("rx_bytes", "0")), "rx_bytes"),
        tx_bytes=_int(str(p.get("tx_bytes", "0")), "tx_bytes"),
        last_handshake=sec + nsec / 1e9 if sec else 0.0,
    )


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UapiProtocolError(f"{what} is not an integer: {text!r}") from None
