"""The kernel engine: in-kernel WireGuard configured over generic netlink.

Message *content* is built and parsed here as plain data (pyroute2's NLA notation: lists of
``[name, value]``); :mod:`wirekube.agent.netlink` encodes and sends it, being the only module that
imports pyroute2.  :func:`build_set_attrs` and :func:`parse_device` are pure and unit-tested.

A kernel WireGuard link lives without any daemon, so the agent exiting leaves it in place and a
restarted agent adopts it by name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

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
from wirekube.errors import DataplaneError
from wirekube.models import Endpoint, IPNetwork

WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4

MESSAGE_BUDGET = 32 * 1024
"""Bytes of peer attributes per WG_CMD_SET_DEVICE message.  A netlink attribute's length is 16
bits, so one message cannot carry a large mesh (300 peers with 8 AllowedIPs each failed to
encode); like wg(8), :func:`build_set_messages` spreads peers over several messages and
continues a peer whose AllowedIPs do not fit in the next one."""
# Encoded sizes (attribute header 4 bytes, payload padded to 4).
_KEY_ATTR = 4 + 32
_U32_ATTR = 8
_U16_ATTR = 8
_NEST = 4
_ENDPOINT_ATTR = {4: 4 + 16, 6: 4 + 28}
_ALLOWED_IP = {4: _NEST + 8 + (4 + 4) + 8, 6: _NEST + 8 + (4 + 16) + 8}


class KernelNetlink(Protocol):
    """The part of :class:`wirekube.agent.netlink.Netlink` this engine uses."""

    def link(self, ifname: str) -> Any: ...
    def create_wireguard_link(self, ifname: str) -> None: ...
    def wireguard_get(self, ifname: str) -> list[dict[str, Any]]: ...
    def wireguard_set(self, attrs: list[list[Any]]) -> None: ...


def build_set_attrs(ifname: str, ops: Sequence[WgOp], private_key: str) -> list[list[Any]]:
    """The WG_CMD_SET_DEVICE attributes applying ``ops`` (one message, in order)."""
    attrs: list[list[Any]] = [["WGDEVICE_A_IFNAME", ifname]]
    peers: list[dict[str, Any]] = []
    for op in ops:
        if isinstance(op, SetDevice):
            if op.private_key:
                attrs.append(["WGDEVICE_A_PRIVATE_KEY", private_key])
            if op.listen_port is not None:
                attrs.append(["WGDEVICE_A_LISTEN_PORT", op.listen_port])
            if op.fwmark is not None:
                attrs.append(["WGDEVICE_A_FWMARK", op.fwmark])
        elif isinstance(op, RemovePeer):
            peers.append({"attrs": [["WGPEER_A_PUBLIC_KEY", op.public_key], ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]})
        else:
            peers.append({"attrs": _peer_attrs(op)})
    if peers:
        attrs.append(["WGDEVICE_A_PEERS", peers])
    return attrs


def build_set_messages(ifname: str, ops: Sequence[WgOp], private_key: str,
                       budget: int = MESSAGE_BUDGET) -> list[list[list[Any]]]:
    """``ops`` as one or more WG_CMD_SET_DEVICE attribute lists, in order, each message's peers
    within ``budget`` bytes; device-wide values go in the first message.  A peer whose
    AllowedIPs exceed the budget is continued in later messages (same key, update-only, no
    replace flag), as the kernel's interface allows."""
    device: list[list[Any]] = [["WGDEVICE_A_IFNAME", ifname]]
    peers: list[tuple[dict[str, Any], int]] = []
    for op in ops:
        if isinstance(op, SetDevice):
            device += build_set_attrs(ifname, [op], private_key)[1:]
        elif isinstance(op, RemovePeer):
            peers.append(({"attrs": [["WGPEER_A_PUBLIC_KEY", op.public_key], ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]},
                          _NEST + _KEY_ATTR + _U32_ATTR))
        else:
            peers += _peer_chunks(op, budget)
    batches: list[list[dict[str, Any]]] = []
    used = budget + 1
    for peer, size in peers:
        if used + size > budget:
            batches.append([])
            used = 0
        batches[-1].append(peer)
        used += size
    messages: list[list[list[Any]]] = []
    for i, batch in enumerate(batches or [[]]):
        attrs: list[list[Any]] = list(device) if i == 0 else [["WGDEVICE_A_IFNAME", ifname]]
        if batch:
            attrs.append(["WGDEVICE_A_PEERS", batch])
        messages.append(attrs)
    return messages


def _peer_chunks(op: PutPeer, budget: int) -> list[tuple[dict[str, Any], int]]:
    """One peer's attributes, split over as many pieces as its AllowedIPs need."""
    attrs = _peer_attrs(op)
    allowed = [a for a in attrs if a[0] == "WGPEER_A_ALLOWEDIPS"]
    head = [a for a in attrs if a[0] != "WGPEER_A_ALLOWEDIPS"]
    cfg = op.config
    size = _NEST + _KEY_ATTR + _U32_ATTR
    if op.set_endpoint and cfg.endpoint is not None:
        size += _ENDPOINT_ATTR[cfg.endpoint.ip.version]
    if op.set_keepalive:
        size += _U16_ATTR
    if not allowed:
        return [({"attrs": head}, size)]
    nets = list(cfg.allowed_ips)
    chunks: list[tuple[dict[str, Any], int]] = []
    first = True
    while True:
        base = size if first else _NEST + _KEY_ATTR + _U32_ATTR
        room = budget - base - _NEST
        take: list[IPNetwork] = []
        while nets and (not take or _ALLOWED_IP[nets[0].version] <= room):
            room -= _ALLOWED_IP[nets[0].version]
            take.append(nets.pop(0))
        piece_head: list[list[Any]] = head if first else [
            ["WGPEER_A_PUBLIC_KEY", cfg.public_key], ["WGPEER_A_FLAGS", WGPEER_F_UPDATE_ONLY]]
        piece = [*piece_head, ["WGPEER_A_ALLOWEDIPS", [_allowed_ip(n) for n in take]]]
        chunks.append(({"attrs": piece}, base + _NEST + sum(_ALLOWED_IP[n.version] for n in take)))
        first = False
        if not nets:
            return chunks


