"""The default lab end to end: real API server, real NATs, real relay, real agents and wireguard-go.

One lab for the whole module (bringing it up is the expensive part): what `make lab` builds
(:func:`wirekube.lab.scenario.up` on the default topology: also the gateway controller, the VPC
WireKubeGateway, pods and stand-in kubelets). Covers the acceptance of the lab (every pair that
can work passes traffic; the four planes pass; down leaves nothing) and of NAT traversal
(the transport the matrix predicts, within 30 s of the agents starting; cutting UDP between two
direct peers moves them to the relay within 2 s and back to direct after the cut is lifted; a
relay restart is survived without restarting agents).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.root import require_root
from tests.fixtures.wait import wait_for
from wirekube import k8s, reports
from wirekube.lab import orchestrate, procs, scenario
from wirekube.lab.net import Lab
from wirekube.lab.topology import default_topology

pytestmark = [pytest.mark.netns, pytest.mark.apiserver]


def lab_namespaces(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"wkl-{name}.")]


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, k8s.Kube, str]]:
    require_root()
    name = f"e2e{uuid.uuid4().hex[:5]}"
    try:
        scenario.up(default_topology(), name, wait=90)
        lab_, kube, _ = orchestrate.attach(name)
        yield lab_, kube, name
        kube.close()
    finally:
        orchestrate.down(name)
        orchestrate.down(name)  # twice: must be harmless
    assert lab_namespaces(name) == [], "down left namespaces behind"
    assert not Path(f"/run/wirekube-lab/{name}/state.json").exists()


def pairs_by_key(lab_: Lab, kube: k8s.Kube) -> dict[tuple[str, str], dict[str, Any]]:
    return {(p["from"], p["to"]): p for p in orchestrate.collect(lab_, kube)["pairs"]}


def test_every_pair_converges_to_the_predicted_transport_within_30s(lab: Any) -> None:
    lab_, kube, name = lab
    st = orchestrate.state(name)
    assert st["converged"] is True
    assert st["convergence_seconds"] <= 30, st
    expected = orchestrate.expected_pairs(lab_)
    got = pairs_by_key(lab_, kube)
    wrong = {k: (got[k]["transport"], v) for k, v in expected.items() if got[k]["transport"] != v}
    assert not wrong, f"pairs off the matrix (got, expected): {wrong}"
    assert sum(v == "direct" for v in expected.values()) >= 30  # the matrix is not trivially "relay"
    relayed = [p for p in got.values() if p["transport"] == "relay"]
    assert all(p["reason"] for p in relayed), "every relayed pair says why"


def test_nat_types_are_detected(lab: Any) -> None:
    lab_, kube, _ = lab
    expected = {"none": "open", "full-cone": "cone", "port-restricted-cone": "port-restricted-cone",
                "symmetric": "symmetric", "udp-blocked": ""}
    nodes = orchestrate.collect_nodes(lab_, kube)
    assert {n["name"]: n["natType"] for n in nodes} == {n["name"]: expected[n["labNAT"]] for n in nodes}
    udp_blocked = kube.get(k8s.PEERS, "udpblock-1")["status"]
    assert udp_blocked["udpBlocked"] is True


PLANES = ["node -> node", "hybrid pod -> hybrid pod", "EC2 pod -> hybrid pod", "VPC host -> hybrid kubelet"]


def test_the_four_planes_all_pass(lab: Any) -> None:
    """What `make lab` ends with: node to node (every pair), hybrid pod to hybrid pod, EC2 pod to
    hybrid pod, and the VPC host to every hybrid node's kubelet port through the gateway."""
    lab_, kube, _ = lab
    planes = scenario.wait_planes(lab_, kube, 60)
    table = scenario.render_planes(planes)
    print("\n" + table)
    assert [p.name for p in planes] == PLANES
    assert all(p.ok for p in planes), table
    nodes, hybrid = len(lab_.nodes), scenario.hybrid_nodes(lab_)
    assert planes[0].total == nodes * (nodes - 1)
    assert planes[1].total == len(hybrid) * (len(hybrid) - 1)  # one pod per node in the default lab
    assert planes[2].total == len(scenario.ec2_nodes(lab_)) * len(hybrid)
    assert planes[3].total == len(hybrid) and planes[3].path == "TCP 10250 via gateway vpc"
    assert all(len(p.rtt_ms) == p.total for p in planes)
    # Hybrid pod to hybrid pod really is VXLAN (between InternalIPs, which WireGuard carries).
    assert planes[1].path == "VXLAN 8472 between InternalIPs, over WireGuard"
    other_pod = next(str(p.address) for p in lab_.pods.values() if p.node == hybrid[-1])
    route = lab_.exec(hybrid[0], ["ip", "route", "get", other_pod], check=True).stdout
    assert f"dev {scenario.OVERLAY_DEV} table {scenario.OVERLAY_TABLE}" in route, route
    vtep = lab_.exec(hybrid[0], ["ip", "route", "get", str(lab_.nodes[hybrid[-1]].lan_ip)], check=True).stdout
    assert "dev wire_kube" in vtep, vtep
    assert all(scenario.overlay_tx_packets(lab_, n) > 0 for n in hybrid)


