"""The agent's generic-netlink WireGuard socket is opened once and reused (kernel engine fix).

Opening one per call cost ~40 ms on an emulated CPU (a genl family lookup every time) and the
traversal ticker reads the device at 10 Hz; measured in the lab's kernel nodes."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest

from wirekube.agent import netlink as nl_module
from wirekube.errors import DataplaneError
from wirekube.waiting import wait_for


class FakeWireGuard:
    opened: ClassVar[list[FakeWireGuard]] = []

    def __init__(self) -> None:
        self.closed = False
        self.fail_next = False
        FakeWireGuard.opened.append(self)

    def info(self, ifname: str) -> list[dict[str, Any]]:
        if self.fail_next:
            raise OSError("socket broke")
        return [{"attrs": [["WGDEVICE_A_IFNAME", ifname]]}]

    def close(self) -> None:
        self.closed = True


class FakeIPRoute:
    def close(self) -> None:
        pass


@pytest.fixture()
def netlink(monkeypatch: pytest.MonkeyPatch) -> nl_module.Netlink:
    FakeWireGuard.opened = []
    monkeypatch.setattr(nl_module, "WireGuard", FakeWireGuard)
    monkeypatch.setattr(nl_module, "IPRoute", FakeIPRoute)
    return nl_module.Netlink()


def test_one_socket_serves_every_call(netlink: nl_module.Netlink) -> None:
    for _ in range(5):
        assert netlink.wireguard_get("wire_kube") == [{"WGDEVICE_A_IFNAME": "wire_kube"}]
    assert len(FakeWireGuard.opened) == 1
    netlink.close()
    assert FakeWireGuard.opened[0].closed


def test_each_thread_has_its_own_socket_and_close_ends_them_all(netlink: nl_module.Netlink) -> None:
    """One socket shared by the traversal and reconcile threads failed writes with ECONNRESET on a
    real kernel (pyroute2 keeps its transport per thread)."""
    netlink.wireguard_get("wire_kube")
    workers = [threading.Thread(target=lambda: [netlink.wireguard_get("wire_kube") for _ in range(3)])
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(FakeWireGuard.opened) == 3
    netlink.wireguard_get("wire_kube")
    assert len(FakeWireGuard.opened) == 3  # this thread's socket again
    netlink.close()
    assert all(w.closed for w in FakeWireGuard.opened)


def test_a_failed_call_drops_the_socket_and_the_next_opens_a_fresh_one(netlink: nl_module.Netlink) -> None:
    netlink.wireguard_get("wire_kube")
    FakeWireGuard.opened[0].fail_next = True
    with pytest.raises(DataplaneError, match="wireguard get wire_kube: socket broke"):
        netlink.wireguard_get("wire_kube")
    assert FakeWireGuard.opened[0].closed
    assert netlink.wireguard_get("wire_kube") == [{"WGDEVICE_A_IFNAME": "wire_kube"}]
    assert len(FakeWireGuard.opened) == 2


def test_a_finished_thread_s_socket_is_closed_with_it(netlink: nl_module.Netlink) -> None:
    """A thread that read the device and ended no longer holds a socket open until close()."""
    netlink.wireguard_get("wire_kube")
    worker = threading.Thread(target=lambda: netlink.wireguard_get("wire_kube"))
    worker.start()
    worker.join()
    assert len(FakeWireGuard.opened) == 2
    wait_for(lambda: FakeWireGuard.opened[1].closed, 5, "the finished thread's socket closed")
    assert not FakeWireGuard.opened[0].closed  # the living thread keeps its own
    netlink.wireguard_get("wire_kube")
    assert len(FakeWireGuard.opened) == 2
    netlink.close()
    assert FakeWireGuard.opened[0].closed
