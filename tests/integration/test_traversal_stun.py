"""STUN from a port another socket holds, through real nftables NAT in network namespaces.

Topology (unique namespace prefix, removed afterwards):

    client (10.77.0.2, UDP 51820 held by a plain socket standing in for WireGuard)
      | 10.77.0.0/24
    router (10.77.0.1 | 198.18.77.1)  nftables: none / masquerade / masquerade fully-random
      | 198.18.77.0/24 ("internet")
    stun (198.18.77.10 and .11, port 3478: two STUN servers = the relay's built-in responder)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from tests.fixtures.root import require_root
from tests.fixtures.stun import stun_server_script
from wirekube.models import NatType

pytestmark = pytest.mark.netns

PY = sys.executable


def sh(*argv: str, input_: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=input_).stdout


class Net:
    def __init__(self) -> None:
        self.prefix = f"wkst{uuid.uuid4().hex[:6]}"
        self.ns = {r: f"{self.prefix}-{r}" for r in ("client", "router", "stun")}
        self.procs: list[subprocess.Popen[str]] = []

    def up(self) -> None:
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        p = self.prefix
        sh("ip", "link", "add", f"{p}a", "netns", self.ns["client"], "type", "veth", "peer", "name", f"{p}b",
           "netns", self.ns["router"])
        sh("ip", "link", "add", f"{p}c", "netns", self.ns["router"], "type", "veth", "peer", "name", f"{p}d",
           "netns", self.ns["stun"])
        self.exec("client", "ip", "addr", "add", "10.77.0.2/24", "dev", f"{p}a")
        self.exec("client", "ip", "link", "set", f"{p}a", "up")
        self.exec("client", "ip", "route", "add", "default", "via", "10.77.0.1")
        self.exec("router", "ip", "addr", "add", "10.77.0.1/24", "dev", f"{p}b")
        self.exec("router", "ip", "addr", "add", "198.18.77.1/24", "dev", f"{p}c")
        self.exec("router", "ip", "link", "set", f"{p}b", "up")
        self.exec("router", "ip", "link", "set", f"{p}c", "up")
        self.exec("router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for addr in ("198.18.77.10/24", "198.18.77.11/24"):
            self.exec("stun", "ip", "addr", "add", addr, "dev", f"{p}d")
        self.exec("stun", "ip", "link", "set", f"{p}d", "up")
        self.exec("stun", "ip", "route", "add", "10.77.0.0/24", "via", "198.18.77.1")

    def exec(self, role: str, *argv: str, input_: str | None = None) -> str:
        return sh("ip", "netns", "exec", self.ns[role], *argv, input_=input_)

    def nat(self, kind: str) -> None:
        rule = {"none": "", "prc": "oifname \"{w}\" masquerade", "sym": "oifname \"{w}\" masquerade fully-random"}[kind]
        ruleset = textwrap.dedent(f"""
            table ip wkstnat
            delete table ip wkstnat
            table ip wkstnat {{
              chain post {{
                type nat hook postrouting priority srcnat; policy accept;
                {rule.format(w=self.prefix + "c")}
              }}
            }}
        """)
        self.exec("router", "nft", "-f", "-", input_=ruleset)
        self.exec("router", "conntrack", "-F")

    def spawn(self, role: str, code: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[role], PY, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


STUN_SERVER = stun_server_script("198.18.77.10", "198.18.77.11")

PROBE = textwrap.dedent("""
    import json, socket
    from wirekube.traversal.rawudp import StunTarget, stun_probe
    from wirekube.traversal.nat import classify
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); held.bind(("0.0.0.0", 51820))  # "WireGuard"
    targets = [StunTarget("a", "198.18.77.10", 3478), StunTarget("b", "198.18.77.11", 3478)]
    samples = stun_probe(targets, 51820, timeout=3.0)
    c = classify(samples, 51820, ["10.77.0.2"])
    print(json.dumps({"samples": [[s.server, s.mapped_ip, s.mapped_port] for s in samples],
                      "nat": c.nat_type.value, "held_still_bound": held.getsockname()[1] == 51820}))
""")


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    require_root()
    n = Net()
    try:
        n.up()
        server = n.spawn("stun", STUN_SERVER)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield n
    finally:
        n.down()


def probe(net: Net) -> dict:
    out = net.exec("client", PY, "-c", PROBE)
    return json.loads(out)


def test_no_nat_is_open_and_port_kept_while_held(net: Net) -> None:
    net.nat("none")
    r = probe(net)
    assert r["held_still_bound"] is True
    assert r["samples"] == [["a", "10.77.0.2", 51820], ["b", "10.77.0.2", 51820]]
    assert r["nat"] == NatType.OPEN.value


def test_masquerade_maps_to_router_with_same_port(net: Net) -> None:
    net.nat("prc")
    r = probe(net)
    assert [s[1:] for s in r["samples"]] == [["198.18.77.1", 51820], ["198.18.77.1", 51820]]
    assert r["nat"] == NatType.CONE.value  # filtering needs the relay's NATProbe to tell


def test_fully_random_masquerade_is_symmetric(net: Net) -> None:
    net.nat("sym")
    r = probe(net)
    assert len(r["samples"]) == 2 and {s[1] for s in r["samples"]} == {"198.18.77.1"}
    ports = [s[2] for s in r["samples"]]
    assert ports[0] != ports[1]
    assert r["nat"] == NatType.SYMMETRIC.value
