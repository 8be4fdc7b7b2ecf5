"""Kernel WireGuard on a real kernel: lab nodes that boot as qemu guests (``engine: kernel``).

One lab for the module (unique name ``kn<hex>``; torn down afterwards, and nothing may be left):
three kernel nodes, behind no NAT, a port-restricted cone and a symmetric NAT, and two userspace
(wireguard-go) nodes, one open and one behind the same port-restricted cone.  The guests are
TCG-emulated (no usable KVM on the build machines), so every deadline below comes from
measurement on a loaded 2-core machine, with room; the measured figures go to
bench/results/kernel.json, marked as TCG timing.

1. every ordered pair reaches the transport the NAT matrix predicts (direct, or relayed through
   the loopback proxy into kernel WireGuard), and status says engine kernel for the VM nodes;
2. kill -9 of a kernel node's agent loses no ping on its direct pairs (the kernel device outlives
   the agent) and the restarted agent adopts the device without rewriting it;
3. a UDP cut between a kernel node and a userspace node fails over to the relay and back;
4. ``wirekubectl doctor --local`` and ``wirekubectl cleanup`` inside a guest.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
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
from wirekube.lab import orchestrate, vm
from wirekube.lab.net import Lab, LabError
from wirekube.lab.topology import parse_topology_yaml
from wirekube.models import key_fingerprint

pytestmark = [pytest.mark.netns, pytest.mark.apiserver, pytest.mark.timeout(1500)]  # the first test brings the lab up

TOPOLOGY = """
internet:
  relay: 198.18.0.2:3478
  stun: [198.18.0.2:3478, 198.18.0.3:3478]
sites:
  - name: kcloud
    nat: none
    nodes: [{name: k-open, engine: kernel}, {name: u-open}]
  - name: kprc
    nat: port-restricted-cone
    nodes: [{name: k-prc, engine: kernel}, {name: u-prc}]
  - name: ksym
    nat: symmetric
    nodes: [{name: k-sym, engine: kernel}]
"""
KERNEL = ("k-open", "k-prc", "k-sym")
RETRY = 20  # directRetryIntervalSeconds (and handshakeTimeoutSeconds, which may not exceed it)
CONVERGE_S = 600.0
"""Measured (TCG, 2 shared cores): boot of three guests ~60 s, agents' start inside them ~70 s,
every pair on its predicted transport 2-8 min after that depending on the machine's load."""
MAX_LOAD_PER_CORE = 6.0
"""Measured: at a host load average of 20-40 on 2 cores (other labs running), a guest took 3-6
minutes from boot to a running agent, STUN and direct probes from the guests timed out and no
run converged in 15 minutes.  The threshold is meant to sit above what `make test` alone puts on
the machine (not yet measured on a quiet one) and below those runs: a judgement, not a measured
edge."""
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "kernel.json"
WIREKUBECTL = str(Path(sys.executable).parent / "wirekubectl")
MEASURED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, k8s.Kube, orchestrate.LabHandle]]:
    require_root("network namespaces and qemu's taps")
    if os.environ.get("WIREKUBE_KERNEL_LAB") == "0":
        pytest.skip("the kernel-node lab (qemu TCG guests, ~20 min) was turned off with WIREKUBE_KERNEL_LAB=0")
    try:
        vm.guest_pieces()
    except vm.VMError as e:
        pytest.skip(f"this machine cannot run kernel nodes: {e}")
    cores = os.cpu_count() or 1
    try:  # the 1-minute average still carries the previous module's lab for a minute or two
        wait_for(lambda: os.getloadavg()[0] <= MAX_LOAD_PER_CORE * cores, 120, "the host's load to settle", interval=5)
    except TimeoutError:
        pytest.skip(f"host load average {os.getloadavg()[0]:.1f} on {cores} cores (over {MAX_LOAD_PER_CORE} per core "
                    "for 2 minutes): TCG guests cannot keep the mesh's timing on a machine this busy")
    name = f"kn{uuid.uuid4().hex[:5]}"
    lab_ = None
    started = time.monotonic()
    try:
        orchestrate.up(parse_topology_yaml(TOPOLOGY), name, wait=CONVERGE_S,
                       mesh_overrides={"relay": {"directRetryIntervalSeconds": RETRY,
                                                 "handshakeTimeoutSeconds": RETRY}})
        MEASURED["upSeconds"] = round(time.monotonic() - started, 1)
        lab_, kube, handle = orchestrate.attach(name)
        state = json.loads((lab_.workdir / "state.json").read_text())
        MEASURED["vmBootSeconds"] = state.get("vmBootSeconds")
        MEASURED["qemuRssMiB"] = _qemu_rss_mib(lab_)
        yield lab_, kube, handle
        kube.close()
    finally:
        if lab_ is not None:  # keep the logs for a post-mortem (down removes them)
            keep = tmp_path_factory.mktemp("kernel-lab-logs")
            for log in [*lab_.log_dir.glob("agent-*.log"), *lab_.log_dir.glob("console-*.log")]:
                shutil.copy(log, keep / log.name)
            print(f"agent and console logs kept in {keep}")
        orchestrate.down(name)
        _record()
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"wkl-{name}." not in out, "down left namespaces behind"
    leftover = [p for p in Path("/proc").iterdir()
                if p.name.isdigit() and _cmdline(p).count(f"/run/wirekube-lab/{name}/")]
    assert not leftover, f"down left processes behind: {[_cmdline(p)[:120] for p in leftover]}"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _qemu_rss_mib(lab_: Lab) -> dict[str, int]:
    out = {}
    for node in KERNEL:
        pid = lab_.holder_pid(node)
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
        out[node] = rss_kib // 1024
    return out


