"""The EKS Hybrid guide's whole scenario on a lab, and the four-plane check that proves it.

What ``wirekube-lab up`` runs on any topology (``make lab`` on the default one):

- the mesh with pod CIDR sync (``podCIDRSync: node``) and the nodes' InternalIPs in their
  AllowedIPs (the API server reaches a hybrid kubelet at its InternalIP);
- when the topology has a private network with a gateway and a host (the "VPC"): the real
  gateway controller and one WireKubeGateway named after the network, its nodes as gateway peers
  (the network's ``gateway`` first), the subnet as its route, SNAT, an ICMP health check on the
  first host and a virtual IP the hosts route the hybrid CIDRs to (their topology routes via the
  gateway node now go via the virtual IP, so both directions follow ``status.activePeer``);
- a stand-in kubelet on every hybrid node: a TCP listener on 10250 that answers its node name;
- Cilium-style VXLAN among the hybrid nodes (:func:`start_overlay`): a hybrid pod reaches another
  hybrid node's pods through a VXLAN device whose UDP packets go from InternalIP to InternalIP,
  and so over WireGuard.

The four planes (:func:`check_planes`), each a row with its result and latency:

1. node -> node: every ordered pair, mesh IP to mesh IP (the pair matrix);
2. hybrid pod -> hybrid pod: every ordered pair of pods on different hybrid nodes, VXLAN over
   WireGuard;
3. EC2 pod -> hybrid pod: every EC2 pod to every hybrid pod, routed by pod CIDR over WireGuard;
4. VPC host -> hybrid kubelet: TCP to every hybrid node's InternalIP:10250 through the gateway
   (the path of ``kubectl exec/logs`` in EKS Hybrid Nodes), answered with that node's name.

"EC2" nodes are those of ``nat: none`` sites, "hybrid" every other node (as the lab's Node
labels ``eks.amazonaws.com/compute-type`` say).
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from wirekube import k8s
from wirekube.lab import orchestrate
from wirekube.lab.net import Lab
from wirekube.lab.topology import PrivateNetwork, Topology
from wirekube.models import mesh_from_cr
from wirekube.progress import step
from wirekube.waiting import wait_for

KUBELET = 10250
PY = orchestrate.PY
OVERLAY_DEV = "wkovl0"
OVERLAY_VNI = 7
OVERLAY_PORT = 8472  # Cilium's VXLAN port
OVERLAY_TABLE = 201
OVERLAY_PRIORITY = 150  # after WireGuard's own fwmark rule (100), before the mesh's table 22347 (200)
OVERLAY_HOPS = "100.64.42."  # next hops on the overlay, only in its table (no address on the device)
MESH_OVERRIDES: dict[str, Any] = {"autoAllowedIPs": {"includeNodeInternalIP": True}, "podCIDRSync": "node"}

# A stand-in kubelet: accepts TCP on 10250 and answers with its node's name.
KUBELET_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(64)
while True:
    c, _ = s.accept()
    try:
        c.sendall(sys.argv[1].encode())
    except OSError:
        pass
    c.close()
"""

# Run inside the VPC host: connect to each HOST:PORT, read the answer; prints one JSON list of
# {"target", "answer", "ms"} (ms: connect + answer), in argument order.
TCP_PROBE = """
import json, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
def probe(target):
    host, port = target.rsplit(":", 1)
    t0 = time.perf_counter()
    try:
        with socket.create_connection((host, int(port)), 2) as s:
            s.settimeout(2)
            answer = s.recv(200).decode(errors="replace")
        return {"target": target, "answer": answer, "ms": round((time.perf_counter() - t0) * 1000, 2)}
    except OSError as e:
        return {"target": target, "answer": "", "ms": None, "error": str(e)}
with ThreadPoolExecutor(16) as pool:
    print(json.dumps(list(pool.map(probe, sys.argv[1:]))))
"""


# ---- the scenario's objects ------------------------------------------------------------------


def vpc_network(topology: Topology) -> PrivateNetwork | None:
    """The first private network with a gateway node and a host: the guide's VPC."""
    return next((n for n in topology.networks if n.gateway and n.hosts and n.attachments), None)


def virtual_ip(network: PrivateNetwork) -> str:
    """An address near the top of the subnet that no node or host has (``.250`` of a /24)."""
    taken = {a.address for a in network.attachments} | {h.address for h in network.hosts}
    candidate = network.cidr.broadcast_address - 5
    while candidate in taken or candidate <= network.cidr.network_address:
        candidate -= 1
    return f"{candidate}/{network.cidr.prefixlen}"


