"""The kernel engine spreads a large configuration over several WG_CMD_SET_DEVICE messages.

Found on a real kernel (the lab's kernel nodes): 300 peers with 8 AllowedIPs each in one message
failed in pyroute2's encoder with ``struct.error: ushort format requires 0 <= number <= 65535``
(a netlink attribute's length is 16 bits), so a full pass on a large mesh never reached the kernel.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from wirekube.agent import keys
from wirekube.agent.netlink import decode_wg, encode_wg_set
from wirekube.agent.wg import kernel
from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgPeerConfig
from wirekube.models import Endpoint

PRIV = keys.generate_private_key()


def _peer(i: int, nets: int, v6: bool = False) -> WgPeerConfig:
    allowed = tuple(ipaddress.ip_network(f"fd00:{i}::{j:x}/128" if v6 else f"10.{j % 250}.{i // 250}.{i % 250}/32")
                    for j in range(nets))
    return WgPeerConfig(base64.b64encode(i.to_bytes(2, "big") * 16).decode(), Endpoint.parse("198.19.1.5:51820"),
                        allowed, 1)


def _decode_all(messages: list[list[list[Any]]]) -> list[dict[str, Any]]:
    out = []
    for attrs in messages:
        msg = encode_wg_set(attrs)  # raises if any attribute overflows
        assert len(msg.data) < 64 * 1024
        out.append(decode_wg(msg.data))
    return out


def test_a_small_change_is_one_message_equal_to_the_single_message_form() -> None:
    ops = [SetDevice(private_key=True, listen_port=51820, fwmark=0x574B), PutPeer(_peer(1, 3), create=True),
           RemovePeer(_peer(2, 1).public_key)]
    assert kernel.build_set_messages("wire_kube", ops, PRIV) == [kernel.build_set_attrs("wire_kube", ops, PRIV)]
    assert kernel.build_set_messages("wire_kube", [SetDevice(listen_port=1)], PRIV) == [
        [["WGDEVICE_A_IFNAME", "wire_kube"], ["WGDEVICE_A_LISTEN_PORT", 1]]]


def test_a_large_mesh_is_spread_over_messages_each_encodable_with_every_peer_once() -> None:
    peers = [_peer(i, 8) for i in range(300)]
    ops = [SetDevice(private_key=True, listen_port=51820), *(PutPeer(p, create=True) for p in peers)]
    decoded = _decode_all(kernel.build_set_messages("wire_kube", ops, PRIV))
    assert len(decoded) > 1
    assert decoded[0]["WGDEVICE_A_PRIVATE_KEY"] == PRIV
    assert all("WGDEVICE_A_PRIVATE_KEY" not in m and m["WGDEVICE_A_IFNAME"] == "wire_kube" for m in decoded[1:])
    sent = [p for m in decoded for p in m["WGDEVICE_A_PEERS"]]
    assert [p["WGPEER_A_PUBLIC_KEY"] for p in sent] == [p.public_key for p in peers]  # order kept, none split
    assert all(len(p["WGPEER_A_ALLOWEDIPS"]) == 8 for p in sent)


def test_a_peer_with_more_allowed_ips_than_a_message_holds_is_continued_update_only() -> None:
    big = _peer(7, 3000, v6=True)
    decoded = _decode_all(kernel.build_set_messages("wk", [PutPeer(big, create=True)], PRIV, budget=16 * 1024))
    pieces = [p for m in decoded for p in m["WGDEVICE_A_PEERS"]]
    assert len(pieces) > 1 and all(p["WGPEER_A_PUBLIC_KEY"] == big.public_key for p in pieces)
    first, rest = pieces[0], pieces[1:]
    assert first["WGPEER_A_FLAGS"] == kernel.WGPEER_F_REPLACE_ALLOWEDIPS and "WGPEER_A_ENDPOINT" in first
    for p in rest:  # a continuation adds to the AllowedIPs: never replace, never create, nothing else
        assert p["WGPEER_A_FLAGS"] == kernel.WGPEER_F_UPDATE_ONLY
        assert set(p) == {"WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS", "WGPEER_A_ALLOWEDIPS"}
    assert sum(len(p["WGPEER_A_ALLOWEDIPS"]) for p in pieces) == 3000


def test_the_engine_sends_every_message_in_order() -> None:
    sent: list[list[list[Any]]] = []

    class Recorder:
        def link(self, ifname: str) -> Any:
            return object()

        def create_wireguard_link(self, ifname: str) -> None:
            raise AssertionError("not called")

        def wireguard_get(self, ifname: str) -> list[dict[str, Any]]:
            return []

        def wireguard_set(self, attrs: list[list[Any]]) -> None:
            sent.append(attrs)

    ops = [PutPeer(_peer(i, 8), create=True) for i in range(300)]
    kernel.KernelEngine("wk", Recorder()).apply(ops, PRIV)
    assert sent == kernel.build_set_messages("wk", ops, PRIV) and len(sent) > 1
