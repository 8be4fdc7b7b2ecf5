"""WireGuard engines at the message level: wireguard-go's UAPI text and kernel netlink attributes."""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
from pathlib import Path

import pytest

from wirekube.agent import keys
from wirekube.agent.netlink import decode_wg, encode_wg_set
from wirekube.agent.wg import kernel, uapi
from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgPeerConfig
from wirekube.agent.wg.select import describe_engine, select_engine
from wirekube.agent.wg.userspace import UserspaceSettings
from wirekube.models import Endpoint, Engine

PRIV = keys.generate_private_key()
PEER = base64.b64encode(bytes(range(32))).decode()
CFG = WgPeerConfig(
    PEER,
    Endpoint.parse("192.168.77.11:51820"),
    (ipaddress.ip_network("10.254.0.7/32"), ipaddress.ip_network("10.8.0.0/24")),
    25,
)

# Captured from `wg set` + `get=1` against wireguard-go 0.0.20220316 (keys replaced).
GET_ANSWER = (
    "private_key={priv}\nlisten_port=51820\nfwmark=22347\n"
    "public_key={peer}\npreshared_key={zero}\nprotocol_version=1\nendpoint=10.1.1.1:51820\n"
    "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
    "tx_bytes=400\nrx_bytes=308\npersistent_keepalive_interval=25\n"
    "allowed_ip=10.9.0.1/32\nallowed_ip=10.8.0.0/24\nerrno=0\n\n"
).format(priv=uapi.key_to_hex(PRIV), peer=PEER.encode() and bytes(range(32)).hex(), zero="0" * 64)


def test_uapi_get_is_parsed() -> None:
    dev = uapi.parse_get(GET_ANSWER.encode())
    assert dev.public_key == keys.public_key_of(PRIV)
    assert (dev.listen_port, dev.fwmark) == (51820, 0x574B)
    p = dev.peers[PEER]
    assert p.config.endpoint == Endpoint.parse("10.1.1.1:51820")
    assert p.config.allowed_ips == (ipaddress.ip_network("10.8.0.0/24"), ipaddress.ip_network("10.9.0.1/32"))
    assert (p.rx_bytes, p.tx_bytes, p.config.persistent_keepalive) == (308, 400, 25)
    assert p.last_handshake == pytest.approx(1700000000.5)


def test_uapi_get_of_a_fresh_device_has_no_key_and_no_handshake() -> None:
    dev = uapi.parse_get(b"private_key=" + b"0" * 64 + b"\nlisten_port=0\nerrno=0\n\n")
    assert dev.public_key is None and dev.peers == {}
    dev = uapi.parse_get(b"listen_port=1\npublic_key=" + bytes(range(32)).hex().encode() + b"\nerrno=0\n\n")
    assert dev.peers[PEER].last_handshake == 0.0 and dev.peers[PEER].config.endpoint is None


@pytest.mark.parametrize(
    ("answer", "says"),
    [(b"listen_port=1\n\n", "answer has no errno line"), (b"errno=1\n\n", "get failed with errno=1"),
     (b"garbage\nerrno=0\n\n", "line without '=': 'garbage'"), (b"public_key=zz\nerrno=0\n\n", "key is not hex"),
     (b"public_key=" + b"ab" * 32 + b"\nendpoint=nope\nerrno=0\n\n", "bad endpoint 'nope'")],
)
def test_uapi_protocol_errors_are_reported(answer: bytes, says: str) -> None:
    with pytest.raises(uapi.UapiProtocolError, match=re.escape(says)):
        uapi.parse_get(answer)


def test_uapi_set_transaction() -> None:
    ops = [
        SetDevice(private_key=True, listen_port=51820, fwmark=0x574B),
        PutPeer(CFG, create=True),
        PutPeer(CFG, create=False, set_endpoint=False, set_allowed_ips=False, set_keepalive=True),
        RemovePeer(PEER),
    ]
    text = uapi.encode_set(ops, PRIV).decode()
    hexkey = bytes(range(32)).hex()
    assert text == (
        f"set=1\nprivate_key={uapi.key_to_hex(PRIV)}\nlisten_port=51820\nfwmark=22347\n"
        f"public_key={hexkey}\nendpoint=192.168.77.11:51820\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=10.254.0.7/32\nallowed_ip=10.8.0.0/24\n"
        f"public_key={hexkey}\nupdate_only=true\npersistent_keepalive_interval=25\n"
        f"public_key={hexkey}\nremove=true\n\n"
    )
    assert uapi.parse_errno(b"errno=0\n\n") == 0 and uapi.parse_errno(b"errno=22\n\n") == 22


