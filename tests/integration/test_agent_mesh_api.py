"""The mesh driven by the real API server: agents in node namespaces, real wireguard-go.

Each node is a network namespace on one bridge (tests/integration/agent_netns.py) running a
real agent (``python -m wirekube.agent.main --kubeconfig``, the ``wirekube-agent`` entry point)
that reaches a *private* kube-apiserver (this module stops it for a minute, and it owns the mesh
singleton) through ``wirekube.lab.apiproxy`` on the namespace's 127.0.0.1:6443.  The test only
creates the WireKubeMesh and the Node objects; the agents register their own WireKubePeers.

The tests share one mesh and run in file order: 3 nodes -> a 4th joins -> peer deletion ->
kill -9 -> API server outage.  Each starts by bringing the mesh to the members it needs and
checking that it is whole, so each also runs on its own (``-k``).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_netns import (
    LISTEN_PORT,
    MESH_CIDR,
    ContinuousPing,
    NetnsLab,
    Node,
    PingResult,
    table_routes,
    wait_for,
    wg_dump,
    wirekube_rules,
)
from wirekube import errors, k8s
from wirekube.lab.cluster import ControlPlane, write_kubeconfig

pytestmark = [
    pytest.mark.netns,
    pytest.mark.apiserver,
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go"),
    pytest.mark.timeout(300),
]

CONVERGE = 45.0
RESYNC = 5.0
OUTAGE = 60.0
EXPECTED_RULES = [
    "100:\tfrom all fwmark 0x574b lookup main",
    "199:\tfrom all to 127.0.0.1 lookup main",  # the API server (via the node's loopback) bypasses the mesh
    "200:\tfrom all lookup 22347",
]


@dataclass
class Mesh:
    cp: ControlPlane
    kube: k8s.Kube
    lab: NetnsLab
    proxies: list[subprocess.Popen[str]] = field(default_factory=list)
    pings: list[ContinuousPing] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return next(n for n in self.lab.nodes if n.name == name)

    def members(self) -> list[Node]:
        """Nodes whose agent is running."""
        return [n for n in self.lab.nodes if n.agent is not None and n.agent.poll() is None]

    def ensure(self, count: int) -> list[Node]:
        """At least ``count`` running members (so a test also runs on its own, e.g. with -k)."""
        for n in self.lab.nodes:
            if n.agent is None or n.agent.poll() is not None:
                self.lab.start_agent(n, resync=RESYNC)
        while len(self.lab.nodes) < count:
            self.join(f"n{len(self.lab.nodes)}")
        nodes = self.members()
        assert [n.name for n in nodes] == [f"n{i}" for i in range(len(nodes))], [n.name for n in nodes]
        for n in nodes:
            self.wait_registered(n)
        self.wait_full_mesh(nodes)
        return nodes

    # -------------------------------------------------------------- cluster side

    def join(self, name: str) -> Node:
        """A new machine: namespace on the bridge, API path, Node object, agent."""
        node = self.lab.add_node(name)
        proxy = subprocess.Popen(
            [sys.executable, "-m", "wirekube.lab.apiproxy", "--target",
             f"127.0.0.1:{self.cp.state.apiserver_port}", node.netns],  # type: ignore[union-attr]
            stdout=subprocess.PIPE, stderr=self._proxy_log(), text=True)
        self.proxies.append(proxy)
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready", "apiproxy did not start"
        self.kube.create(k8s.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
        self.kube.patch_status(k8s.NODES, name, {"status": {"addresses": [
            {"type": "InternalIP", "address": str(node.address)}, {"type": "Hostname", "address": name}]}})
        self.lab.start_agent(node, resync=RESYNC)
        return node

    def _proxy_log(self) -> int:
        fd = os.open(self.lab.workdir / "apiproxy.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._fds.append(fd)
        return fd

    def peer(self, name: str) -> dict[str, Any] | None:
        try:
            return self.kube.get(k8s.PEERS, name)
        except errors.NotFound:
            return None

    def mesh_ip(self, node: Node) -> ipaddress.IPv4Address:
        peer = self.peer(node.name)
        assert peer is not None, f"{node.name} has no WireKubePeer"
        return ipaddress.ip_interface(peer["spec"]["allowedIPs"][0]).ip  # type: ignore[return-value]

    def wait_registered(self, node: Node) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            p = self.peer(node.name)
            return p if p is not None and p["spec"].get("publicKey") == node.public_key else None

        return wait_for(ok, CONVERGE, f"{node.name} registering its WireKubePeer", interval=0.25)

    # -------------------------------------------------------------- dataplane side

    def wait_full_mesh(self, nodes: Sequence[Node]) -> None:
        ips = {n.name: self.mesh_ip(n) for n in nodes}
        for src in nodes:
            for dst in nodes:
                if src is not dst:
                    wait_for(lambda: self.lab.reachable(src, ips[dst.name]), CONVERGE,
                             f"{src.name} -> {dst.name} ({ips[dst.name]}) over wire_kube")

    def once(self, nodes: Sequence[Node]) -> dict[str, dict[str, Any]]:
        """``--once --dry-run`` on every node, in parallel (each takes ~10 s to stop its informers)."""
        with ThreadPoolExecutor(len(nodes)) as pool:
            return dict(zip([n.name for n in nodes], pool.map(self.lab.once, nodes), strict=True))

    def assert_clean_dataplane(self, node: Node, peers: Sequence[Node]) -> None:
        """Exactly one of everything: rules, routes, addresses, WireGuard peers, daemon."""
        want_routes = sorted(f"{self.mesh_ip(p)} dev wire_kube proto static scope link" for p in peers)
        assert sorted(wirekube_rules(node)) == EXPECTED_RULES, (node.name, wirekube_rules(node))
        assert sorted(r.strip() for r in table_routes(node)) == want_routes, (node.name, table_routes(node))
        assert sorted(wg_dump(node)) == sorted(p.public_key for p in peers), node.name
        addrs = node.run("ip", "-4", "-o", "addr", "show", "dev", "wire_kube").stdout.splitlines()
        assert len(addrs) == 1 and f"{self.mesh_ip(node)}/32" in addrs[0], (node.name, addrs)
        assert len(self.lab.daemon_pids(node)) == 1, f"{node.name}: wireguard-go {self.lab.daemon_pids(node)}"

    def ping(self, src: Node, dst: Node) -> ContinuousPing:
        p = ContinuousPing(src, self.mesh_ip(dst))
        p.label = f"{src.name} -> {dst.name}"
        self.pings.append(p)
        return p

    def stop_pings(self, pings: Sequence[ContinuousPing]) -> dict[str, PingResult]:
        out = {p.label: p.stop() for p in pings}
        for p in pings:
            self.pings.remove(p)
        return out


def log_of(node: Node) -> str:
    assert node.agent_log is not None
    return node.agent_log.read_text(errors="replace")


def applied(node: Node) -> list[str]:
    """The agent's "applied <operation>" log lines so far."""
    return [ln for ln in log_of(node).splitlines() if " - applied " in ln]


