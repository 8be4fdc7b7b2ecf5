"""WireKubeGateway end to end in the EKS Hybrid lab topology (issue 7).

One lab for the module: the built-in ``eks-hybrid`` topology (EC2 nodes ec2-a/ec2-b on the VPC
subnet 10.100.0.0/24, a VPC host routing the hybrid CIDRs to ec2-a as the VPC route table would,
hybrid nodes behind NAT), the real gateway controller, and one WireKubeGateway with both EC2 nodes
as gateway peers, the VPC subnet as its route and an ICMP health check on the VPC host.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.wait import wait_for
from wirekube import k8s
from wirekube.lab import orchestrate
from wirekube.lab.net import Lab
from wirekube.lab.procs import ProcessRecord, is_alive
from wirekube.lab.topology import builtin_topology

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

GW = "vpc"
VPC = "10.100.0.0/24"
KUBELET = 10250
ECHO = 18080
PY = orchestrate.PY

ECHO_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {ECHO})); s.listen(64)
while True:
    c, a = s.accept(); c.sendall(a[0].encode()); c.close()
"""

def _client(host: str, port: int, timeout: float = 1.0) -> str:
    return (f"import socket,sys\ns=socket.create_connection(({host!r},{port}),{timeout})\n"
            f"s.settimeout({timeout})\nsys.stdout.write(s.recv(200).decode(errors='replace'))")


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, k8s.Kube, Any]]:
    name = f"gw{uuid.uuid4().hex[:5]}"
    gateway = {"metadata": {"name": GW}, "spec": {
        "peerRefs": ["ec2-a", "ec2-b"], "routes": [{"cidr": VPC, "description": "VPC subnet"}],
        "snat": {"enabled": True},
        "healthCheck": {"enabled": True, "target": "10.100.0.100", "intervalSeconds": 1, "timeoutSeconds": 1,
                        "failureThreshold": 2}}}
    try:
        orchestrate.up(builtin_topology("eks-hybrid"), name, wait=90, controller=True, gateways=[gateway],
                       mesh_overrides={"autoAllowedIPs": {"includeNodeInternalIP": True},
                                       "podCIDRSync": "node"})
        lab_, kube, h = orchestrate.attach(name)
        lab_.spawn_in_node("hybrid-a1", [PY, "-m", "http.server", str(KUBELET), "--bind", "0.0.0.0"],
                           lab_.log_dir / "kubelet-hybrid-a1.log")
        lab_.spawn_in_node("hybrid-b1", [PY, "-m", "http.server", str(KUBELET), "--bind", "0.0.0.0"],
                           lab_.log_dir / "kubelet-hybrid-b1.log")
        lab_.spawn("vpc-host", [PY, "-c", ECHO_SERVER], lab_.log_dir / "echo-vpc-host.log")
        # The first healthy peer at start-up wins; the controller fails back to ec2-a (first in
        # peerRefs, and where the VPC host routes) once it has been healthy for the failback delay.
        wait_for(lambda: (s := gw_status(kube)).get("ready") and s.get("activePeer") == "ec2-a", 60,
                 "ec2-a active and ready")
        yield lab_, kube, h
        kube.close()
    finally:
        orchestrate.down(name)


def gw_status(kube: k8s.Kube) -> dict[str, Any]:
    return kube.get(k8s.GATEWAYS, GW).get("status") or {}


def vpc_ip(lab_: Lab, node: str) -> str:
    return str(lab_.nodes[node].private["vpc"])


def echo_from(lab_: Lab, node: str) -> str:
    """The source address the VPC host's listener saw for a connection from ``node`` ("" if none)."""
    out = lab_.exec(node, [PY, "-c", _client(str(lab_.hosts["vpc-host"].address), ECHO)], check=False, timeout=5)
    return out.stdout.strip() if out.returncode == 0 else ""


def kubelet_from_vpc(lab_: Lab, node: str) -> bool:
    code = (f"import urllib.request\n"
            f"urllib.request.urlopen('http://{lab_.nodes[node].lan_ip}:{KUBELET}/', timeout=1).read()")
    return lab_.exec("vpc-host", [PY, "-c", code], check=False, timeout=5).returncode == 0


def test_controller_elects_ec2_a_with_forwarding_acknowledged(lab: Any) -> None:
    lab_, kube, _ = lab
    st = wait_for(lambda: (s := gw_status(kube)).get("ready") and s, 60, "gateway ready")
    assert st["activePeer"] == "ec2-a"
    assert st["forwarding"]["ec2-a"]["ready"] is True
    assert st["forwarding"]["ec2-a"]["routes"] == [VPC]
    assert st["peerHealthDetail"]["ec2-a"]["consecutiveFailures"] == 0
    assert "hybrid-a1" in st["clients"]
    nft = lab_.exec("ec2-a", ["nft", "list", "table", "inet", "wirekube"], check=True).stdout
    assert "masquerade" in nft and VPC in nft
    assert lab_.exec("ec2-b", ["nft", "list", "table", "inet", "wirekube"]).returncode != 0