def _peer_attrs(op: PutPeer) -> list[list[Any]]:
    cfg = op.config
    flags = (0 if op.create else WGPEER_F_UPDATE_ONLY) | (WGPEER_F_REPLACE_ALLOWEDIPS if op.set_allowed_ips else 0)
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", cfg.public_key], ["WGPEER_A_FLAGS", flags]]
    if op.set_endpoint and cfg.endpoint is not None:
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": str(cfg.endpoint.ip), "port": cfg.endpoint.port}])
    if op.set_keepalive:
        attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", cfg.persistent_keepalive])
    if op.set_allowed_ips:
        attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip(n) for n in cfg.allowed_ips]])
    return attrs


def _allowed_ip(net: IPNetwork) -> dict[str, Any]:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
            ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
        ]
    }


def parse_device(messages: Sequence[Mapping[str, Any]]) -> WgDeviceState:
    """WG_CMD_GET_DEVICE answers (plain dicts; large devices span several messages)."""
    if not messages:
        raise DataplaneError("wireguard get returned no message")
    first = messages[0]
    peers: dict[str, WgPeerState] = {}
    for msg in messages:
        for p in msg.get("WGDEVICE_A_PEERS", []):
            state = _peer_state(p)
            old = peers.get(state.config.public_key)
            if old is not None:  # a peer continued from the previous message: merge AllowedIPs
                merged = sorted_nets((*old.config.allowed_ips, *state.config.allowed_ips))
                state = WgPeerState(
                    WgPeerConfig(old.config.public_key, old.config.endpoint, merged, old.config.persistent_keepalive),
                    old.rx_bytes,
                    old.tx_bytes,
                    old.last_handshake,
                )
            peers[state.config.public_key] = state
    public = first.get("WGDEVICE_A_PUBLIC_KEY")
    has_private = bool(first.get("WGDEVICE_A_PRIVATE_KEY")) and first.get("WGDEVICE_A_PRIVATE_KEY") != "A" * 43 + "="
    return WgDeviceState(
        public_key=public if public and has_private else None,
        listen_port=int(first.get("WGDEVICE_A_LISTEN_PORT", 0)),
        fwmark=int(first.get("WGDEVICE_A_FWMARK", 0)),
        peers=peers,
    )


def _peer_state(p: Mapping[str, Any]) -> WgPeerState:
    ep = p.get("WGPEER_A_ENDPOINT")
    endpoint = None
    if ep and ep.get("addr") and ep.get("port"):
        endpoint = Endpoint(ipaddress.ip_address(ep["addr"]), int(ep["port"]))
    nets = [_allowed_from(a) for a in p.get("WGPEER_A_ALLOWEDIPS", [])]
    hs = p.get("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
    sec = int(hs.get("tv_sec", 0))
    return WgPeerState(
        config=WgPeerConfig(
            public_key=p["WGPEER_A_PUBLIC_KEY"],
            endpoint=endpoint,
            allowed_ips=sorted_nets(nets),
            persistent_keepalive=int(p.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 0)),
        ),
        rx_bytes=int(p.get("WGPEER_A_RX_BYTES", 0)),
        tx_bytes=int(p.get("WGPEER_A_TX_BYTES", 0)),
        last_handshake=sec + int(hs.get("tv_nsec", 0)) / 1e9 if sec else 0.0,
    )


def _allowed_from(a: Mapping[str, Any]) -> IPNetwork:
    family = a["WGALLOWEDIP_A_FAMILY"]
    raw = a["WGALLOWEDIP_A_IPADDR"]
    packed = bytes.fromhex(raw.replace(":", "")) if isinstance(raw, str) else bytes(raw)
    addr = socket.inet_ntop(family, packed)
    return ipaddress.ip_network(f"{addr}/{a['WGALLOWEDIP_A_CIDR_MASK']}", strict=False)


class KernelEngine:
    name = "kernel"
    reason = ""
    """Why this engine was picked (set by :func:`wirekube.agent.wg.select.select_engine`)."""

    def __init__(self, ifname: str, netlink: KernelNetlink) -> None:
        self.ifname = ifname
        self._nl = netlink

    def ensure_device(self) -> bool:
        if self._nl.link(self.ifname) is not None:
            return False
        self._nl.create_wireguard_link(self.ifname)
        return True

    def get(self) -> WgDeviceState:
        return parse_device(self._nl.wireguard_get(self.ifname))

    def apply(self, ops: Sequence[WgOp], private_key: str) -> None:
        if ops:
            for attrs in build_set_messages(self.ifname, ops, private_key):
                self._nl.wireguard_set(attrs)

    def set_on_restart(self, callback: Callable[[], None]) -> None:
        """Kernel links have no daemon that could die; nothing to watch."""

    def close(self) -> None:
        pass