def test_uapi_set_without_private_key_flag_never_carries_the_key() -> None:
    assert uapi.key_to_hex(PRIV) not in uapi.encode_set([SetDevice(listen_port=1)], PRIV).decode()


def test_kernel_set_message_round_trips_through_netlink_encoding() -> None:
    ops = [SetDevice(private_key=True, listen_port=51820, fwmark=0x574B), PutPeer(CFG, create=True), RemovePeer(PEER)]
    attrs = kernel.build_set_attrs("wire_kube", ops, PRIV)
    decoded = decode_wg(encode_wg_set(attrs).data)
    assert decoded["WGDEVICE_A_IFNAME"] == "wire_kube"
    assert decoded["WGDEVICE_A_PRIVATE_KEY"] == PRIV
    assert (decoded["WGDEVICE_A_LISTEN_PORT"], decoded["WGDEVICE_A_FWMARK"]) == (51820, 0x574B)
    put, remove = decoded["WGDEVICE_A_PEERS"]
    assert put["WGPEER_A_PUBLIC_KEY"] == PEER
    assert put["WGPEER_A_FLAGS"] == kernel.WGPEER_F_REPLACE_ALLOWEDIPS
    assert put["WGPEER_A_ENDPOINT"]["addr"] == "192.168.77.11" and put["WGPEER_A_ENDPOINT"]["port"] == 51820
    assert put["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"] == 25
    ips = [(a["WGALLOWEDIP_A_FAMILY"], a["WGALLOWEDIP_A_CIDR_MASK"]) for a in put["WGPEER_A_ALLOWEDIPS"]]
    assert ips == [(socket.AF_INET, 32), (socket.AF_INET, 24)]
    assert remove == {"WGPEER_A_PUBLIC_KEY": PEER, "WGPEER_A_FLAGS": kernel.WGPEER_F_REMOVE_ME}


def test_kernel_update_only_touches_flagged_parts() -> None:
    op = PutPeer(CFG, create=False, set_endpoint=False, set_allowed_ips=False, set_keepalive=False)
    (peer,) = decode_wg(encode_wg_set(kernel.build_set_attrs("wk", [op], PRIV)).data)["WGDEVICE_A_PEERS"]
    assert peer == {"WGPEER_A_PUBLIC_KEY": PEER, "WGPEER_A_FLAGS": kernel.WGPEER_F_UPDATE_ONLY}
    assert "WGDEVICE_A_PRIVATE_KEY" not in decode_wg(encode_wg_set(kernel.build_set_attrs("wk", [op], PRIV)).data)


def test_kernel_get_answer_is_parsed_and_split_peers_merged() -> None:
    pub = keys.public_key_of(PRIV)
    reply = [
        ["WGDEVICE_A_IFNAME", "wire_kube"], ["WGDEVICE_A_PRIVATE_KEY", PRIV], ["WGDEVICE_A_PUBLIC_KEY", pub],
        ["WGDEVICE_A_LISTEN_PORT", 51820], ["WGDEVICE_A_FWMARK", 0x574B],
        ["WGDEVICE_A_PEERS", [{"attrs": [
            ["WGPEER_A_PUBLIC_KEY", PEER], ["WGPEER_A_ENDPOINT", {"addr": "10.0.0.9", "port": 51820}],
            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 5],
            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 0}],
            ["WGPEER_A_RX_BYTES", 1234], ["WGPEER_A_TX_BYTES", 99],
            ["WGPEER_A_ALLOWEDIPS", [{"attrs": [["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
                                                  ["WGALLOWEDIP_A_IPADDR", bytes([10, 254, 0, 7])],
                                                  ["WGALLOWEDIP_A_CIDR_MASK", 32]]}]]]}]],
    ]
    continued = [["WGDEVICE_A_IFNAME", "wire_kube"], ["WGDEVICE_A_PEERS", [{"attrs": [
        ["WGPEER_A_PUBLIC_KEY", PEER],
        ["WGPEER_A_ALLOWEDIPS", [{"attrs": [["WGALLOWEDIP_A_FAMILY", socket.AF_INET6],
                                             ["WGALLOWEDIP_A_IPADDR", ipaddress.ip_address("fd00::").packed],
                                             ["WGALLOWEDIP_A_CIDR_MASK", 64]]}]]]}]]]
    dev = kernel.parse_device([decode_wg(encode_wg_set(m).data) for m in (reply, continued)])
    assert dev.public_key == pub and dev.listen_port == 51820 and dev.fwmark == 0x574B
    p = dev.peers[PEER]
    assert p.config.allowed_ips == (ipaddress.ip_network("10.254.0.7/32"), ipaddress.ip_network("fd00::/64"))
    assert (p.rx_bytes, p.tx_bytes, p.last_handshake) == (1234, 99, 1700000000.0)
    assert p.config.endpoint == Endpoint.parse("10.0.0.9:51820") and p.config.persistent_keepalive == 5