@pytest.mark.parametrize("node", ["hybrid-a1", "hybrid-b1"])
def test_vpc_host_reaches_a_hybrid_kubelet_port_through_the_gateway(lab: Any, node: str) -> None:
    lab_, kube, _ = lab
    wait_for(lambda: gw_status(kube).get("ready"), 60, "gateway ready")
    wait_for(lambda: kubelet_from_vpc(lab_, node), 30, f"vpc-host -> {node}:{KUBELET}", interval=0.5)


@pytest.mark.parametrize("node", ["hybrid-a1", "hybrid-b1"])
def test_vpc_host_sees_the_gateway_address_for_hybrid_traffic(lab: Any, node: str) -> None:
    lab_, kube, _ = lab
    wait_for(lambda: gw_status(kube).get("ready"), 60, "gateway ready")
    seen = wait_for(lambda: echo_from(lab_, node), 30, f"{node} -> vpc-host:{ECHO}", interval=0.5)
    assert seen == vpc_ip(lab_, "ec2-a")
    route = lab_.exec(node, ["ip", "route", "show", "table", "22347", VPC], check=True).stdout
    assert "wire_kube" in route


def test_node_to_node_over_the_mesh(lab: Any) -> None:
    lab_, kube, _ = lab
    peers = {p["metadata"]["name"]: p for p in kube.list(k8s.PEERS)[0]}
    mesh_ip = peers["hybrid-b1"]["spec"]["allowedIPs"][0].split("/")[0]
    wait_for(lambda: orchestrate.ping(lab_, "hybrid-a1", mesh_ip) is not None, 30, "hybrid-a1 -> hybrid-b1 mesh IP")


@pytest.mark.parametrize(("src", "dst"), [("ec2-a.pod0", "hybrid-a1.pod0"), ("hybrid-a1.pod0", "ec2-a.pod0"),
                                        ("hybrid-a1.pod0", "hybrid-b1.pod0"), ("hybrid-b1.pod0", "ec2-b.pod0")])
def test_pod_to_pod_by_synced_pod_cidrs(lab: Any, src: str, dst: str) -> None:
    """Pod CIDR sync (podCIDRSync: node) puts each node's Node.spec.podCIDRs in its peer's AllowedIPs."""
    lab_, kube, _ = lab
    for pod in (src, dst):
        node = lab_.pods[pod].node
        cidr = str(lab_.nodes[node].pod_cidr)
        wait_for(lambda: cidr in (kube.get(k8s.PEERS, node)["spec"].get("allowedIPs") or []), 30,
                 f"{cidr} in {node}'s AllowedIPs")
    dst_ip = str(lab_.pods[dst].address)
    wait_for(lambda: orchestrate.ping(lab_, src, dst_ip) is not None, 30, f"{src} -> {dst} ({dst_ip})",
             interval=0.5)


def test_vxlan_between_hybrid_node_internal_ips_over_wireguard(lab: Any) -> None:
    """Cilium-style VXLAN (UDP 8472) between two hybrid nodes' InternalIPs, unmodified, carried by
    WireGuard because the InternalIPs are in the peers' AllowedIPs.  MTU: the VXLAN device gets
    the WireGuard MTU minus VXLAN's 50 bytes, and a full-size DF packet must pass."""
    lab_, kube, _ = lab
    mesh_mtu = int(kube.get(k8s.MESHES, "default")["spec"].get("mtu") or 1420)
    ends = {"hybrid-a1": "10.201.0.1", "hybrid-b1": "10.201.0.2"}
    for node, other in (("hybrid-a1", "hybrid-b1"), ("hybrid-b1", "hybrid-a1")):
        ip = lab_.nodes[node]
        lab_.exec(node, ["ip", "link", "add", "wkvx0", "type", "vxlan", "id", "42", "dstport", "8472",
                         "local", str(ip.lan_ip), "remote", str(lab_.nodes[other].lan_ip)], check=True)
        lab_.exec(node, ["ip", "link", "set", "wkvx0", "mtu", str(mesh_mtu - 50), "up"], check=True)
        lab_.exec(node, ["ip", "addr", "add", f"{ends[node]}/24", "dev", "wkvx0"], check=True)
    route = lab_.exec("hybrid-a1", ["ip", "route", "get", str(lab_.nodes["hybrid-b1"].lan_ip)], check=True).stdout
    assert "wire_kube" in route, route
    size = mesh_mtu - 50 - 28
    wait_for(lambda: lab_.exec("hybrid-a1", ["ping", "-n", "-q", "-c", "1", "-W", "1", "-M", "do", "-s", str(size),
                                             ends["hybrid-b1"]]).returncode == 0, 30,
             f"VXLAN ping of {size} bytes (DF) hybrid-a1 -> hybrid-b1")