def gateway_object(topology: Topology) -> dict[str, Any] | None:
    """The VPC's WireKubeGateway (see the module docstring), or None without a VPC."""
    net = vpc_network(topology)
    if net is None:
        return None
    assert net.gateway is not None
    peers = [net.gateway, *[a.node for a in net.attachments if a.node != net.gateway]]
    return {"metadata": {"name": net.name}, "spec": {
        "peerRefs": peers, "routes": [{"cidr": str(net.cidr), "description": f"{net.name} subnet"}],
        "snat": {"enabled": True}, "virtualIP": virtual_ip(net),
        "healthCheck": {"enabled": True, "target": str(net.hosts[0].address), "intervalSeconds": 1,
                        "timeoutSeconds": 1, "failureThreshold": 2}}}


def hybrid_nodes(lab: Lab) -> list[str]:
    return sorted(n for n, info in lab.nodes.items() if info.nat.value != "none")


def ec2_nodes(lab: Lab) -> list[str]:
    return sorted(n for n, info in lab.nodes.items() if info.nat.value == "none")


def start_kubelets(lab: Lab, nodes: Sequence[str]) -> None:
    for node in nodes:
        lab.spawn_in_node(node, [PY, "-c", KUBELET_SERVER, node, str(KUBELET)], lab.log_dir / f"kubelet-{node}.log")


def _vtep_mac(index: int) -> str:
    return f"02:77:6b:00:{index // 256:02x}:{index % 256:02x}"


def start_overlay(lab: Lab, nodes: Sequence[str], mesh_mtu: int) -> None:
    """Cilium-style VXLAN among ``nodes`` (those with a pod CIDR): on each, a VXLAN device (VNI 7,
    UDP 8472, from its InternalIP, static FDB and neighbour entries per other node) and, in table
    201, each other node's pod CIDR via that node's VTEP.  Policy rules (priority 150) send those pod
    CIDRs to table 201 ahead of the mesh's table 22347, as Cilium's datapath decides before the
    kernel's routing; the VXLAN packets themselves (to an InternalIP) then follow table 22347 into
    WireGuard.  EC2 nodes have no overlay: their pods reach hybrid pods by pod CIDR over WireGuard."""
    members = [n for n in nodes if lab.nodes[n].pod_cidr is not None]
    index = {n: i + 1 for i, n in enumerate(members)}
    for node in members:
        lines = ["set -e",
                 f"ip link add {OVERLAY_DEV} address {_vtep_mac(index[node])} type vxlan id {OVERLAY_VNI} "
                 f"dstport {OVERLAY_PORT} local {lab.nodes[node].lan_ip} nolearning",
                 f"ip link set {OVERLAY_DEV} mtu {mesh_mtu - 50} up"]
        for other in members:
            if other == node:
                continue
            hop, info = f"{OVERLAY_HOPS}{index[other]}", lab.nodes[other]
            lines += [f"bridge fdb append {_vtep_mac(index[other])} dev {OVERLAY_DEV} dst {info.lan_ip}",
                      f"ip neigh replace {hop} lladdr {_vtep_mac(index[other])} dev {OVERLAY_DEV} nud permanent",
                      f"ip route replace {info.pod_cidr} via {hop} dev {OVERLAY_DEV} onlink table {OVERLAY_TABLE}",
                      f"ip rule add to {info.pod_cidr} table {OVERLAY_TABLE} priority {OVERLAY_PRIORITY}"]
        lab.exec(node, ["sh", "-c", "\n".join(lines)], check=True)


def overlay_tx_packets(lab: Lab, node: str) -> int:
    """Packets ``node`` sent through its VXLAN device (0 without one)."""
    out = lab.exec(node, ["ip", "-s", "-j", "link", "show", OVERLAY_DEV], check=False)
    if out.returncode != 0:
        return 0
    return int(json.loads(out.stdout)[0]["stats64"]["tx"]["packets"])


def route_hosts_via_virtual_ip(lab: Lab, gateway: dict[str, Any]) -> None:
    """Each VPC host's topology routes via the gateway node now go via the virtual IP."""
    net = next(n for n in lab.topology.networks if n.name == gateway["metadata"]["name"])
    first = next(a.address for a in net.attachments if a.node == net.gateway)
    vip = gateway["spec"]["virtualIP"].split("/")[0]
    for host in net.hosts:
        for route in host.routes:
            if route.via == first:
                lab.exec(host.name, ["ip", "route", "replace", str(route.to), "via", vip], check=True)


def gateway_status(kube: k8s.Kube, name: str) -> dict[str, Any]:
    return kube.get(k8s.GATEWAYS, name).get("status") or {}