def test_the_vpc_host_reaches_kubelets_through_the_active_gateway_only(lab: Any) -> None:
    """The kubelet plane really crosses the gateway: the VPC host routes hybrid LANs to the
    virtual IP, which only the active peer (ec2-a) holds."""
    lab_, kube, _ = lab
    st = scenario.gateway_status(kube, "vpc")
    assert st["activePeer"] == "ec2-a" and st["ready"] is True, st
    vip = "10.100.0.250"
    assert f"{vip}/" in lab_.exec("ec2-a", ["ip", "-4", "addr"], check=True).stdout
    assert f"{vip}/" not in lab_.exec("ec2-b", ["ip", "-4", "addr"], check=True).stdout
    route = lab_.exec("vpc-host", ["ip", "route", "get", str(lab_.nodes["sym1-1"].lan_ip)], check=True).stdout
    assert f"via {vip}" in route, route


def test_status_json_shape(lab: Any) -> None:
    _, _, name = lab
    out = subprocess.run([sys.executable, "-m", "wirekube.lab.cli", "status", "--json", "--name", name],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    data = json.loads(out)
    assert set(data) >= {"nodes", "pairs", "gateways", "planes"}
    assert set(data["nodes"][0]) == {"name", "site", "natType", "meshIP"}
    assert set(data["pairs"][0]) == {"from", "to", "transport", "rttMs"}
    assert len(data["pairs"]) == len(data["nodes"]) * (len(data["nodes"]) - 1)
    assert all(p["transport"] in ("direct", "relay", "none") for p in data["pairs"])
    [gw] = data["gateways"]
    assert (gw["name"], gw["activePeer"], gw["ready"], gw["peers"]) == ("vpc", "ec2-a", True, ["ec2-a", "ec2-b"])
    assert gw["peerHealth"] == {"ec2-a": "healthy", "ec2-b": "healthy"}, gw
    assert [p["name"] for p in data["planes"]] == PLANES
    assert all({"result", "passed", "total", "medianMs", "maxMs", "failures"} <= set(p) for p in data["planes"])


def test_status_text_shows_the_gateway_and_the_plane_table(lab: Any) -> None:
    _, _, name = lab
    out = subprocess.run([sys.executable, "-m", "wirekube.lab.cli", "status", "--name", name],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert re.search(r"^vpc\s+ec2-a\s+true\s+10\.100\.0\.250/24\s+ec2-a=healthy,ec2-b=healthy$", out, re.M), out
    table = out[out.index("PLANE "):]
    for plane in PLANES:
        assert re.search(rf"^{re.escape(plane)}\s+pass \d+/\d+\s+\d+\.\d+\s+\d+\.\d+  ", table, re.M), table


PINGER = textwrap.dedent("""
    import subprocess, sys
    # 10 pings a second with timestamps; the parent reads the gaps from the output.
    subprocess.run(["ping", "-D", "-n", "-i", "0.1", "-W", "1", "-w", sys.argv[2], sys.argv[1]])
""")


def _ping_around(lab_: Lab, src: str, dst_ip: str, seconds: int, action: Any, touched: str) -> str:
    """A 10/s ping from ``src`` for ``seconds``; ``action()`` runs once 10 replies are in; its output."""
    pinger = lab_.spawn(src, [sys.executable, "-c", PINGER, dst_ip, str(seconds)], pipe=True)
    try:
        assert pinger.stdout is not None
        head: list[str] = []
        deadline = time.monotonic() + 15
        while sum("bytes from" in ln for ln in head) < 10:
            assert time.monotonic() < deadline, f"no ping replies before {touched}"
            head.append(pinger.stdout.readline())
        action()
        rest, _ = pinger.communicate(timeout=seconds + 60)
    finally:
        if pinger.poll() is None:
            lab_.stop(pinger)
    return "".join(head) + rest


def longest_gap(output: str) -> float:
    stamps = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.M)]
    assert len(stamps) > 20, output[-500:]
    return max(b - a for a, b in itertools.pairwise(stamps))


