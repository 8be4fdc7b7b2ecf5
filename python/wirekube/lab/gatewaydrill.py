"""Gateway failover drills on the ``eks-hybrid`` lab, shared by the lab test and ``make bench``.

The lab: the built-in ``eks-hybrid`` topology, the real gateway controller and one
WireKubeGateway ``vpc`` with both EC2 nodes as gateway peers (ec2-a first), the VPC subnet as its
route, SNAT, an ICMP health check on the VPC host (1 s interval, 1 s timeout, threshold 2) and
the virtual IP 10.100.0.250/24.  The VPC host routes the hybrid CIDRs to that virtual IP, so
traffic in *both* directions follows ``status.activePeer``:

- hybrid -> VPC ("echo"): a hybrid node connects to an echo service on the VPC host, which
  answers with the source address it saw: the active gateway's VPC address (SNAT).
- VPC -> hybrid ("kubelet"): the VPC host connects to a hybrid node's InternalIP port 10250
  (the scenario's stand-in kubelet answers with its node name), the path ``kubectl exec/logs``
  takes in EKS Hybrid Nodes.

A drill samples both every ~50 ms while it breaks the active gateway (its agent stopped, or its
health target made unreachable) and reports how long each direction was dark.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from wirekube import k8s
from wirekube.lab import orchestrate, scenario
from wirekube.lab.net import Lab
from wirekube.lab.topology import builtin_topology
from wirekube.waiting import wait_for

GW = "vpc"
VPC = "10.100.0.0/24"
VIP = "10.100.0.250/24"  # nodes take .10, .11 ... on the VPC subnet
KUBELET = scenario.KUBELET
ECHO = 18080
PY = orchestrate.PY

ECHO_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {ECHO})); s.listen(64)
while True:
    c, a = s.accept(); c.sendall(a[0].encode()); c.close()
"""


def gateway_object() -> dict[str, Any]:
    """The scenario's gateway for eks-hybrid: ec2-a then ec2-b, the VPC subnet, SNAT, VIP, health
    check on the VPC host (:func:`wirekube.lab.scenario.gateway_object`)."""
    gw = scenario.gateway_object(builtin_topology("eks-hybrid"))
    assert gw is not None and gw["metadata"]["name"] == GW and gw["spec"]["virtualIP"] == VIP, gw
    return gw


def up(name: str | None = None) -> tuple[Lab, k8s.Kube, Any]:
    """Start the gateway lab (see the module docstring); returns ``(lab, kube, handle)``.

    The lab is :func:`wirekube.lab.scenario.up` on ``eks-hybrid`` (what ``wirekube-lab up
    eks-hybrid`` builds: the VPC host already routes the hybrid CIDRs to the virtual IP, and every
    hybrid node runs a stand-in kubelet) plus the echo service on the VPC host."""
    name = name or f"gw{uuid.uuid4().hex[:5]}"
    scenario.up(builtin_topology("eks-hybrid"), name, wait=90)
    lab, kube, h = orchestrate.attach(name)
    lab.spawn("vpc-host", [PY, "-c", ECHO_SERVER], lab.log_dir / "echo-vpc-host.log")
    return lab, kube, h


def status(kube: k8s.Kube) -> dict[str, Any]:
    return kube.get(k8s.GATEWAYS, GW).get("status") or {}


def vpc_ip(lab: Lab, node: str) -> str:
    return str(lab.nodes[node].private["vpc"])


def _client(host: str, port: int, timeout: float = 1.0) -> str:
    return (f"import socket,sys\ns=socket.create_connection(({host!r},{port}),{timeout})\n"
            f"s.settimeout({timeout})\nsys.stdout.write(s.recv(200).decode(errors='replace'))")


def echo_from(lab: Lab, node: str) -> str:
    """The source address the VPC host's echo service saw for a connection from ``node`` ("" if none)."""
    out = lab.exec(node, [PY, "-c", _client(str(lab.hosts["vpc-host"].address), ECHO)], check=False, timeout=5)
    return out.stdout.strip() if out.returncode == 0 else ""


def kubelet_from_vpc(lab: Lab, node: str) -> bool:
    """The VPC host reached ``node``'s stand-in kubelet (it answers with its node name)."""
    out = lab.exec("vpc-host", [PY, "-c", _client(str(lab.nodes[node].lan_ip), KUBELET)], check=False, timeout=5)
    return out.returncode == 0 and out.stdout.strip() == node


def agent_pid(lab: Lab, node: str) -> int | None:
    """The PID of ``node``'s running agent, from the lab's own process records (never by name)."""
    running = orchestrate.running_agents(lab, node)
    return running[0].pid if running else None


@contextlib.contextmanager
def sampling(probe: Callable[[], Any], every: float = 0.05) -> Iterator[list[tuple[float, Any]]]:
    """``(monotonic time, probe())`` about every ``every`` seconds until the block ends."""
    samples: list[tuple[float, Any]] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), probe()))
            stop.wait(every)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join(10)