def up(topology: Topology, name: str, *, wait: float = 120.0) -> orchestrate.LabHandle:
    """The whole scenario (module docstring); returns when the mesh converged and the gateway is
    ready on its first peer (or raises)."""
    gateway = gateway_object(topology)
    h = orchestrate.up(topology, name, wait=wait, controller=gateway is not None,
                       gateways=[gateway] if gateway else [], mesh_overrides=MESH_OVERRIDES)
    lab, kube, _ = orchestrate.attach(name)
    try:
        start_kubelets(lab, hybrid_nodes(lab))
        # The interface MTU as the agents read it (spec.mtu is a number or "auto").
        start_overlay(lab, hybrid_nodes(lab), mesh_from_cr(kube.get(k8s.MESHES, "default")).spec.mtu)
        if gateway is not None:
            gw = gateway["metadata"]["name"]
            first = gateway["spec"]["peerRefs"][0]
            step("lab", 6, 6, f"waiting for WireKubeGateway {gw} to be ready on {first}")
            route_hosts_via_virtual_ip(lab, gateway)
            # The first healthy peer at start-up wins; the controller fails back to the first
            # peer once it has been healthy for the failback delay.
            wait_for(lambda: (s := gateway_status(kube, gw)).get("ready") and s.get("activePeer") == first,
                     60, f"gateway {gw} ready on {first}")
    except BaseException:
        kube.close()
        orchestrate.down(name)
        raise
    kube.close()
    return h


# ---- status: gateways and planes ------------------------------------------------------------


def collect_gateways(kube: k8s.Kube) -> list[dict[str, Any]]:
    out = []
    for g in sorted(kube.list(k8s.GATEWAYS)[0], key=lambda g: g["metadata"]["name"]):
        st = g.get("status") or {}
        out.append({"name": g["metadata"]["name"], "peers": list(g["spec"].get("peerRefs") or []),
                    "activePeer": st.get("activePeer") or "", "ready": bool(st.get("ready")),
                    "peerHealth": dict(st.get("peerHealth") or {}),
                    "virtualIP": g["spec"].get("virtualIP") or ""})
    return out


@dataclass(frozen=True)
class Plane:
    name: str
    path: str
    total: int
    passed: int
    rtt_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["result"] = "pass" if self.ok else ("n/a" if self.total == 0 else "fail")
        d["medianMs"] = round(statistics.median(self.rtt_ms), 2) if self.rtt_ms else None
        d["maxMs"] = round(max(self.rtt_ms), 2) if self.rtt_ms else None
        d["rttMs"] = d.pop("rtt_ms")
        return d


def _plane(name: str, path: str, results: Sequence[tuple[str, float | None]]) -> Plane:
    rtts = [r for _, r in results if r is not None]
    return Plane(name, path, len(results), len(rtts), rtts, [what for what, r in results if r is None])


def _ping_all(lab: Lab, probes: Sequence[tuple[str, str, str]]) -> list[tuple[str, float | None]]:
    """``(label, source target, destination address)`` -> ``(label, RTT ms or None)``."""

    def one(probe: tuple[str, str, str]) -> tuple[str, float | None]:
        label, src, dst = probe
        rtt = orchestrate.ping(lab, src, dst)
        if rtt is None:  # one lost echo on a loaded machine is not a dead path
            rtt = orchestrate.ping(lab, src, dst, timeout=2.0)
        return label, rtt

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, probes))