def test_failover_on_udp_cut_and_recovery(lab: Any) -> None:
    """fullcone-1 <-> prc-1 is direct; cut UDP between their routers during a 10/s ping."""
    lab_, kube, _ = lab
    a, b = "fullcone-1", "prc-1"
    assert pairs_by_key(lab_, kube)[(a, b)]["transport"] == "direct"
    b_ip = next(n["meshIP"] for n in orchestrate.collect_nodes(lab_, kube) if n["name"] == b)
    prc_wan = str(lab_.routers["prc"].wan_ip)
    pinger = lab_.spawn(a, [sys.executable, "-c", PINGER, b_ip, "14"], pipe=True)
    try:
        assert pinger.stdout is not None
        head = []
        deadline = time.monotonic() + 15
        while sum("bytes from" in ln for ln in head) < 20:  # traffic flows over the direct path
            assert time.monotonic() < deadline, "no ping replies before the cut"
            head.append(pinger.stdout.readline())
        lab_.cut("fullcone", "udp", peer=prc_wan)
        rest, _ = pinger.communicate(timeout=30)
        out = "".join(head) + rest
    finally:
        if pinger.poll() is None:
            lab_.stop(pinger)
    gap = longest_gap(out)
    assert gap <= 2.0, f"longest ping gap {gap:.2f}s"
    status = reports.get_peer(kube, a)["status"]
    assert status["peerTransports"][b] == "relay"
    assert status["relayReasons"][b]
    events = [e for e in kube.list(k8s.EVENTS, "default")[0]
              if e["regarding"]["name"] == a and e["reason"] == "TransportChanged"]
    assert any(f"{a} -> {b}: direct -> relay" in e["note"] for e in events), [e["note"] for e in events]
    try:
        assert orchestrate.ping(lab_, a, b_ip) is not None  # traffic continues over the relay
    finally:
        lab_.restore("fullcone")
    # directRetryIntervalSeconds is 30 in the lab: probes beside the relay bring it back (a probe
    # lost on a loaded machine costs one more interval).
    wait_for(lambda: reports.get_peer(kube, a)["status"]["peerTransports"][b] == "direct", 150, "back to direct",
             interval=0.5)
    assert orchestrate.ping(lab_, a, b_ip) is not None


def _relay_pid(lab_: Lab, index: int) -> int:
    relay_ep = str(orchestrate.relay_endpoints(lab_)[index])
    pids = subprocess.run(["ip", "netns", "pids", lab_.netns("internet")], capture_output=True, text=True,
                          check=True).stdout.split()
    return next(int(p) for p in pids
                if f"--listen={relay_ep}" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode())


def _relay_metric(lab_: Lab, index: int, name: str, labels: str = "") -> float:
    ep = orchestrate.relay_endpoints(lab_)[index]
    text = lab_.exec("internet", ["curl", "-s", "-m", "5", f"http://{ep.host}:9478/metrics"], check=True).stdout
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _replica_of(lab_: Lab, node: str) -> int:
    """Which relay replica holds ``node``'s relay connection (the only node behind its router)."""
    wan = str(lab_.routers[lab_.nodes[node].site].wan_ip)
    out = lab_.exec("internet", ["ss", "-tnH", "state", "established"], check=True).stdout
    for line in out.splitlines():
        local, peer = line.split()[-2:]
        if peer.startswith(f"{wan}:"):
            for index in orchestrate.relay_replicas(lab_):
                if local == str(orchestrate.relay_endpoints(lab_)[index]):
                    return index
    raise AssertionError(f"no relay connection from {node} ({wan}) in:\n{out}")


def _wait_mesh(lab_: Lab) -> None:
    replicas = orchestrate.relay_replicas(lab_)
    wait_for(lambda: all(_relay_metric(lab_, i, "wirekube_relay_mesh_links") == len(replicas) - 1 for i in replicas),
             20, "every relay replica linked to the others", interval=0.3)


