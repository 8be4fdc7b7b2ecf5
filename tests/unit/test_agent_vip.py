"""Gateway virtual IPs: who holds them, when they move, and what goes on the wire."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest

from tests.unit.gateway_fixtures import gateway_obj
from wirekube.agent.gateway import GatewayAgent
from wirekube.agent.vip import ANNOUNCEMENTS_AT_TAKEOVER, Placement, VirtualIPs, garp_frame

VIP = ipaddress.IPv4Interface("10.100.0.10/24")
ETH1 = Placement("eth1", 3, bytes.fromhex("020000000001"))


class FakeKernel:
    """Addresses per interface index; eth1 (index 3) is in the VIP's subnet."""

    def __init__(self, subnet_iface: Placement | None = ETH1) -> None:
        self.iface = subnet_iface
        self.addrs: dict[int, set[ipaddress.IPv4Address]] = {3: set(), 4: set()}

    def place(self, vip: ipaddress.IPv4Interface) -> Placement | None:
        return self.iface

    def holders(self, ip: ipaddress.IPv4Address) -> list[Placement]:
        return [Placement(f"if{i}", i, b"\0" * 6) for i, a in self.addrs.items() if ip in a]

    def add(self, place: Placement, vip: ipaddress.IPv4Interface) -> None:
        self.addrs[place.index].add(vip.ip)

    def remove(self, place: Placement, vip: Any) -> bool:
        self.addrs[place.index].discard(vip.ip)
        return True


def test_garp_frame_is_a_broadcast_arp_request_for_the_vip() -> None:
    frame = garp_frame(ETH1.mac, VIP.ip)
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == ETH1.mac and frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, oper = struct.unpack("!HHBBH", frame[14:22])
    assert (htype, ptype, hlen, plen, oper) == (1, 0x0800, 6, 4, 1)
    assert frame[22:28] == ETH1.mac
    assert frame[28:32] == frame[38:42] == VIP.ip.packed  # sender = target: gratuitous
    assert len(frame) == 42


def test_takeover_adds_and_announces_then_refreshes_on_schedule() -> None:
    kernel, sent, now = FakeKernel(), [], [100.0]
    vips = VirtualIPs(kernel, announce=lambda p, ip: sent.append((p.ifname, ip)), clock=lambda: now[0], refresh=5)
    vips.sync({"vpc": VIP}, [VIP])
    assert kernel.addrs[3] == {VIP.ip}
    assert sent == [("eth1", VIP.ip)] * ANNOUNCEMENTS_AT_TAKEOVER
    now[0] += 1
    vips.sync({"vpc": VIP}, [VIP])
    assert len(sent) == ANNOUNCEMENTS_AT_TAKEOVER  # not due yet
    now[0] += 5
    vips.sync({"vpc": VIP}, [VIP])
    assert len(sent) == ANNOUNCEMENTS_AT_TAKEOVER + 1


def test_address_removed_behind_our_back_is_put_back_with_a_full_announcement() -> None:
    kernel, sent = FakeKernel(), []
    vips = VirtualIPs(kernel, announce=lambda p, ip: sent.append(ip), clock=lambda: 0.0)
    vips.sync({"vpc": VIP}, [VIP])
    kernel.addrs[3].clear()
    vips.sync({"vpc": VIP}, [VIP])
    assert kernel.addrs[3] == {VIP.ip} and len(sent) == 2 * ANNOUNCEMENTS_AT_TAKEOVER


def test_release_removes_it_wherever_it_was_left_even_after_a_restart() -> None:
    kernel = FakeKernel()
    kernel.addrs[4].add(VIP.ip)  # left by a previous agent process
    vips = VirtualIPs(kernel, announce=lambda p, ip: None)
    vips.sync({}, [VIP])
    assert kernel.addrs == {3: set(), 4: set()}
    assert vips.held == frozenset()


def test_no_interface_in_the_subnet_is_reported_not_invented() -> None:
    kernel, sent = FakeKernel(subnet_iface=None), []
    vips = VirtualIPs(kernel, announce=lambda p, ip: sent.append(ip))
    vips.sync({"vpc": VIP}, [VIP])
    assert kernel.addrs == {3: set(), 4: set()} and sent == [] and vips.held == frozenset()


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[Any] = []

    def patch_status(self, res: Any, name: str, patch: dict[str, Any]) -> None:
        self.patches.append((name, patch))


@pytest.mark.parametrize(("phase", "holds"), [("activePeer", True), ("pendingPeer", False)])
def test_gateway_agent_holds_the_vip_only_when_active(monkeypatch: pytest.MonkeyPatch, phase: str,
                                                     holds: bool) -> None:
    import wirekube.agent.gateway as mod

    monkeypatch.setattr(mod, "_write_sysctl", lambda *a, **k: None)
    obj = gateway_obj(["ec2-a", "ec2-b"], ["10.100.0.0/24"],
                      status={"activePeer": "ec2-a" if phase == "activePeer" else "ec2-b",
                              "pendingPeer": "ec2-a" if phase == "pendingPeer" else "",
                              "routes": ["10.100.0.0/24"], "handoverEpoch": 1})
    obj["spec"]["virtualIP"] = str(VIP)
    kernel = FakeKernel()
    agent = GatewayAgent(FakeKube(), "ec2-a", lambda: [obj], lambda: "wire_kube", nft=lambda text: None,
                         table_present=lambda: True, vips=VirtualIPs(kernel, announce=lambda p, ip: None))
    agent.sync_forwarding()
    assert (VIP.ip in kernel.addrs[3]) is holds
    obj["status"]["activePeer"], obj["status"]["pendingPeer"] = "ec2-b", ""
    agent.sync_forwarding()
    assert kernel.addrs[3] == set()  # no longer active: released