def _pods_of(lab: Lab, nodes: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(pod, node, address)`` of every pod on these nodes."""
    return sorted((p.name, p.node, str(p.address)) for p in lab.pods.values() if p.node in nodes)


def kubelet_probe(lab: Lab, host: str, nodes: Sequence[str]) -> list[tuple[str, float | None]]:
    """TCP from ``host`` to each node's InternalIP:10250; a success must be answered by that node."""
    targets = [f"{lab.nodes[n].lan_ip}:{KUBELET}" for n in nodes]
    if not targets:
        return []
    done = lab.exec(host, [PY, "-c", TCP_PROBE, *targets], check=False, timeout=30)
    answers = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else []
    out: list[tuple[str, float | None]] = []
    for node, target in zip(nodes, targets, strict=True):
        a: dict[str, Any] = next((a for a in answers if a["target"] == target), {})
        out.append((f"{host} -> {node} ({target})", a.get("ms") if a.get("answer") == node else None))
    return out


def _why_not_routed(kube: k8s.Kube, lab: Lab, gateway: str, node: str) -> str:
    """Why the active gateway does not route ``node``'s InternalIP into the mesh, from the
    agents' RouteNotGranted Events ("" when none says so)."""
    if not gateway:
        return ": the gateway has no active peer"
    entry = f"{lab.nodes[node].lan_ip}/32"
    notes = [e.get("note") or "" for e in kube.list(k8s.EVENTS, "default")[0]
             if e.get("reason") == "RouteNotGranted" and (e.get("regarding") or {}).get("name") == node]
    why = next((n for n in reversed(notes) if n.startswith(f"node {gateway} ") and f" {entry} " in n), "")
    return f": {why}" if why else ""


def check_planes(lab: Lab, kube: k8s.Kube, pairs: Sequence[dict[str, Any]] | None = None) -> list[Plane]:
    """The four planes (module docstring).  ``pairs``: the pair matrix of
    :func:`orchestrate.collect` when already measured."""
    if pairs is None:
        pairs = orchestrate.collect(lab, kube)["pairs"]
    hybrid, ec2 = hybrid_nodes(lab), ec2_nodes(lab)
    planes = [_plane("node -> node", "every ordered pair, mesh IP to mesh IP",
                     [(f"{p['from']} -> {p['to']}", p["rttMs"] if p["transport"] != "none" else None)
                      for p in pairs])]
    hybrid_pods, ec2_pods = _pods_of(lab, hybrid), _pods_of(lab, ec2)
    pod_pairs = [(f"{a} -> {b}", a, ip_b) for a, na, _ in hybrid_pods for b, nb, ip_b in hybrid_pods if na != nb]
    ec2_to_hybrid = [(f"{a} -> {b}", a, ip_b) for a, _, _ in ec2_pods for b, _, ip_b in hybrid_pods]
    results = _ping_all(lab, pod_pairs + ec2_to_hybrid)
    overlay = lab.exec(hybrid[0], ["ip", "link", "show", OVERLAY_DEV], check=False).returncode == 0 if hybrid else False
    planes.append(_plane("hybrid pod -> hybrid pod",
                         f"VXLAN {OVERLAY_PORT} between InternalIPs, over WireGuard" if overlay
                         else "pod CIDRs over WireGuard", results[:len(pod_pairs)]))
    planes.append(_plane("EC2 pod -> hybrid pod", "pod CIDRs over WireGuard", results[len(pod_pairs):]))
    gateways = kube.list(k8s.GATEWAYS)[0]
    net = vpc_network(lab.topology)
    if net is not None:
        via = next((g for g in gateways if g["metadata"]["name"] == net.name), None)
        path = f"TCP {KUBELET} via gateway {net.name}" if via else f"TCP {KUBELET} (no WireKubeGateway {net.name})"
        probes = kubelet_probe(lab, net.hosts[0].name, hybrid)
        if via is not None and any(rtt is None for _, rtt in probes):
            active = (via.get("status") or {}).get("activePeer") or ""
            probes = [(label + _why_not_routed(kube, lab, active, node) if rtt is None else label, rtt)
                      for (label, rtt), node in zip(probes, hybrid, strict=True)]
        planes.append(_plane("VPC host -> hybrid kubelet", path, probes))
    else:
        planes.append(Plane("VPC host -> hybrid kubelet", "no private network with a gateway in this topology", 0, 0))
    return planes


def wait_planes(lab: Lab, kube: k8s.Kube, timeout: float,
                on_pass: Callable[[list[Plane]], None] | None = None) -> list[Plane]:
    """Check the planes until all pass or ``timeout``; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        planes = check_planes(lab, kube)
        if all(p.ok or p.total == 0 for p in planes) or time.monotonic() >= deadline:
            return planes
        step("lab", 6, 6, "planes: " + ", ".join(f"{p.name} {p.passed}/{p.total}" for p in planes))
        time.sleep(1)


def render_gateways(gateways: Sequence[dict[str, Any]]) -> str:
    if not gateways:
        return ""
    lines = [f"{'GATEWAY':<12} {'ACTIVE':<12} {'READY':<6} {'VIRTUAL-IP':<17} HEALTH"]
    for g in gateways:
        health = ",".join(f"{k}={v}" for k, v in sorted(g["peerHealth"].items())) or "-"
        lines.append(f"{g['name']:<12} {g['activePeer'] or '-':<12} {str(g['ready']).lower():<6} "
                     f"{g['virtualIP'] or '-':<17} {health}")
    return "\n".join(lines) + "\n"


def render_planes(planes: Sequence[Plane]) -> str:
    lines = [f"{'PLANE':<28} {'RESULT':<12} {'MEDIAN ms':>9} {'MAX ms':>7}  PATH"]
    for p in planes:
        j = p.to_json()
        result = f"{j['result']} {p.passed}/{p.total}" if p.total else "n/a"
        median = f"{j['medianMs']:.2f}" if j["medianMs"] is not None else "-"
        worst = f"{j['maxMs']:.2f}" if j["maxMs"] is not None else "-"
        lines.append(f"{p.name:<28} {result:<12} {median:>9} {worst:>7}  {p.path}")
        for failure in p.failures[:5]:
            lines.append(f"{'':<28} failed: {failure}")
        if len(p.failures) > 5:
            lines.append(f"{'':<28} ... and {len(p.failures) - 5} more")
    return "\n".join(lines) + "\n"