def test_every_relayed_pair_is_up_through_the_relay_load_balancer(lab: Any) -> None:
    """The default lab runs 2 relay replicas behind one "NLB" address: every pair the matrix
    relays passes traffic whichever replica each end landed on."""
    lab_, kube, _ = lab
    replicas = orchestrate.relay_replicas(lab_)
    assert len(replicas) == 2
    _wait_mesh(lab_)
    expected = orchestrate.expected_pairs(lab_)
    got = pairs_by_key(lab_, kube)
    relayed = [k for k, v in expected.items() if v == "relay"]
    down = [k for k in relayed if got[k]["transport"] != "relay" or got[k]["rttMs"] is None]
    assert len(relayed) >= 20 and not down, f"relayed pairs down: {down}"
    held = [_relay_metric(lab_, i, "wirekube_relay_connections", '{state="registered"}') for i in replicas]
    assert sum(held) == len(lab_.nodes), held  # one relay connection per node, each on one replica
    print(f"relay clients per replica: {held}")
    if all(held):
        mesh_in = [re.findall(r'mesh_frames_total\{direction="in".*\} (\S+)', lab_.exec(
            "internet", ["curl", "-s", f"http://{orchestrate.relay_endpoints(lab_)[i].host}:9478/metrics"],
            check=True).stdout) for i in replicas]
        assert all(v and float(v[0]) > 0 for v in mesh_in), mesh_in  # pairs spanning both replicas carried traffic
    else:
        print("every node landed on one replica this time (p = 1/128): cross-replica traffic is covered by "
              "tests/integration/test_relay_mesh.py, which forces it")


def test_relay_replica_kill_9_and_a_rolling_restart_keep_a_relayed_pair_flowing(lab: Any) -> None:
    """kill -9 of the replica carrying a relayed pair: its nodes reconnect through the load
    balancer, longest 10/s ping gap <= 3 s; then every replica restarted in turn (SIGTERM: GoAway,
    clients move first): longest gap <= 1 s."""
    lab_, kube, _ = lab
    a, b = "sym1-1", "sym2-1"  # symmetric<->symmetric: relay only
    assert pairs_by_key(lab_, kube)[(a, b)]["transport"] == "relay"
    b_ip = next(n["meshIP"] for n in orchestrate.collect_nodes(lab_, kube) if n["name"] == b)
    _wait_mesh(lab_)
    victim = _replica_of(lab_, a)

    def ping_during(seconds: int, action: Any) -> float:
        return longest_gap(_ping_around(lab_, a, b_ip, seconds, action, "the relay was touched"))

    def kill_9() -> None:
        pid = _relay_pid(lab_, victim)
        os.kill(pid, signal.SIGKILL)
        lab_.stop(pid, grace=0.5)  # reaps it and drops it from the lab's records

    kill_gap = ping_during(8, kill_9)
    orchestrate.start_relay(lab_, victim)
    _wait_mesh(lab_)

    def rolling_restart() -> None:
        for index in orchestrate.relay_replicas(lab_):
            lab_.stop(_relay_pid(lab_, index), grace=10)  # SIGTERM: drain, then exit
            orchestrate.start_relay(lab_, index)
            _wait_mesh(lab_)

    roll_gap = ping_during(25, rolling_restart)
    print(f"relayed pair {a} -> {b}: kill -9 of its replica: longest gap {kill_gap:.2f}s; "
          f"rolling restart of {len(orchestrate.relay_replicas(lab_))} replicas: longest gap {roll_gap:.2f}s")
    assert kill_gap <= 3.0, f"kill -9: longest ping gap {kill_gap:.2f}s"
    assert roll_gap <= 1.0, f"rolling restart: longest ping gap {roll_gap:.2f}s"


def test_relay_restart_is_survived_without_agent_restarts(lab: Any) -> None:
    """Every relay replica down: the relayed pair is down; the replicas back: it comes back."""
    lab_, kube, _ = lab
    pair = ("sym1-1", "sym2-1")  # symmetric<->symmetric: relay only
    assert pairs_by_key(lab_, kube)[pair]["transport"] == "relay"
    agents_before = {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in kube.list(k8s.PEERS)[0]}
    replicas = orchestrate.relay_replicas(lab_) or [0]
    for index in replicas:
        lab_.stop(_relay_pid(lab_, index))
    dst_ip = next(n["meshIP"] for n in orchestrate.collect_nodes(lab_, kube) if n["name"] == pair[1])
    assert orchestrate.ping(lab_, pair[0], dst_ip, count=2) is None  # relayed pair is down without the relay
    for index in replicas:
        orchestrate.start_relay(lab_, index)
    wait_for(lambda: orchestrate.ping(lab_, pair[0], dst_ip) is not None, 60, "relayed pair back after restart",
             interval=0.5)
    assert set(agents_before) <= {p["metadata"]["name"] for p in kube.list(k8s.PEERS)[0]}
    # Every node back on a replica (their reconnect backoff grew while no relay was up), so the
    # tests after this one see every relayed pair, not just this one.
    wait_for(lambda: sum(_relay_metric(lab_, i, "wirekube_relay_connections", '{state="registered"}')
                         for i in replicas) == len(lab_.nodes), 60, "every node reconnected to the relay",
             interval=0.5)