def assert_no_loss(results: dict[str, PingResult], at_least: int) -> None:
    for label, r in results.items():
        assert r.transmitted >= at_least, f"{label}: only {r.transmitted} probes sent\n{r.log[-2000:]}"
        assert r.lost == 0 and not r.missing, (
            f"{label}: lost {r.lost} of {r.transmitted} (icmp_seq {list(r.missing)[:20]})\n"
            + "\n".join(ln for ln in r.log.splitlines() if "no answer" in ln)[-3000:])


@pytest.fixture(scope="module")
def mesh(lab_tmp: Path) -> Iterator[Mesh]:
    cp = ControlPlane(lab_tmp / f"mesh-api-{uuid.uuid4().hex[:6]}")
    work = Path(tempfile.mkdtemp(prefix="wkt-meshapi-"))
    lab = NetnsLab(work, kubeconfig=work / "node.kubeconfig")
    kube: k8s.Kube | None = None
    m: Mesh | None = None
    try:
        cp.up()
        kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
        write_kubeconfig(work / "node.kubeconfig", "https://127.0.0.1:6443", cp.pki)
        lab.up()
        kube.create(k8s.MESHES, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeMesh",
                                 "metadata": {"name": "default"},
                                 "spec": {"meshCIDR": MESH_CIDR, "listenPort": LISTEN_PORT, "engine": "userspace",
                                          # a flat network: direct paths only (traversal and relay are tested elsewhere)
                                          "relay": {"mode": "never"}}})
        m = Mesh(cp, kube, lab)
        for i in range(3):
            m.join(f"n{i}")
        yield m
    finally:
        if m is not None:
            for p in m.pings:
                p.kill()
            for proxy in m.proxies:
                if proxy.poll() is None:
                    proxy.terminate()
                try:
                    proxy.wait(10)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait()
            for fd in m._fds:
                os.close(fd)
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
        if kube is not None:
            kube.close()
        cp.down()


# ------------------------------------------------------------------------------------------ tests