def _record() -> None:
    if "udpCutLongestPingGapSeconds" not in MEASURED:  # a partial run keeps the last complete record
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = {"timing": "TCG (qemu software emulation, no KVM), 1 vCPU and 512 MiB per guest, 2 shared host cores",
            "topology": "3 kernel nodes (no NAT, port-restricted cone, symmetric) + 2 wireguard-go nodes",
            **MEASURED}
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _peers(kube: k8s.Kube) -> dict[str, Any]:
    return {p["metadata"]["name"]: p for p in reports.list_peers(kube)}


def _mesh_ip(kube: k8s.Kube, node: str) -> str:
    return str(_peers(kube)[node]["spec"]["allowedIPs"][0].split("/")[0])


def _transport(kube: k8s.Kube, a: str, b: str) -> str | None:
    status = reports.get_peer(kube, a).get("status") or {}
    return (status.get("peerTransports") or {}).get(b)


# ---- 1. every pair, and the engine ------------------------------------------------------------------


def test_every_pair_reaches_its_predicted_transport_and_kernel_nodes_say_kernel(lab: Any) -> None:
    lab_, kube, _ = lab
    expected = orchestrate.expected_pairs(lab_)
    assert expected[("k-open", "u-open")] == "direct" and expected[("k-sym", "k-prc")] == "relay"
    last: dict[str, Any] = {}

    def converged() -> bool:
        peers = _peers(kube)
        if not all(((peers.get(a, {}).get("status") or {}).get("peerTransports") or {}).get(b) == t
                   for (a, b), t in expected.items()):
            return False  # ping (a process per pair) only once every agent reports the prediction
        last.update(orchestrate.collect(lab_, kube))
        return all(p["transport"] == expected[(p["from"], p["to"])] for p in last["pairs"])

    started = time.monotonic()
    wait_for(converged, CONVERGE_S / 2, "every pair on its predicted transport", interval=2)  # up() waited already
    MEASURED.setdefault("extraConvergeSeconds", round(time.monotonic() - started, 1))
    MEASURED["rttMs"] = {f"{p['from']}->{p['to']}": p["rttMs"] for p in last["pairs"]}
    engines = {n["name"]: n["engine"] for n in last["nodes"]}
    for node in KERNEL:
        assert engines[node] == "kernel", engines  # auto picked kernel, with nothing to explain
    assert engines["u-open"] == "userspace (--engine=userspace)", engines
    table = orchestrate.render_status(last, lab_.log_dir)
    assert re.search(r"^k-sym\s+ksym\s+symmetric\s+symmetric\s+10\.255\.\S+\s+kernel$", table, re.M), table
    # The guest really runs the kernel's WireGuard: the module and a wireguard link with peers.
    link = lab_.exec("k-open", ["ip", "-d", "link", "show", "wire_kube"], check=True).stdout
    assert "wireguard" in link, link
    dump = lab_.exec("k-open", ["wg", "show", "wire_kube", "dump"], check=True).stdout.splitlines()
    assert len(dump) == 1 + 4, dump  # the device line and one line per peer
    assert lab_.exec("k-open", ["test", "-d", "/sys/module/wireguard"]).returncode == 0