def test_wirekubectl_status_matches_the_lab(lab: Any) -> None:
    lab_, kube, name = lab
    kubeconfig = f"/run/wirekube-lab/{name}/cluster/kubeconfig"
    out = subprocess.run([sys.executable, "-m", "wirekube.cli.wirekubectl", "--kubeconfig", kubeconfig, "status",
                          "-o", "json"], capture_output=True, text=True, check=True, timeout=60).stdout
    report = {(p["from"], p["to"]): p["transport"] for p in json.loads(out)["pairs"]}
    measured = pairs_by_key(lab_, kube)
    assert {k: v["transport"] for k, v in measured.items()} == report


def test_doctor_is_clean_then_flags_an_injected_overlap(lab: Any) -> None:
    lab_, kube, name = lab
    node_kubeconfig = f"/run/wirekube-lab/{name}/node.kubeconfig"
    doctor = [sys.executable, "-m", "wirekube.cli.wirekubectl", "--kubeconfig", node_kubeconfig, "doctor"]
    healthy = lab_.exec("ec2-a", doctor, timeout=120)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "[OK] relay-reachable" in healthy.stdout and "[OK] stun-reachable" in healthy.stdout
    assert "[OK] route-claims" in healthy.stdout, healthy.stdout  # the controller's grants cover every entry
    kube.patch_merge(k8s.MESHES, "default", {"spec": {"serviceCIDRs": ["10.255.0.0/24"]}})
    try:
        faulty = lab_.exec("ec2-a", doctor, timeout=120)
        assert faulty.returncode == 1
        assert "[FAIL] cidr-overlap" in faulty.stdout
        assert "fix: choose a meshCIDR outside the Service CIDR" in faulty.stdout
    finally:
        kube.patch_merge(k8s.MESHES, "default", {"spec": {"serviceCIDRs": None}})


def test_agent_metrics_show_per_peer_transport_and_handshakes(lab: Any) -> None:
    lab_, _, _ = lab
    fetch = ("import urllib.request; "
             "print(urllib.request.urlopen('http://127.0.0.1:9090/metrics', timeout=5).read().decode())")
    text = lab_.exec("prc-1", [sys.executable, "-c", fetch], timeout=30, check=True).stdout
    assert re.search(r'wirekube_peer_transport_mode\{mode="relay",node="prc-1",peer="sym1-1"\} 1\.0', text), text[:2000]
    assert re.search(r'wirekube_peer_transport_mode\{mode="direct",node="prc-1",peer="ec2-a"\} 1\.0', text)
    assert re.search(r'wirekube_peer_last_handshake_seconds\{node="prc-1",peer="ec2-a"\} [1-9]', text)
    nat_lines = [ln for ln in text.splitlines() if ln.startswith("wirekube_node_nat_type")]
    assert 'wirekube_node_nat_type{node="prc-1",type="port-restricted-cone"} 1.0' in nat_lines, nat_lines


def test_agents_publish_their_engine_and_why(lab: Any) -> None:
    lab_, kube, _ = lab
    engines = {p["metadata"]["name"]: (p.get("status") or {}).get("engine") for p in kube.list(k8s.PEERS)[0]}
    # The lab's WireKubeMesh asks for wireguard-go (spec.engine userspace): every agent says so.
    assert engines == {n: "userspace (spec.engine=userspace)" for n in lab_.nodes}, engines