class FakeNetlink:
    def __init__(self) -> None:
        self.sent: list[list[list[object]]] = []
        self.links: set[str] = set()

    def link(self, ifname: str) -> object:
        return ifname if ifname in self.links else None

    def create_wireguard_link(self, ifname: str) -> None:
        self.links.add(ifname)

    def wireguard_get(self, ifname: str) -> list[dict[str, object]]:
        return [{"WGDEVICE_A_IFNAME": ifname}]

    def wireguard_set(self, attrs: list[list[object]]) -> None:
        self.sent.append(attrs)


def test_kernel_engine_creates_once_and_sends_nothing_for_no_ops() -> None:
    nl = FakeNetlink()
    eng = kernel.KernelEngine("wire_kube", nl)
    assert eng.ensure_device() is True and eng.ensure_device() is False
    eng.apply([], PRIV)
    assert nl.sent == []
    eng.apply([RemovePeer(PEER)], PRIV)
    assert len(nl.sent) == 1 and eng.get().public_key is None


# ---- engine selection and why -------------------------------------------------------------------


class SelectNetlink:
    """link() answers from ``links`` ({name: kind}); creating a kernel link fails with ``create_error``."""

    def __init__(self, links: dict[str, str] | None = None, create_error: str | None = None) -> None:
        self.links = dict(links or {})
        self.create_error = create_error
        self.created: list[str] = []

    def link(self, ifname: str) -> object:
        from wirekube.agent.netlink import LinkInfo

        kind = self.links.get(ifname)
        return LinkInfo(3, ifname, kind, 1420, True) if kind is not None else None

    def create_wireguard_link(self, ifname: str) -> None:
        from wirekube.errors import DataplaneError

        if self.create_error:
            raise DataplaneError(self.create_error)
        self.created.append(ifname)
        self.links[ifname] = "wireguard"


USERSPACE = UserspaceSettings(ifname="wire_kube")
NO_MODULE = "modprobe: FATAL: Module wireguard not found in directory /lib/modules/6.1.0"


def _pick(choice: Engine, nl: SelectNetlink, hint: str | None = None, requested_by: str = "spec.engine") -> str:
    engine = select_engine(choice, nl, USERSPACE, hint=lambda: hint)  # type: ignore[arg-type]
    return describe_engine(engine, requested_by)


def test_engine_reasons() -> None:
    assert _pick(Engine.USERSPACE, SelectNetlink()) == "userspace (spec.engine=userspace)"
    assert _pick(Engine.USERSPACE, SelectNetlink(), requested_by="--engine") == "userspace (--engine=userspace)"
    assert _pick(Engine.KERNEL, SelectNetlink()) == "kernel (spec.engine=kernel)"
    nl = SelectNetlink()
    assert _pick(Engine.AUTO, nl) == "kernel" and nl.created == ["wire_kube"]
    assert _pick(Engine.AUTO, SelectNetlink({"wire_kube": "wireguard"})) == "kernel"
    assert _pick(Engine.AUTO, SelectNetlink({"wire_kube": "tun"})) == \
        "userspace (adopted the running wireguard-go interface wire_kube)"
    err = "create wireguard link wire_kube: Operation not supported (errno 95)"
    assert _pick(Engine.AUTO, SelectNetlink(create_error=err), hint=NO_MODULE) == \
        f"userspace (no wireguard kernel module: {NO_MODULE})"
    # The module exists (modprobe -n is happy) but the link still cannot be made: say what failed.
    assert _pick(Engine.AUTO, SelectNetlink(create_error=err), hint=None) == \
        f"userspace (kernel WireGuard unavailable: {err})"


def test_module_hint_asks_modprobe_for_a_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wirekube.agent.wg import select

    calls = tmp_path / "calls"
    fake = tmp_path / "modprobe"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\necho "{NO_MODULE}" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(select, "SYS_MODULE", tmp_path / "no-such-module")
    assert select.module_hint() == NO_MODULE
    assert calls.read_text().split() == ["-n", "wireguard"], "a dry run only: nothing is loaded"
    monkeypatch.setattr(select, "SYS_MODULE", tmp_path)  # "loaded": no hint, modprobe not asked
    assert select.module_hint() is None and calls.read_text().count("\n") == 1
    assert describe_engine(object()) == ""