def test_kernel_engine_round_trip_on_the_real_module(lab: Any) -> None:
    """The engine's netlink attributes against the real module (a scratch link, not wire_kube):
    device values, peer creation, AllowedIPs replaced (not added to), endpoint-only updates,
    removal, update-only never creating, and a 300-peer pass spread over several messages."""
    lab_, _, _ = lab
    script = str(Path(__file__).with_name("kernel_engine_check.py"))
    # 300 s was not enough once (load ~5, three TCG guests); the check prints its progress to stderr.
    done = lab_.exec("k-prc", [sys.executable, script, "wkcheck0"], timeout=600)
    print(done.stderr[-2000:])
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert (r["created"], r["created_again"], r["deleted"]) == (True, False, True)
    assert r["fresh"] == {"public_key": None, "listen_port": 0, "fwmark": 0, "peers": {}}
    conf = r["configured"]
    assert (conf["public_key"], conf["listen_port"], conf["fwmark"]) == (r["expected_public_key"], 51999, 0x574B)
    a, b = sorted(conf["peers"])
    assert conf["peers"][a] == {"endpoint": "198.19.1.77:51820", "allowed_ips": ["10.100.9.0/24", "10.255.1.1/32"],
                                "keepalive": 1}
    assert r["replaced"]["peers"][a] == {"endpoint": "198.18.3.2:40000", "allowed_ips": ["10.255.1.1/32"],
                                         "keepalive": 0}
    assert r["endpoint_only"]["peers"][b] == {"endpoint": "198.19.1.88:51820", "allowed_ips": ["10.255.1.2/32"],
                                              "keepalive": 25}
    assert list(r["removed"]["peers"]) == [b] and list(r["update_only_absent"]["peers"]) == [b]
    assert r["many"] == {"peers": 301, "all_allowed_ips": True} and r["many_removed"] == 1
    assert r["device_again"] == r["update_only_absent"]


# ---- 2. kill -9 of a kernel node's agent ------------------------------------------------------------

PINGER = textwrap.dedent("""
    import subprocess, sys
    # -c, not -w: a deadline ends ping with its last echo still in flight (a TCG guest answers in
    # 100s of ms), which counted as lost (492/493 once); with a count, ping waits for that answer.
    count = str(int(float(sys.argv[2]) / 0.2))
    subprocess.run(["ping", "-D", "-n", "-i", "0.2", "-W", "2", "-c", count, sys.argv[1]])
""")