def dark_gap(samples: list[tuple[float, Any]], start: float, through_new: Callable[[Any], bool],
             not_before: float | None = None) -> float | None:
    """The longest time between two successful samples, counting the stretches that end after
    ``start`` and up to the first success ``through_new`` the new gateway at or after
    ``not_before`` (default ``start``); None when that never came.

    Like a ping's longest gap: with samples every ~0.1 s an undisturbed path shows ~0.1 s.
    """
    since = start if not_before is None else not_before
    end = next((ts for ts, v in samples if ts >= since and through_new(v)), None)
    if end is None:
        return None
    longest, prev = 0.0, None
    for ts, v in samples:
        if ts > end:
            break
        if v:
            if prev is not None and ts >= start:
                longest = max(longest, ts - prev)
            prev = ts
    return longest


@dataclass(frozen=True)
class DrillResult:
    kind: str
    moved_s: float
    """From the fault to status.activePeer = ec2-b."""
    echo_gap_s: float
    """hybrid -> VPC: longest dark stretch until the echo came back through ec2-b."""
    kubelet_gap_s: float
    """VPC -> hybrid: the same for the VPC host reaching the hybrid node's kubelet port."""


def _drill(lab: Lab, kube: k8s.Kube, kind: str, fault: Callable[[], object]) -> DrillResult:
    wait_for(lambda: (s := status(kube)).get("ready") and s.get("activePeer") == "ec2-a", 90, "ec2-a active")
    wait_for(lambda: echo_from(lab, "hybrid-a1") == vpc_ip(lab, "ec2-a"), 30, "traffic through ec2-a")
    wait_for(lambda: kubelet_from_vpc(lab, "hybrid-a1"), 30, "vpc-host -> hybrid-a1 kubelet")
    b = vpc_ip(lab, "ec2-b")
    with sampling(lambda: echo_from(lab, "hybrid-a1")) as echo, \
            sampling(lambda: kubelet_from_vpc(lab, "hybrid-a1")) as kubelet:
        wait_for(lambda: len(echo) >= 3 and len(kubelet) >= 3, 30, "samples before the fault")
        start = time.monotonic()
        fault()
        wait_for(lambda: status(kube).get("activePeer") == "ec2-b", 30, "activePeer ec2-b")
        moved = time.monotonic() - start
        wait_for(lambda: any(v == b for _, v in echo[-3:]), 30, "hybrid -> VPC through ec2-b")
        vip_on_b = lambda: VIP.split("/")[0] + "/" in lab.exec("ec2-b", ["ip", "-4", "addr"], check=True).stdout  # noqa: E731
        wait_for(vip_on_b, 30, "ec2-b holds the virtual IP")
        seen_b = time.monotonic()
        wait_for(lambda: any(ts > seen_b and v for ts, v in kubelet), 30, "VPC -> hybrid after the move")
    echo_gap = dark_gap(echo, start, lambda v: v == b)
    # Success once ec2-b holds the VIP counts as "through ec2-b" for the kubelet direction.
    kube_gap = dark_gap(kubelet, start, bool, not_before=seen_b)
    if echo_gap is None or kube_gap is None:
        raise RuntimeError(f"{kind}: traffic seen through ec2-b during the drill but not in the samples")
    return DrillResult(kind, round(moved, 3), round(echo_gap, 3), round(kube_gap, 3))


def stop_agent_drill(lab: Lab, kube: k8s.Kube) -> DrillResult:
    """Stop ec2-a's agent (by the PID the lab recorded) while it is the active gateway."""
    pid = agent_pid(lab, "ec2-a")
    assert pid is not None, "ec2-a's agent is not running"
    return _drill(lab, kube, "agent-stopped", lambda: lab.stop(pid))


def health_target_drill(lab: Lab, kube: k8s.Kube) -> DrillResult:
    """ec2-a loses the VPC host (a blackhole route: its health check and its forwarding fail)."""
    target = str(lab.hosts["vpc-host"].address)
    try:
        return _drill(lab, kube, "health-target-lost",
                      lambda: lab.exec("ec2-a", ["ip", "route", "add", "blackhole", f"{target}/32"], check=True))
    finally:
        lab.exec("ec2-a", ["ip", "route", "del", "blackhole", f"{target}/32"])


def restore(lab: Lab, kube: k8s.Kube, h: Any) -> None:
    """ec2-a's agent running again and the gateway failed back to it."""
    if agent_pid(lab, "ec2-a") is None:
        orchestrate.start_agent(lab, h, "ec2-a")
    wait_for(lambda: (s := status(kube)).get("activePeer") == "ec2-a" and s.get("ready"), 90, "failback to ec2-a")