def test_once_dry_run_on_a_converged_node_changes_nothing(lab: Any) -> None:
    """--once runs no traversal, but plans what the running loop keeps (1 s keepalives, relayed
    peers on their proxies, LAN endpoints): against prc-1 (direct, relayed and LAN peers) that is
    no operation at all."""
    lab_, kube, name = lab
    node = "prc-1"
    transports = set(reports.get_peer(kube, node)["status"]["peerTransports"].values())
    assert transports == {"direct", "relay"}, transports
    # The node's own agent command line, minus its metrics port (the running agent holds it).
    argv = [a for a in orchestrate.agent_argv(lab_handle(name), node) if not a.startswith("--metrics-listen")]
    argv += ["--once", "--dry-run", "--log-level=WARNING"]
    done = lab_.exec(node, argv, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["synced"] is True and result["ops"] == 0, result


def lab_handle(name: str) -> orchestrate.LabHandle:
    _, kube, h = orchestrate.attach(name)
    kube.close()
    return h


def _doctor_local(lab_: Lab, node: str) -> tuple[int, list[dict[str, Any]]]:
    done = lab_.exec(node, [sys.executable, "-m", "wirekube.cli.wirekubectl", "doctor", "--local", "-o", "json"],
                     timeout=60)
    assert done.stdout, done.stderr[-2000:]
    return done.returncode, json.loads(done.stdout)


def test_doctor_local_flags_a_killed_agents_state_until_it_is_back(lab: Any) -> None:
    lab_, kube, name = lab
    node = "ec2-b"
    code, findings = _doctor_local(lab_, node)
    assert code == 0 and {f["verdict"] for f in findings} == {"ok"}, findings
    running = orchestrate.running_agents(lab_, node)
    assert len(running) == 1, running
    record = running[0]
    cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    assert f"--node-name={node}".encode() in cmdline, cmdline  # the recorded PID is that node's agent

    os.kill(record.pid, signal.SIGKILL)  # by the PID the lab recorded, nothing else
    wait_for(lambda: not procs.is_alive(record), 10, f"{node}'s agent to die")
    lab_.stop(record.pid)  # already dead: only drops the record from the lab's state
    try:
        code, findings = _doctor_local(lab_, node)
        assert code == 1, findings
        stale = {f["subject"]: f for f in findings if f["check"] == "stale-state"}
        # no gateway: no table inet wirekube; spec.mtu auto: the MSS clamp's table is left too
        assert set(stale) == {"link wire_kube", "ip rules", "table 22347", "nft inet wirekube_mss"}, findings
        assert all(f["verdict"] == "fail" and "wirekubectl cleanup" in f["fix"] for f in stale.values())
        assert "wireguard-go link wire_kube" in stale["link wire_kube"]["detail"]
        assert "daemon pid" in stale["link wire_kube"]["detail"]  # wireguard-go outlives the agent
        assert [f["verdict"] for f in findings if f["check"] == "agent-running"] == ["fail"]
    finally:
        orchestrate.start_agent(lab_, lab_handle(name), node)

    def clean() -> bool:
        code, findings = _doctor_local(lab_, node)
        return code == 0 and {f["verdict"] for f in findings} == {"ok"}

    wait_for(clean, 60, f"doctor --local clean on {node} after the agent restarted", interval=0.5)
    # Back in the mesh: every pair that can work passes traffic over the predicted transport again.
    assert orchestrate.wait_converged(lab_, kube, timeout=120), "the mesh did not re-converge"


def test_a_relayed_pair_keeps_flowing_through_agent_restarts(lab: Any) -> None:
    """Issue 16: both agents of a relayed pair killed (-9) and restarted 3 s later: longest gap of
    a 10/s ping <= 1 s; both stopped gracefully (SIGTERM) and started: no ping lost.  The relay
    path (loopback proxies + relay connection) lives in its own process, which outlives them."""
    lab_, kube, name = lab
    a, b = "sym1-1", "sym2-1"  # symmetric<->symmetric: relay only
    assert pairs_by_key(lab_, kube)[(a, b)]["transport"] == "relay"
    b_ip = next(n["meshIP"] for n in orchestrate.collect_nodes(lab_, kube) if n["name"] == b)
    h = lab_handle(name)

    def ping_during(seconds: int, action: Any) -> str:
        return _ping_around(lab_, a, b_ip, seconds, action, "the agents were touched")

    killed = ping_during(10, lambda: orchestrate.restart_agents(lab_, h, (a, b), kill=True, down_for=3.0))
    wait_for(lambda: all(orchestrate.running_agents(lab_, n) for n in (a, b)), 30, "agents back")
    assert orchestrate.wait_converged(lab_, kube, timeout=120), "the mesh did not re-converge after kill -9"
    graceful = ping_during(10, lambda: orchestrate.restart_agents(lab_, h, (a, b), kill=False))
    kill_gap, lost = longest_gap(killed), _missing_seqs(graceful)
    print(f"relayed pair {a} -> {b}: both agents kill -9, back 3 s later: longest gap {kill_gap:.2f}s; "
          f"both restarted gracefully: {len(lost)} pings lost (longest gap {longest_gap(graceful):.2f}s)")
    assert kill_gap <= 1.0, f"kill -9 of both agents: longest ping gap {kill_gap:.2f}s"
    assert lost == [], f"graceful restart lost pings {lost}"
    assert orchestrate.wait_converged(lab_, kube, timeout=120), "the mesh did not re-converge"


# ---- who may route what (wirekube.authority) ----------------------------------------------------

ROUTE_PINGER = textwrap.dedent("""
    import subprocess, sys
    subprocess.run(["ping", "-n", "-i", "0.1", "-W", "1", "-w", sys.argv[2], sys.argv[1]])
""")


def _missing_seqs(output: str) -> list[int]:
    seqs = sorted({int(m) for m in re.findall(r"icmp_seq=(\d+)", output)})
    assert len(seqs) > 20, output[-500:]
    return sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))


