"""Gateway virtual IP against a real kernel: two namespaces on a veth, the neighbour's ARP cache follows.

``gwa`` and ``gwb`` both sit on a /24 with ``host``; ``host`` has used the VIP while ``gwa`` held
it; then ``gwb`` takes it over through :class:`wirekube.agent.vip.VirtualIPs` (real netlink, a
real AF_PACKET gratuitous ARP) and ``host``'s neighbour entry for the VIP must switch to ``gwb``'s
MAC without waiting for the entry to age out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.root

VIP = "10.77.0.10/24"
HOLD = """
import ipaddress, json, sys
from wirekube.agent.vip import VirtualIPs
vips = VirtualIPs()
want = json.loads(sys.argv[1])
vips.sync({g: ipaddress.IPv4Interface(v) for g, v in want.items()}, [ipaddress.IPv4Interface(sys.argv[2])])
print(json.dumps(sorted(str(v) for v in vips.held)))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=20)


@pytest.fixture()
def l2() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:5]
    ns = {n: f"wkt-vip{tag}-{n}" for n in ("host", "gwa", "gwb")}
    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
        sh("ip", "-n", ns["host"], "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns["host"], "addr", "add", "10.77.0.100/24", "dev", "br0")
        sh("ip", "-n", ns["host"], "link", "set", "br0", "up")
        for i, g in enumerate(("gwa", "gwb"), start=1):
            sh("ip", "-n", ns["host"], "link", "add", f"p{g}", "type", "veth", "peer", "name", "eth1",
               "netns", ns[g])
            sh("ip", "-n", ns["host"], "link", "set", f"p{g}", "master", "br0", "up")
            sh("ip", "-n", ns[g], "addr", "add", f"10.77.0.{i}/24", "dev", "eth1")
            sh("ip", "-n", ns[g], "link", "set", "eth1", "up")
            sh("ip", "-n", ns[g], "link", "set", "lo", "up")
        yield ns
    finally:
        for n in ns.values():
            sh("ip", "netns", "del", n, check=False)


def hold(ns: str, want: dict[str, str]) -> list[str]:
    out = sh("ip", "netns", "exec", ns, sys.executable, "-c", HOLD, json.dumps(want), VIP)
    return json.loads(out.stdout)


def mac(ns: str) -> str:
    return json.loads(sh("ip", "-j", "-n", ns, "link", "show", "eth1").stdout)[0]["address"]


def neighbour(ns: str, ip: str) -> str:
    entries = json.loads(sh("ip", "-j", "-n", ns, "neigh", "show", ip).stdout or "[]")
    return entries[0].get("lladdr", "") if entries else ""


def test_takeover_moves_the_neighbours_arp_entry(l2: dict[str, str]) -> None:
    vip_ip = VIP.split("/")[0]
    assert hold(l2["gwa"], {"vpc": VIP}) == [VIP]
    sh("ip", "netns", "exec", l2["host"], "ping", "-c1", "-W1", vip_ip)
    assert neighbour(l2["host"], vip_ip) == mac(l2["gwa"])
    # Failover: the old holder steps down (its agent saw it is no longer active), the new one takes over.
    assert hold(l2["gwa"], {}) == []
    assert "10.77.0.10" not in sh("ip", "-n", l2["gwa"], "addr", "show", "eth1").stdout
    assert hold(l2["gwb"], {"vpc": VIP}) == [VIP]
    wait_for(lambda: neighbour(l2["host"], vip_ip) == mac(l2["gwb"]), 5, "host's ARP entry for the VIP -> gwb")
    sh("ip", "netns", "exec", l2["host"], "ping", "-c1", "-W1", vip_ip)


def test_a_dead_holders_address_loses_to_the_announcement(l2: dict[str, str]) -> None:
    """gwa's agent died holding the VIP (the kernel keeps it); gwb's announcement still wins."""
    vip_ip = VIP.split("/")[0]
    hold(l2["gwa"], {"vpc": VIP})
    sh("ip", "netns", "exec", l2["host"], "ping", "-c1", "-W1", vip_ip)
    hold(l2["gwb"], {"vpc": VIP})
    wait_for(lambda: neighbour(l2["host"], vip_ip) == mac(l2["gwb"]), 5, "host's ARP entry for the VIP -> gwb")
    # A restarted gwa agent that is not active removes the address it left behind.
    assert hold(l2["gwa"], {}) == []
    assert "10.77.0.10" not in sh("ip", "-n", l2["gwa"], "addr", "show", "eth1").stdout


def test_a_vip_that_is_the_nodes_own_address_is_never_removed(l2: dict[str, str]) -> None:
    """gwb's only address in the subnet *is* the VIP (a misconfiguration): release must not touch it."""
    sh("ip", "-n", l2["gwb"], "addr", "flush", "dev", "eth1")
    sh("ip", "-n", l2["gwb"], "addr", "add", VIP, "dev", "eth1")
    assert hold(l2["gwb"], {}) == []
    assert VIP in sh("ip", "-n", l2["gwb"], "addr", "show", "eth1").stdout


def test_releasing_an_absent_vip_leaves_the_interfaces_own_address(l2: dict[str, str]) -> None:
    """RTM_DELADDR without IFA_LOCAL deletes the first address of the same subnet: never ours to do."""
    for _ in range(2):
        assert hold(l2["gwa"], {}) == []
    assert "10.77.0.1/24" in sh("ip", "-n", l2["gwa"], "addr", "show", "eth1").stdout
