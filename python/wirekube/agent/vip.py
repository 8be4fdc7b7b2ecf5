"""Gateway virtual IPs: the address the network behind a gateway routes the mesh's CIDRs to.

A static route on a router (or the lab's VPC host) that names one gateway node cannot follow a
failover.  With ``WireKubeGateway.spec.virtualIP`` the active gateway peer holds that address as a
secondary address on its interface in the same subnet and announces it with gratuitous ARP (three
at takeover, then one every ``refresh`` seconds, as keepalived does), so neighbours' ARP caches
follow ``status.activePeer``.  Any other gateway peer removes it.

If a gateway's agent dies, the kernel keeps the address (like the nftables rules: the dataplane
outlives the agent) and still answers ARP for it; the new holder's announcements win the
neighbours' caches, and a restarted agent that is no longer active removes it at start-up.
This is L2 machinery: it works on-premises and in the lab, not in an AWS VPC, whose route tables
do not learn from ARP.

Only this module touches the addresses; it talks netlink through pyroute2 and ARP through an
AF_PACKET socket, both behind small seams so the unit tests can replace them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pyroute2 import IPRoute

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ANNOUNCEMENTS_AT_TAKEOVER = 3


@dataclass(frozen=True)
class Placement:
    ifname: str
    index: int
    mac: bytes


def garp_frame(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request (sender = target = ``ip``), broadcast: what Linux neighbours update on."""
    ether = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip.packed + b"\x00" * 6 + ip.packed
    return ether + arp


def send_garp(place: Placement, ip: ipaddress.IPv4Address) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((place.ifname, ETH_P_ARP))
        s.send(garp_frame(place.mac, ip))


class KernelAddresses:
    """The netlink seam: where a VIP would go, where it is, add and remove it."""

    def place(self, vip: ipaddress.IPv4Interface) -> Placement | None:
        """The interface with an address of its own in ``vip``'s subnet (not the VIP itself)."""
        with IPRoute() as ipr:
            for msg in ipr.get_addr(family=socket.AF_INET):
                local = ipaddress.ip_interface(f"{msg.get_attr('IFA_LOCAL') or msg.get_attr('IFA_ADDRESS')}/"
                                               f"{msg['prefixlen']}")
                if local.network == vip.network and local.ip != vip.ip:
                    return self._placement(ipr, msg["index"])
        return None

    def holders(self, ip: ipaddress.IPv4Address) -> list[Placement]:
        with IPRoute() as ipr:
            return [self._placement(ipr, msg["index"]) for msg in self._exactly(ipr, ip)]

    def add(self, place: Placement, vip: ipaddress.IPv4Interface) -> None:
        with IPRoute() as ipr:
            try:
                ipr.addr("add", index=place.index, address=str(vip.ip), local=str(vip.ip),
                         prefixlen=vip.network.prefixlen)
            except Exception as e:  # EEXIST: already ours
                if getattr(e, "code", None) != 17:
                    raise

    def remove(self, place: Placement, vip: ipaddress.IPv4Interface) -> bool:
        """Remove ``vip`` from ``place``; False (and nothing removed) when it is the interface's only
        address in that subnet: then it is the node's own address, configured by someone else."""
        with IPRoute() as ipr:
            mine = [m for m in ipr.get_addr(family=socket.AF_INET, index=place.index)
                    if ipaddress.ip_interface(f"{m.get_attr('IFA_LOCAL') or m.get_attr('IFA_ADDRESS')}/"
                                              f"{m['prefixlen']}").network == vip.network]
            if not any((m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) != str(vip.ip) for m in mine):
                return False
            for msg in self._exactly(ipr, vip.ip):
                if msg["index"] == place.index:
                    # IFA_LOCAL must be given: without it the kernel deletes the first address of the
                    # same *subnet*, i.e. the interface's own primary address.
                    ipr.addr("del", index=place.index, address=str(vip.ip), local=str(vip.ip),
                             prefixlen=msg["prefixlen"])
        return True

    @staticmethod
    def _exactly(ipr: IPRoute, ip: ipaddress.IPv4Address) -> list[Any]:
        """The address messages for exactly ``ip`` (netlink's own filters match by subnet)."""
        return [m for m in ipr.get_addr(family=socket.AF_INET)
                if (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) == str(ip)]

    @staticmethod
    def _placement(ipr: IPRoute, index: int) -> Placement:
        link = ipr.get_links(index)[0]
        mac = bytes.fromhex((link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00").replace(":", ""))
        return Placement(link.get_attr("IFLA_IFNAME"), index, mac)


class VirtualIPs:
    """Keeps exactly the wanted virtual IPs on this node, announced."""

    def __init__(
        self,
        kernel: KernelAddresses | None = None,
        announce: Callable[[Placement, ipaddress.IPv4Address], None] = send_garp,
        clock: Callable[[], float] = time.monotonic,
        refresh: float = 5.0,
        node: str = "",
    ) -> None:
        self._kernel = kernel or KernelAddresses()
        self._announce = announce
        self._clock = clock
        self._refresh = refresh
        self._announced: dict[ipaddress.IPv4Interface, float] = {}
        self._unplaceable: set[ipaddress.IPv4Interface] = set()
        self._log = logger.bind(component="gateway-vip", node=node)

    @property
    def held(self) -> frozenset[ipaddress.IPv4Interface]:
        return frozenset(self._announced)

    def sync(self, wanted: Mapping[str, ipaddress.IPv4Interface],
             candidates: Iterable[ipaddress.IPv4Interface]) -> None:
        """Hold every VIP in ``wanted`` (gateway -> VIP); drop every other ``candidate`` found here.

        ``candidates`` are the VIPs of every gateway naming this node: the ones it may have held
        before (also across an agent restart, when nothing is remembered).
        """
        keep = set(wanted.values())
        for vip in set(candidates) - keep:
            for place in self._kernel.holders(vip.ip):
                if self._kernel.remove(place, vip):
                    self._log.info("virtual IP {} released from {}", vip, place.ifname)
                elif vip not in self._unplaceable:
                    self._log.error("virtual IP {} is {}'s own address on this node: left alone; pick a free "
                                    "address for spec.virtualIP", vip, place.ifname)
                    self._unplaceable.add(vip)
            self._announced.pop(vip, None)
        for vip in list(self._announced):
            if vip not in keep:
                self._announced.pop(vip)
        for gateway, vip in sorted(wanted.items()):
            self._hold(gateway, vip)

    def _hold(self, gateway: str, vip: ipaddress.IPv4Interface) -> None:
        place = self._kernel.place(vip)
        if place is None:
            if vip not in self._unplaceable:
                self._log.error("gateway {}: no interface of this node is in {}'s subnet {}; cannot hold it",
                                gateway, vip.ip, vip.network)
                self._unplaceable.add(vip)
            return
        self._unplaceable.discard(vip)
        now = self._clock()
        fresh = vip not in self._announced or not any(h.index == place.index for h in self._kernel.holders(vip.ip))
        if fresh:
            self._kernel.add(place, vip)
            self._log.info("gateway {}: holding virtual IP {} on {}", gateway, vip, place.ifname)
        elif now - self._announced[vip] < self._refresh:
            return
        for _ in range(ANNOUNCEMENTS_AT_TAKEOVER if fresh else 1):
            try:
                self._announce(place, vip.ip)
            except OSError as e:
                self._log.warning("gratuitous ARP for {} on {} failed: {}", vip.ip, place.ifname, e)
                break
        self._announced[vip] = now