def _ping_stats(output: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert m, output[-500:]
    return int(m.group(1)), int(m.group(2))


def _wg_config(lab_: Lab, node: str) -> dict[str, tuple[str, ...]]:
    """Per peer public key: endpoint, allowed ips, keepalive (what a rewrite would change)."""
    lines = lab_.exec(node, ["wg", "show", "wire_kube", "dump"], check=True).stdout.splitlines()
    out = {"device": tuple(lines[0].split("\t")[1:])}  # public key, listen port, fwmark
    for line in lines[1:]:
        f = line.split("\t")
        out[f[0]] = (f[2], f[3], f[7])
    return out


def test_kill9_of_a_kernel_agent_loses_no_ping_and_the_restart_adopts_the_device(lab: Any) -> None:
    lab_, kube, handle = lab
    node = "k-open"
    direct = [b for b in ("u-open", "u-prc", "k-prc") if _transport(kube, node, b) == "direct"]
    assert "u-open" in direct, direct
    before = _wg_config(lab_, node)
    agents = orchestrate.running_agents(lab_, node)
    assert len(agents) == 1
    log = lab_.log_dir / f"agent-{node}.log"
    pingers = {b: lab_.spawn(b, [sys.executable, "-c", PINGER, _mesh_ip(kube, node), "100"], pipe=True)
               for b in direct if b not in KERNEL}
    try:
        time.sleep(2)  # a few echoes before the kill (the pingers' own start), then kill -9
        os.kill(agents[0].pid, signal.SIGKILL)
        wait_for(lambda: "wirekube-agent" not in lab_.exec(node, ["ps", "-eo", "args"], check=True).stdout,
                 30, "the agent gone from the guest")
        mark = log.stat().st_size
        down_at = time.monotonic()
        time.sleep(5)  # the dataplane without any agent: the kernel keeps forwarding
        orchestrate.start_agent(lab_, handle, node)
        # Its first pass picks the engine for the existing link (adopting it); with nothing to
        # change it applies nothing, so no "applied" line is the success case.  Python starts
        # slowly under TCG on a loaded machine (measured up to ~4 min).
        wait_for(lambda: "chosen for existing" in log.read_text()[mark:], 420,
                 "the restarted agent's first reconcile pass", interval=1)
        MEASURED["agentRestartSeconds"] = round(time.monotonic() - down_at - 5, 1)
        results = {b: p.communicate(timeout=200)[0] for b, p in pingers.items()}
    finally:
        for p in pingers.values():
            if p.poll() is None:
                lab_.stop(p)
    for b, out in results.items():
        sent, received = _ping_stats(out)
        assert sent >= 100 and received == sent, f"{b} -> {node}: {received}/{sent} echoes answered"
    after = _wg_config(lab_, node)
    assert after["device"] == before["device"]
    peers = _peers(kube)
    for b in direct:
        key = peers[b]["spec"]["publicKey"]
        assert after[key] == before[key], f"peer {b} was rewritten: {before[key]} -> {after[key]}"
    restarted = log.read_text()[mark:]
    assert "engine kernel chosen for existing wireguard link" in restarted, restarted[-2000:]
    assert "set device" not in restarted and "private key" not in restarted, restarted[-2000:]
    for b in direct:
        update = f"applied update peer {key_fingerprint(peers[b]['spec']['publicKey'])}"
        assert update not in restarted, restarted[-2000:]


# ---- 3. UDP cut between a kernel node and a userspace node -------------------------------------------

GAP_PINGER = textwrap.dedent("""
    import subprocess, sys
    subprocess.run(["ping", "-D", "-n", "-i", "0.1", "-W", "2", "-w", sys.argv[2], sys.argv[1]])
""")


def _longest_gap(output: str) -> float:
    stamps = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.M)]
    assert len(stamps) > 20, output[-500:]
    return max(b - a for a, b in itertools.pairwise(stamps))