def _table(lab_: Lab, node: str) -> str:
    return lab_.exec(node, ["ip", "-4", "route", "show", "table", "22347"], check=True).stdout


def _allowed(lab_: Lab, node: str) -> str:
    return lab_.exec(node, ["wg", "show", "wire_kube", "allowed-ips"], check=True).stdout


def _grant(name: str, nodes: list[str], cidrs: list[str]) -> dict[str, Any]:
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeRouteGrant", "metadata": {"name": name},
            "spec": {"nodes": nodes, "cidrs": cidrs}}


def _refusal_notes(kube: k8s.Kube, peer: str) -> list[str]:
    return [e["note"] for e in kube.list(k8s.EVENTS, "default")[0]
            if e["regarding"]["name"] == peer and e["reason"] == "RouteNotGranted"]


def test_route_claims_without_authority_capture_nothing(lab: Any) -> None:
    """Hostile peers claim the relay, a STUN server, the management network, another node's
    endpoint, another peer's mesh IP, the mesh CIDR, 0/1 + 128/1 and two halves of a gateway
    route: no node routes any of it, each claim gets an Event, and a relayed and a direct pair
    lose no ping meanwhile.  Granting the guarded ones changes nothing; an administrator's grant
    of an ordinary network does get routed, until it is withdrawn."""
    from tests.fixtures.keys import public_key
    from wirekube import ipam

    lab_, kube, lab_name = lab
    expected = orchestrate.expected_pairs(lab_)
    relayed, direct = ("udpblock-1", "ec2-a"), ("fullcone-1", "prc-1")
    assert expected[relayed] == "relay" and expected[direct] == "direct"
    peers = {p["metadata"]["name"]: p for p in reports.list_peers(kube)}
    mesh = kube.get(k8s.MESHES, "default")
    mesh_cidr = mesh["spec"]["meshCIDR"]
    def transports(peers: dict[str, Any]) -> dict[str, dict[str, str]]:
        return {n: {k: v for k, v in ((peers[n].get("status") or {}).get("peerTransports") or {}).items()
                    if k in lab_.nodes} for n in lab_.nodes}

    transports_before = transports(peers)
    relay_ip, stun2_ip = str(lab_.relay.host), str(lab_.stun[-1].host)
    prc_endpoint = peers["prc-1"]["spec"]["endpoint"].rsplit(":", 1)[0]
    claims = {
        "hostile-relay": [f"{relay_ip}/32"],
        "hostile-stun": [f"{stun2_ip}/32"],
        "hostile-mgmt": [str(lab_.topology.management.cidr)],
        "hostile-endpoint": [f"{prc_endpoint}/32"],
        "hostile-meship": [peers["ec2-b"]["spec"]["allowedIPs"][0]],
        "hostile-meshcidr": [mesh_cidr],
        "hostile-halves": ["0.0.0.0/1", "128.0.0.0/1"],
        "hostile-gwsplit": ["10.100.0.0/25", "10.100.0.128/25"],
    }
    guarded = {"hostile-relay", "hostile-stun", "hostile-mgmt", "hostile-endpoint"}
    ip_of = {n: next(x["meshIP"] for x in orchestrate.collect_nodes(lab_, kube) if x["name"] == n)
             for n in (relayed[1], direct[1])}
    pingers = {pair: lab_.spawn(pair[0], [sys.executable, "-c", ROUTE_PINGER, ip_of[pair[1]], "45"], pipe=True)
               for pair in (relayed, direct)}
    made: list[tuple[k8s.Resource, str]] = []
    try:
        for name, entries in claims.items():
            mesh_ip = f"{ipam.mesh_ip(name, ipaddress.ip_network(mesh_cidr))}/32"
            kube.create(k8s.PEERS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer",
                                    "metadata": {"name": name, "labels": {"wirekube.io/node": name}},
                                    "spec": {"publicKey": public_key(), "allowedIPs": [mesh_ip, *entries]}})
            made.append((k8s.PEERS, name))
        # Every claim is refused, with an Event naming the entry and why.
        for name, entries in claims.items():
            for entry in entries:
                wait_for(lambda: any(entry in n and "not granted" in n for n in _refusal_notes(kube, name)),
                         60, f"RouteNotGranted event for {entry} of {name}")
        # Granting the guarded ones does not make them routable: the control path is never captured.
        kube.create(k8s.ROUTE_GRANTS, _grant("hostile-guarded", sorted(guarded),
                                             sorted({e for n in guarded for e in claims[n]})))
        made.append((k8s.ROUTE_GRANTS, "hostile-guarded"))
        for name in guarded:
            wait_for(lambda: any("never routed into the mesh" in n for n in _refusal_notes(kube, name)),
                     60, f"guarded refusal for {name}")
        notes = {n: _refusal_notes(kube, n) for n in guarded}
        assert any("the relay" in n for n in notes["hostile-relay"]), notes
        assert any("the STUN server" in n for n in notes["hostile-stun"]), notes
        assert any("the endpoint of peer prc-" in n for n in notes["hostile-endpoint"]), notes
        assert any("the API server" in n or "own address" in n for n in notes["hostile-mgmt"]), notes
        # No node routes any claimed entry, in table 22347 or in WireGuard.
        claimed = {e for entries in claims.values() for e in entries if e != claims["hostile-meship"][0]}
        for node in lab_.nodes:
            table, allowed = _table(lab_, node), _allowed(lab_, node)
            leaked = {e for e in claimed
                      if re.search(rf"(^|\s){re.escape(e.removesuffix('/32'))}(/\d+)?\s", table + " ")
                      or e in allowed}
            assert not leaked, f"{node} routes {leaked}:\n{table}"
            assert allowed.count(claims["hostile-meship"][0]) == (0 if node == "ec2-b" else 1)
        # doctor lists every claim no agent routes, each with its fix.
        doctor = lab_.exec("ec2-a", [sys.executable, "-m", "wirekube.cli.wirekubectl", "--kubeconfig",
                                     f"/run/wirekube-lab/{lab_name}/node.kubeconfig", "doctor", "-o", "json"],
                           timeout=120)
        assert doctor.stdout, doctor.stderr[-3000:]
        listed = {f["subject"]: f for f in json.loads(doctor.stdout) if f["check"] == "route-claims"}
        for peer_name, entries in claims.items():
            if peer_name == "hostile-mgmt":  # guarded as each node's own link: not in the cluster's objects
                continue
            for entry in entries:
                assert listed[f"{peer_name} {entry}"]["fix"], listed
    finally:
        for res, name in reversed(made):
            kube.delete(res, name)
        outputs = {pair: p.communicate(timeout=60)[0] for pair, p in pingers.items()}
    for pair, out in outputs.items():
        assert _missing_seqs(out) == [], f"{pair} lost pings while hostile claims existed"
    peers = {p["metadata"]["name"]: p for p in reports.list_peers(kube)}
    assert transports(peers) == transports_before  # no lab pair changed transport

    # An administrator's grant is routed (on top of the gateway's route), and withdrawn again.
    assert "10.100.0.0/24 dev wire_kube" in _table(lab_, "prc-1")  # the VPC gateway's route
    extra = "10.77.0.0/24"
    kube.patch_merge(k8s.PEERS, "ec2-b", {"spec": {"allowedIPs": [*peers["ec2-b"]["spec"]["allowedIPs"], extra]}})
    try:
        wait_for(lambda: any(extra in n for n in _refusal_notes(kube, "ec2-b")), 60, "ungranted entry refused")
        assert extra not in _table(lab_, "prc-1")
        kube.create(k8s.ROUTE_GRANTS, _grant("lab-extra", ["ec2-b"], [extra]))
        try:
            wait_for(lambda: f"{extra} dev wire_kube" in _table(lab_, "prc-1"), 60, "granted route installed")
            assert extra in _allowed(lab_, "prc-1")
        finally:
            kube.delete(k8s.ROUTE_GRANTS, "lab-extra")
        wait_for(lambda: extra not in _table(lab_, "prc-1"), 60, "route withdrawn with the grant")
    finally:
        current = kube.get(k8s.PEERS, "ec2-b")["spec"]["allowedIPs"]
        kube.patch_merge(k8s.PEERS, "ec2-b", {"spec": {"allowedIPs": [e for e in current if e != extra]}})


def test_no_private_key_appears_in_any_log(lab: Any) -> None:
    """Every log line the lab wrote, in any form a key can take (base64, hex)."""
    import base64

    lab_, _, _ = lab
    keys = [p.read_text().strip() for p in Path(lab_.workdir).glob("nodes/*/private.key")]
    assert len(keys) == len(lab_.nodes), "every node's key file was found"
    forms = [f for k in keys for f in (k, base64.b64decode(k).hex(), k.rstrip("="))]
    logs = [p for p in lab_.log_dir.rglob("*") if p.is_file()]
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        leaked = [f[:6] + "..." for f in forms if f in text]
        assert not leaked, f"{path} contains private key material ({leaked})"
