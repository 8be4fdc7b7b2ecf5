"""The agent's dataplane with real wireguard-go, in network namespaces on one bridge.

Agents run as real processes (``python -m wirekube.agent.main``) inside each node namespace, with
mesh and peers from a static file (the API-server-driven tests are in test_agent_apiserver.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agent_netns import NetnsLab, Node, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go"),
    pytest.mark.timeout(300),
]

CONVERGE = 30.0


@pytest.fixture(scope="module")
def lab() -> Iterator[NetnsLab]:
    work = Path(tempfile.mkdtemp(prefix="wkt-agent-"))
    lab = NetnsLab(work).up()
    try:
        nodes = [lab.add_node(f"n{i}") for i in range(3)]
        lab.write_peers(nodes)
        for n in nodes:
            lab.start_agent(n)
        wait_full_mesh(lab, nodes)
        yield lab
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def members(lab: NetnsLab, count: int) -> list[Node]:
    """The first ``count`` nodes as mesh members (created and started when missing)."""
    while len(lab.nodes) < count:
        lab.add_node(f"n{len(lab.nodes)}")
    nodes = lab.nodes[:count]
    lab.write_peers(nodes)
    for n in nodes:
        if n.agent is None or n.agent.poll() is not None:
            lab.start_agent(n)
    return nodes


def wait_full_mesh(lab: NetnsLab, nodes: list[Node]) -> None:
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                wait_for(lambda: lab.reachable(src, dst.mesh_ip), CONVERGE, f"{src.name} -> {dst.name} over wire_kube")


def wirekube_rules(node: Node) -> list[str]:
    lines = node.run("ip", "-4", "rule").stdout.splitlines()
    return [ln for ln in lines if "0x574b" in ln or "lookup 22347" in ln]


def table_routes(node: Node) -> list[str]:
    return node.run("ip", "-4", "route", "show", "table", "22347", check=False).stdout.splitlines()


def wg_peers(node: Node) -> list[str]:
    dump = node.run("wg", "show", "wire_kube", "dump").stdout.splitlines()
    return [line.split("\t")[0] for line in dump[1:]]


class Pinger:
    """``ping -i 0.1`` in the background (10 per second); ``result()`` -> (sent, received)."""

    def __init__(self, lab: NetnsLab, src: Node, dst: Node, seconds: float) -> None:
        self._count = int(seconds * 10)
        self._thread = threading.Thread(target=self._run, args=(lab, src, dst), daemon=True)
        self._result: tuple[int, int] | None = None
        self._thread.start()

    def _run(self, lab: NetnsLab, src: Node, dst: Node) -> None:
        self._result = lab.ping(src, dst.mesh_ip, count=self._count, interval=0.1, timeout=2)

    def result(self) -> tuple[int, int]:
        self._thread.join(timeout=self._count / 10 + 30)
        assert self._result is not None, "ping did not finish"
        return self._result


# ------------------------------------------------------------------------------------------ tests


def test_full_mesh_every_pair_and_second_reconcile_is_empty(lab: NetnsLab) -> None:
    nodes = members(lab, 3)
    wait_full_mesh(lab, nodes)
    for n in nodes:
        result = lab.once(n)
        assert result["synced"] and result["ops"] == 0, (n.name, result)
        assert sorted(wirekube_rules(n)) == ["100:\tfrom all fwmark 0x574b lookup main", "200:\tfrom all lookup 22347"]
        assert len(table_routes(n)) == len(nodes) - 1
        assert n.run("cat", "/proc/sys/net/ipv4/conf/wire_kube/rp_filter").stdout.strip() == "2"
        assert n.run("cat", "/proc/sys/net/ipv4/conf/wire_kube/disable_xfrm").stdout.strip() == "1"
        assert f"{n.mesh_ip}/32" in n.run("ip", "-4", "addr", "show", "wire_kube").stdout
        assert "fwmark: 0x574b" in n.run("wg", "show", "wire_kube").stdout


def test_fourth_node_joins_without_disturbing_the_others(lab: NetnsLab) -> None:
    nodes = members(lab, 3)
    wait_full_mesh(lab, nodes)
    before = {n.name: n.agent_log.read_text().count("update peer") for n in nodes}  # type: ignore[union-attr]
    ping = Pinger(lab, nodes[0], nodes[1], seconds=6)
    nodes = members(lab, 4)
    wait_full_mesh(lab, nodes)
    sent, received = ping.result()
    assert sent == received, f"{sent - received} pings lost between n0 and n1 while n3 joined"
    for n in nodes[:3]:
        assert n.agent_log.read_text().count("update peer") == before[n.name]  # type: ignore[union-attr]
        assert lab.once(n)["ops"] == 0


def test_removed_peer_disappears_everywhere(lab: NetnsLab) -> None:
    nodes = members(lab, 4)
    wait_full_mesh(lab, nodes)
    gone = nodes[3]
    lab.write_peers(nodes[:3])
    for n in nodes[:3]:
        wait_for(lambda: not any(str(gone.mesh_ip) in r for r in table_routes(n)), CONVERGE,
                 f"route removal on {n.name}")
        wait_for(lambda: gone.public_key not in wg_peers(n), CONVERGE, f"peer removal on {n.name}")
        assert len(table_routes(n)) == 2
    assert lab.reachable(nodes[0], nodes[1].mesh_ip)


def test_invalid_peer_is_skipped_and_the_mesh_keeps_working(lab: NetnsLab) -> None:
    nodes = members(lab, 3)
    wait_full_mesh(lab, nodes)
    import yaml

    doc = yaml.safe_load(lab.peers_file.read_text())
    doc["peers"].append({"metadata": {"name": "evil"}, "spec": {
        "publicKey": "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyYWE=",
        "allowedIPs": [f"{nodes[0].mesh_ip}/32"]}})
    doc["peers"].append({"metadata": {"name": "broken"}, "spec": {"publicKey": "short", "allowedIPs": []}})
    lab.peers_file.write_text(yaml.safe_dump(doc))
    try:
        result = lab.once(nodes[1])
        assert {s["peer"] for s in result["skipped"]} == {"evil"} and result["ops"] == 0
        wait_for(lambda: "peer evil skipped" in nodes[1].agent_log.read_text(), 10, "skip log line")  # type: ignore[union-attr]
        assert all("Zm9vYmFy" not in p for p in wg_peers(nodes[1]))
        wait_full_mesh(lab, nodes)
    finally:
        lab.write_peers(nodes)


def test_kill9_agent_loses_no_ping_and_restart_adopts_without_duplicates(lab: NetnsLab) -> None:
    nodes = members(lab, 3)
    wait_full_mesh(lab, nodes)
    victim = nodes[1]
    daemon = lab.daemon_pids(victim)
    pings = [Pinger(lab, nodes[0], nodes[2], seconds=5), Pinger(lab, nodes[0], victim, seconds=5),
             Pinger(lab, victim, nodes[2], seconds=5)]
    assert victim.agent is not None
    threading.Event().wait(1.0)  # let the pings run before the kill (measurement, not a wait-for)
    victim.agent.send_signal(signal.SIGKILL)
    victim.agent.wait(timeout=10)
    for p in pings:
        sent, received = p.result()
        assert sent == received and sent >= 50, f"lost {sent - received} of {sent} pings"
    assert lab.daemon_pids(victim) == daemon, "wireguard-go must survive its agent"
    lab.start_agent(victim)
    wait_for(lambda: "adopted running wireguard-go" in victim.agent_log.read_text(), 20, "adoption")  # type: ignore[union-attr]
    assert lab.once(victim)["ops"] == 0
    assert len(wirekube_rules(victim)) == 2 and len(table_routes(victim)) == 2
    assert lab.daemon_pids(victim) == daemon
    wait_full_mesh(lab, nodes)


def test_sigterm_leaves_the_dataplane_in_place(lab: NetnsLab) -> None:
    nodes = members(lab, 3)
    wait_full_mesh(lab, nodes)
    victim = nodes[2]
    assert victim.agent is not None
    victim.agent.send_signal(signal.SIGTERM)
    assert victim.agent.wait(timeout=15) == 0
    assert lab.ping(nodes[0], victim.mesh_ip, count=10, interval=0.1) == (10, 10)
    assert len(wirekube_rules(victim)) == 2
    lab.start_agent(victim)


def test_dead_wireguard_go_is_restarted_and_reconfigured(lab: NetnsLab) -> None:
    nodes = members(lab, 3)
    wait_full_mesh(lab, nodes)
    victim = nodes[2]
    (old,) = lab.daemon_pids(victim)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: lab.daemon_pids(victim) not in ([], [old]), 20, "a new wireguard-go")
    wait_full_mesh(lab, nodes)
    assert len(table_routes(victim)) == 2 and len(wirekube_rules(victim)) == 2


def test_cleanup_removes_only_what_wirekube_owns(lab: NetnsLab) -> None:
    node = lab.add_node(f"n{len(lab.nodes)}")
    lab.write_peers([*lab.nodes[:3], node])
    lab.start_agent(node)
    wait_for(lambda: len(table_routes(node)) == 3, CONVERGE, "routes on the cleanup node")
    wait_for(lambda: "table inet wirekube_mss" in node.run("nft", "list", "tables").stdout, CONVERGE,
             "the agent's TCP MSS clamp (spec.mtu auto)")
    assert node.agent is not None
    node.agent.send_signal(signal.SIGTERM)
    node.agent.wait(timeout=15)
    node.run("ip", "rule", "add", "priority", "150", "fwmark", "0x1", "lookup", "100")
    node.run("ip", "route", "add", "10.123.0.0/24", "dev", "eth0")
    node.run("nft", "add", "table", "inet", "wirekube")
    node.run("nft", "add", "table", "inet", "someone_else")
    argv = [sys.executable, "-m", "wirekube.cli.wirekubectl", "cleanup"]
    first = node.run(*argv)
    assert '"changed": true' in first.stdout
    assert node.run("ip", "link", "show", "wire_kube", check=False).returncode != 0
    assert wirekube_rules(node) == [] and table_routes(node) == []
    assert "150:\tfrom all fwmark 0x1 lookup 100" in node.run("ip", "rule").stdout
    assert "10.123.0.0/24" in node.run("ip", "route").stdout
    tables = node.run("nft", "list", "tables").stdout
    assert "someone_else" in tables and "table inet wirekube" not in tables and "wirekube_mss" not in tables
    assert lab.daemon_pids(node) == []
    assert '"changed": false' in node.run(*argv).stdout
    lab.write_peers(lab.nodes[:3])