def test_three_nodes_form_a_full_mesh_from_the_api_alone(mesh: Mesh) -> None:
    nodes = mesh.lab.nodes[:3]
    for n in nodes:
        peer = mesh.wait_registered(n)
        node_obj = mesh.kube.get(k8s.NODES, n.name)
        assert peer["metadata"]["labels"] == {"wirekube.io/node": n.name}
        assert [o["uid"] for o in peer["metadata"]["ownerReferences"]] == [node_obj["metadata"]["uid"]]
        assert peer["spec"]["endpoint"] == f"{n.address}:{LISTEN_PORT}"
        assert len(peer["spec"]["allowedIPs"]) == 1
        assert ipaddress.ip_network(peer["spec"]["allowedIPs"][0]).subnet_of(ipaddress.ip_network(MESH_CIDR))
    assert len({str(mesh.mesh_ip(n)) for n in nodes}) == 3, "mesh IPs must be distinct"
    mesh.wait_full_mesh(nodes)
    for n in nodes:
        mesh.assert_clean_dataplane(n, [p for p in nodes if p is not n])
    generations = {n.name: mesh.peer(n.name)["metadata"]["generation"] for n in nodes}  # type: ignore[index]
    for name, result in mesh.once(nodes).items():
        assert result["synced"] and result["ops"] == 0 and result["skipped"] == [], (name, result)
    wait_for(lambda: all(mesh.peer(n.name)["status"].get("connected") for n in nodes), CONVERGE,  # type: ignore[index]
             "every agent reporting connected in its status")
    assert {n.name: mesh.peer(n.name)["metadata"]["generation"] for n in nodes} == generations, \
        "a converged agent must not rewrite its peer's spec"


def test_fourth_node_joins_without_disturbing_the_others(mesh: Mesh) -> None:
    nodes = mesh.members()
    assert [n.name for n in nodes] == ["n0", "n1", "n2"]
    mesh.wait_full_mesh(nodes)
    before = {n.name: len(applied(n)) for n in nodes}
    ping = mesh.ping(nodes[0], nodes[1])
    ping.wait_replies(10)
    new = mesh.join("n3")
    mesh.wait_registered(new)
    nodes = [*nodes, new]
    mesh.wait_full_mesh(nodes)
    ping.wait_replies(10)
    assert_no_loss(mesh.stop_pings([ping]), at_least=30)
    for n in nodes[:3]:
        # Joining adds one WireGuard peer and one route; nothing already there is touched.
        changes = applied(n)[before[n.name]:]
        assert len(changes) == 2 and any("add peer" in c for c in changes) and any("AddRoute" in c for c in changes), \
            (n.name, changes)
        mesh.assert_clean_dataplane(n, [p for p in nodes if p is not n])
    for name, result in mesh.once(nodes).items():
        assert result["ops"] == 0, (name, result)


def test_deleted_peer_disappears_everywhere_and_a_running_agent_recreates_it(mesh: Mesh) -> None:
    nodes = mesh.ensure(4)
    gone, rest = nodes[3], nodes[:3]
    gone_ip = mesh.mesh_ip(gone)

    # 1. The node is being decommissioned (agent stopped, SIGTERM leaves its dataplane): an admin
    #    deletes its WireKubePeer -> route and WireGuard peer go on every other node.
    assert gone.agent is not None
    gone.agent.send_signal(signal.SIGTERM)
    assert gone.agent.wait(timeout=15) == 0
    mesh.kube.delete(k8s.PEERS, gone.name)
    for n in rest:
        wait_for(lambda: not any(str(gone_ip) in r for r in table_routes(n)), CONVERGE, f"route removal on {n.name}")
        wait_for(lambda: gone.public_key not in wg_dump(n), CONVERGE, f"WireGuard peer removal on {n.name}")
        mesh.assert_clean_dataplane(n, [p for p in rest if p is not n])
    mesh.wait_full_mesh(rest)
    assert not mesh.lab.reachable(rest[0], gone_ip), "the deleted peer must no longer be reachable"

    # 2. Its agent comes back: it registers again and the mesh re-forms.
    mesh.lab.start_agent(gone, resync=RESYNC)
    first = mesh.wait_registered(gone)
    mesh.wait_full_mesh(nodes)

    # 3. An admin deletes the peer of a *running* agent: the agent recreates it (self-healing),
    #    with the same key and the same mesh IP, and the mesh converges again.
    mesh.kube.delete(k8s.PEERS, gone.name)
    healed = wait_for(lambda: (p := mesh.peer(gone.name)) is not None
                      and p["metadata"]["uid"] != first["metadata"]["uid"] and p, CONVERGE,
                      f"{gone.name} re-creating its deleted WireKubePeer")
    assert healed["spec"]["publicKey"] == gone.public_key
    assert healed["spec"]["allowedIPs"] == first["spec"]["allowedIPs"]
    mesh.wait_full_mesh(nodes)
    for n in nodes:
        mesh.assert_clean_dataplane(n, [p for p in nodes if p is not n])