def test_udp_cut_between_kernel_and_userspace_fails_over_to_the_relay_and_back(lab: Any) -> None:
    lab_, kube, _ = lab
    k, u = "k-prc", "u-open"
    wait_for(lambda: _transport(kube, k, u) == "direct" and _transport(kube, u, k) == "direct", 120,
             "direct before the cut")
    k_ip = _mesh_ip(kube, k)
    u_public = str(lab_.node(u).public_ip)
    pinger = lab_.spawn(u, [sys.executable, "-c", GAP_PINGER, k_ip, "40"], pipe=True)
    try:
        assert pinger.stdout is not None
        head = []
        deadline = time.monotonic() + 30
        while sum("bytes from" in ln for ln in head) < 20:
            assert time.monotonic() < deadline, "no ping replies before the cut"
            head.append(pinger.stdout.readline())
        cut_at = time.monotonic()
        lab_.cut("kprc", "udp", peer=u_public)
        wait_for(lambda: _transport(kube, u, k) == "relay" and _transport(kube, k, u) == "relay", 60,
                 "both sides on the relay", interval=0.5)
        MEASURED["cutToRelayStatusSeconds"] = round(time.monotonic() - cut_at, 1)
        rest, _ = pinger.communicate(timeout=90)
        out = "".join(head) + rest
    finally:
        if pinger.poll() is None:
            lab_.stop(pinger)
        lab_.restore("kprc")
    gap = _longest_gap(out)
    sent, received = _ping_stats(out)
    MEASURED["udpCutLongestPingGapSeconds"] = round(gap, 2)
    MEASURED["udpCutEchoes"] = f"{received}/{sent} at 10/s"
    assert gap <= 6.0, f"longest ping gap {gap:.2f}s over the failover (TCG)"
    restored = time.monotonic()
    wait_for(lambda: _transport(kube, u, k) == "direct" and _transport(kube, k, u) == "direct", 8 * RETRY + 60,
             "back to direct", interval=1)
    MEASURED["restoreToDirectSeconds"] = round(time.monotonic() - restored, 1)
    assert orchestrate.ping(lab_, u, k_ip, timeout=2.0) is not None


# ---- 4. operator tools inside the guest (last: cleanup takes the node off the mesh) -----------------


def test_doctor_local_and_cleanup_work_inside_the_guest(lab: Any) -> None:
    lab_, _, _ = lab
    node = "k-sym"
    healthy = _timed(lab_, node, "doctor", [WIREKUBECTL, "doctor", "--local", "-o", "json"])
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    for agent in orchestrate.running_agents(lab_, node):
        lab_.stop(agent.pid, grace=20)
    wait_for(lambda: "wirekube-agent" not in lab_.exec(node, ["ps", "-eo", "args"], check=True).stdout,
             30, "the agent gone from the guest")
    stale = _timed(lab_, node, "doctorStale", [WIREKUBECTL, "doctor", "--local"])
    assert stale.returncode == 1 and "stale" in stale.stdout.lower(), stale.stdout + stale.stderr
    done = _timed(lab_, node, "cleanup", [WIREKUBECTL, "cleanup"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert lab_.exec(node, ["ip", "link", "show", "wire_kube"]).returncode != 0
    assert "22347" not in lab_.exec(node, ["ip", "rule"], check=True).stdout
    clean = _timed(lab_, node, "doctorClean", [WIREKUBECTL, "doctor", "--local"])
    assert clean.returncode == 0, clean.stdout + clean.stderr


OPERATOR_COMMAND_S = 450.0
"""Measured (TCG, one vCPU; kernel.json's operatorCommandSeconds): ``doctor --local`` took 208 s
while the guest's agent and relay path ran beside it on the one emulated CPU, and 27-38 s for
each command once the agent was stopped (session 5, in `make test`); twice the slow one."""


def _timed(lab_: Lab, node: str, what: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run an operator command in the guest, recording how long it took; when it does not finish,
    the error says what the guest was busy with."""
    started = time.monotonic()
    try:
        done = lab_.exec(node, argv, timeout=OPERATOR_COMMAND_S)
    except LabError as e:
        busy = lab_.exec(node, ["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], check=False, timeout=120).stdout
        raise AssertionError(f"{' '.join(argv[1:])} in {node}: {e}; the guest's busiest processes:\n"
                             + "\n".join(busy.splitlines()[:8])) from e
    MEASURED.setdefault("operatorCommandSeconds", {})[what] = round(time.monotonic() - started, 1)
    return done