def _agent_pid(lab_: Lab, node: str) -> int:
    procs = lab_._state.read()["processes"]  # noqa: SLF001 - the lab records every process it started
    return next(p["pid"] for p in procs
                if f"--node-name={node}" in p["argv"] and any(a.endswith("wirekube-agent") for a in p["argv"]))


@contextlib.contextmanager
def echo_sources(lab_: Any, node: str) -> Iterator[list[tuple[float, str]]]:
    """Every 50 ms, which source address the VPC host's echo service saw from ``node``."""
    samples: list[tuple[float, str]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), echo_from(lab_, node)))
            time.sleep(0.05)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join(10)


def test_killing_the_active_gateway_agent_fails_over_to_ec2_b(lab: Any) -> None:
    lab_, kube, _ = lab
    wait_for(lambda: gw_status(kube).get("ready"), 60, "gateway ready")
    wait_for(lambda: echo_from(lab_, "hybrid-a1") == vpc_ip(lab_, "ec2-a"), 30, "traffic through ec2-a")
    pid = _agent_pid(lab_, "ec2-a")
    with echo_sources(lab_, "hybrid-a1") as samples:
        time.sleep(1.0)
        killed = time.monotonic()
        lab_.stop(pid)
        wait_for(lambda: gw_status(kube).get("activePeer") == "ec2-b", 30, "activePeer ec2-b", interval=0.2)
        moved = time.monotonic()
        wait_for(lambda: any(s == vpc_ip(lab_, "ec2-b") for _, s in samples[-3:]), 30,
                 "traffic through ec2-b", interval=0.2)
    after = [(ts, s) for ts, s in samples if ts >= killed]
    first_b = next(ts for ts, s in after if s == vpc_ip(lab_, "ec2-b"))
    last_ok = max((ts for ts, s in samples if ts <= first_b and s and ts < first_b), default=killed)
    gap = first_b - max(last_ok, killed)
    print(f"\ngateway failover: activePeer moved {moved - killed:.2f}s after the kill; "
          f"traffic gap {gap:.2f}s (first success via ec2-b {first_b - killed:.2f}s after the kill)")
    assert gap <= 10.0
    st = gw_status(kube)
    assert st["activePeer"] == "ec2-b" and st["forwarding"]["ec2-b"]["ready"] is True
    events = [e for e in kube.list(k8s.EVENTS, "default")[0] if e.get("reason") == "Failover"]
    assert any("ec2-a" in (e.get("note") or "") and "ec2-b" in (e.get("note") or "") for e in events), events
    nft = lab_.exec("ec2-b", ["nft", "list", "table", "inet", "wirekube"], check=True).stdout
    assert "masquerade" in nft


def test_unreachable_health_target_fails_over_with_a_measured_gap(lab: Any) -> None:
    """ec2-a's agent back (it withdraws, then the controller fails back to it); then ec2-a loses
    the VPC host (a blackhole route: health check *and* forwarding fail) -> ec2-b takes over."""
    lab_, kube, h = lab
    records = [ProcessRecord.from_json(p) for p in lab_._state.read()["processes"]]  # noqa: SLF001
    if not any("--node-name=ec2-a" in r.argv and is_alive(r) for r in records):
        orchestrate.start_agent(lab_, h, "ec2-a")
    wait_for(lambda: (s := gw_status(kube)).get("activePeer") == "ec2-a" and s.get("ready"), 60,
             "failback to ec2-a")
    wait_for(lambda: echo_from(lab_, "hybrid-a1") == vpc_ip(lab_, "ec2-a"), 30, "traffic through ec2-a")
    target = str(lab_.hosts["vpc-host"].address)
    try:
        with echo_sources(lab_, "hybrid-a1") as samples:
            time.sleep(1.0)
            cut = time.monotonic()
            lab_.exec("ec2-a", ["ip", "route", "add", "blackhole", f"{target}/32"], check=True)
            wait_for(lambda: gw_status(kube).get("activePeer") == "ec2-b", 30, "activePeer ec2-b", interval=0.2)
            moved = time.monotonic()
            wait_for(lambda: any(s == vpc_ip(lab_, "ec2-b") for _, s in samples[-3:]), 30,
                     "traffic through ec2-b", interval=0.2)
    finally:
        lab_.exec("ec2-a", ["ip", "route", "del", "blackhole", f"{target}/32"])
    last_ok = max((ts for ts, s in samples if s and ts <= cut + 0.5), default=cut)
    first_b = next(ts for ts, s in samples if ts >= cut and s == vpc_ip(lab_, "ec2-b"))
    gap = first_b - last_ok
    print(f"\nhealth-target failover: activePeer moved {moved - cut:.2f}s after the cut; "
          f"traffic gap {gap:.2f}s (interval 1s, timeout 1s, threshold 2; goal <= 5s)")
    assert gap <= 5.0
    st = gw_status(kube)
    assert st["peerHealthDetail"]["ec2-a"]["consecutiveFailures"] >= 2
    assert lab_.exec("ec2-a", ["nft", "list", "table", "inet", "wirekube"]).returncode != 0, "ec2-a kept its rules"