def test_kill9_agent_loses_no_ping_and_restart_leaves_no_duplicates(mesh: Mesh) -> None:
    nodes = mesh.ensure(4)
    victim = nodes[1]
    daemon = mesh.lab.daemon_pids(victim)
    adoptions = log_of(victim).count("adopted running wireguard-go")
    pings = [mesh.ping(nodes[0], nodes[2]),  # two other nodes
             mesh.ping(victim, nodes[3]), mesh.ping(nodes[3], victim)]  # the victim and another
    for p in pings:
        p.wait_replies(10)
    assert victim.agent is not None
    victim.agent.send_signal(signal.SIGKILL)
    assert victim.agent.wait(timeout=10) == -signal.SIGKILL
    for p in pings:
        p.wait_replies(30)  # 3 s of traffic with no agent on the victim
    assert mesh.lab.daemon_pids(victim) == daemon, "wireguard-go must survive its agent"

    mesh.lab.start_agent(victim, resync=RESYNC)
    wait_for(lambda: log_of(victim).count("adopted running wireguard-go") > adoptions, CONVERGE, "adoption")
    wait_for(lambda: log_of(victim).count("agent started") >= 2, CONVERGE, "restarted agent running")
    for p in pings:
        p.wait_replies(30)  # through the restart and its first reconciles
    assert_no_loss(mesh.stop_pings(pings), at_least=70)
    assert mesh.lab.daemon_pids(victim) == daemon
    for n in nodes:
        mesh.assert_clean_dataplane(n, [p for p in nodes if p is not n])
    result = mesh.once([victim])[victim.name]
    assert result["ops"] == 0, result


def test_api_server_outage_keeps_traffic_and_agents_resume(mesh: Mesh) -> None:
    nodes = mesh.ensure(4)
    pings = [mesh.ping(nodes[0], nodes[1]), mesh.ping(nodes[2], nodes[3]), mesh.ping(nodes[3], nodes[0])]
    for p in pings:
        p.wait_replies(10)
    log_sizes = {n.name: len(log_of(n)) for n in nodes}

    mesh.cp.stop_apiserver()
    try:
        with pytest.raises(errors.ApiError, match="API server unreachable"):
            mesh.kube.list(k8s.PEERS)
        deadline = time.monotonic() + OUTAGE
        while time.monotonic() < deadline:  # the outage itself: watch agents and traffic throughout
            assert all(n.agent is not None and n.agent.poll() is None for n in nodes), "an agent died"
            for p in pings:
                p.wait_replies(5)
        for n in nodes:  # the agents noticed the outage (and kept going)
            assert "retrying in" in log_of(n)[log_sizes[n.name]:], f"{n.name} never saw the API server go away"
    finally:
        mesh.cp.start_apiserver()
        mesh.cp.wait_ready()
    resumed = time.monotonic()

    # A change after the API server is back: an administrator adds an AllowedIPs entry to n2 and
    # grants it (a WireKubeRouteGrant); backed by a real address there, it must reach every other
    # node (routes and WireGuard) and carry traffic.
    extra, extra_ip = "10.77.2.0/24", "10.77.2.1"
    nodes[2].run("ip", "addr", "add", f"{extra_ip}/32", "dev", "lo")
    peer = mesh.peer(nodes[2].name)
    assert peer is not None
    mesh.kube.apply(k8s.ROUTE_GRANTS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeRouteGrant",
                                       "metadata": {"name": f"{nodes[2].name}-extra"},
                                       "spec": {"nodes": [nodes[2].name], "cidrs": [extra]}})
    mesh.kube.patch_merge(k8s.PEERS, nodes[2].name, {"spec": {"allowedIPs": [*peer["spec"]["allowedIPs"], extra]}})
    for n in (nodes[0], nodes[1], nodes[3]):
        wait_for(lambda: any(r.startswith(f"{extra} dev wire_kube") for r in table_routes(n)), CONVERGE,
                 f"route {extra} on {n.name} after the API server came back")
        assert extra in wg_dump(n)[nodes[2].public_key]
        wait_for(lambda: mesh.lab.reachable(n, ipaddress.IPv4Address(extra_ip)), CONVERGE,
                 f"{n.name} -> {extra_ip} via n2")
    converged = time.monotonic() - resumed
    for p in pings:
        p.wait_replies(10)
    assert_no_loss(mesh.stop_pings(pings), at_least=int(OUTAGE * 10))
    after = mesh.peer(nodes[2].name)
    assert after is not None and after["spec"]["allowedIPs"][-1] == extra, "the agent must keep a user-added entry"
    for n in nodes:
        assert n.agent is not None and n.agent.poll() is None
        status = mesh.peer(n.name)["status"]  # type: ignore[index]
        assert status.get("connected") is True, (n.name, status)
    print(f"mesh converged {converged:.1f}s after the API server came back")
