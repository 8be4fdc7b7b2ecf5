"""The lab's network, for real: namespaces, NAT routers checked with STUN, management path,
per-node /run/wireguard, clean teardown, crash recovery and two labs side by side.

One lab of the default topology is shared by the behaviour tests (module fixture); lifecycle
tests build their own small labs.  STUN answers come from the real ``wirekube-relay`` (its
built-in STUN responder), two instances on the internet segment's two STUN addresses.
Every wait is a condition with a deadline; every lab is removed in a ``finally``.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.root import require_root
from tests.fixtures.wait import wait_for
from wirekube.lab import procs
from wirekube.lab.net import Lab, LabError
from wirekube.lab.plan import netns_prefix
from wirekube.lab.topology import (
    NatKind,
    builtin_topology,
    default_topology,
    parse_topology_yaml,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

PY = sys.executable
NEEDED_TOOLS = ("ip", "nft", "nsenter", "unshare", "sysctl")
_ports = itertools.count(41000)  # a fresh local UDP port per probe: no conntrack carry-over

SMALL_TOPOLOGY = """\
sites:
  - {name: pub, nat: none, nodes: [{name: pub-1}]}
  - name: home
    nat: port-restricted-cone
    nodes: [{name: home-1}, {name: home-2, podCIDR: 10.200.0.0/24, pods: 1}]
networks:
  - name: vpc
    cidr: 10.100.0.0/24
    nodes: [pub-1]
    gateway: pub-1
    hosts: [{name: vpc-host, routes: [192.168.2.0/24]}]
"""


def require_netns() -> None:
    require_root()
    missing = [tool for tool in NEEDED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")


def start_stun_servers(lab: Lab) -> None:
    """The lab's relays answer STUN on its STUN endpoints, started as the lab starts them (the
    relay address is a load balancer in front of the replicas)."""
    from wirekube.lab import orchestrate

    for index in range(len(orchestrate.relay_endpoints(lab))):
        orchestrate.start_relay(lab, index)
    # The probe retransmits until the deadline, so this returns as soon as both answer.
    result = lab.exec("internet", [PY, "-m", "wirekube.lab.stunprobe", "--timeout", "20",
                                   *(arg for s in lab.stun for arg in ("--server", str(s)))])
    assert result.returncode == 0, (result.stdout, result.stderr, logs(lab))


def logs(lab: Lab) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in lab.log_dir.glob("*.log"))


def stun_once(lab: Lab, node: str, servers: list[str], port: int | None = None,
              timeout: float = 3.0) -> list[str | None]:
    """Mapped addresses seen by each server, asked in order from one socket in ``node``
    (each answer normally takes a millisecond; ``timeout`` only bounds a missing one)."""
    port = port or next(_ports)
    result = lab.exec(node, [PY, "-m", "wirekube.lab.stunprobe", "--bind", f"0.0.0.0:{port}",
                             "--timeout", str(timeout),
                             *(a for s in servers for a in ("--server", s))])
    return [r.get("mapped") for r in json.loads(result.stdout)["results"]]


def counter(lab: Lab, router: str, name: str) -> int:
    out = lab.exec(router, ["nft", "-j", "list", "counter", "ip", "wklab", name], check=True)
    for item in json.loads(out.stdout)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise AssertionError(f"no counter {name} in {router}")


class Probe:
    """An interactive stunprobe inside a lab namespace (one UDP socket, JSON lines)."""

    def __init__(self, lab: Lab, target: str, bind: str) -> None:
        self.lab = lab
        self.proc = lab.spawn(target, [PY, "-m", "wirekube.lab.stunprobe", "--bind", bind,
                                       "--interactive"],
                              lab.log_dir / f"probe-{target}.log", pipe=True)
        self.local = self._line(10)["local"]

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the probe did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the probe exited: {self.proc.poll()}"
        return json.loads(line)

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._line(float(args.get("timeout", 2)) + 10)

    def close(self) -> None:
        self.lab.stop(self.proc)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_netns()
    the_lab = Lab(default_topology(), f"t{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("lab"))
    try:
        the_lab.up()
        start_stun_servers(the_lab)
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def probes(lab: Lab) -> Iterator[Callable[[str, str], Probe]]:
    made: list[Probe] = []

    def make(target: str, bind: str) -> Probe:
        made.append(Probe(lab, target, bind))
        return made[-1]

    yield make
    for probe in made:
        probe.close()


# ---------------------------------------------------------------- NAT behaviour via STUN


@pytest.mark.parametrize("node", ["ec2-a", "prc-1", "fullcone-1", "sym1-1", "sym2-1"])
def test_mapping_per_nat_kind(lab: Lab, node: str) -> None:
    info = lab.node(node)
    port = next(_ports)
    a, b = (str(s) for s in lab.stun)
    first_a, first_b, again_a = stun_once(lab, node, [a, b, a], port)
    assert None not in (first_a, first_b, again_a), logs(lab)
    hosts = {m.rpartition(":")[0] for m in (first_a, first_b, again_a)}  # type: ignore[union-attr]
    ports = [int(m.rpartition(":")[2]) for m in (first_a, first_b, again_a)]  # type: ignore[union-attr]
    assert hosts == {str(info.public_ip)}
    assert ports[0] == ports[2], "the same destination must keep its mapping"
    if info.nat is NatKind.SYMMETRIC:
        assert ports[0] != ports[1], "symmetric NAT: a new port per destination"
    else:
        # Endpoint-independent mapping; the port is even kept when free.
        assert ports == [port, port, port]


def test_udp_blocked_lets_tcp_out_but_no_udp(lab: Lab) -> None:
    router = lab.routers["udpblock"].name
    before = counter(lab, router, "udp_blocked")
    # The router's drop counter is the evidence; the short STUN timeout only ends the probe.
    assert stun_once(lab, "udpblock-1", [str(lab.stun[0])], timeout=0.6) == [None]
    assert counter(lab, router, "udp_blocked") > before
    out = lab.exec("udpblock-1", [PY, "-m", "wirekube.lab.stunprobe", "--tcp", "--server",
                                  str(lab.relay)], check=True)
    assert "connected" in json.loads(out.stdout)["results"][0]


def test_eks_hybrid_topology_comes_up_with_pods_and_the_vpc(tmp_path: Path) -> None:
    require_netns()
    lab = Lab(builtin_topology("eks-hybrid"), f"t{uuid.uuid4().hex[:6]}", tmp_path / "lab")
    try:
        lab.up()
        for pod in lab.pods.values():
            node = lab.node(pod.node)
            lab.exec(pod.name, ["ping", "-c1", "-W2", str(node.lan_ip)], check=True)
            lab.exec(pod.node, ["ping", "-c1", "-W2", str(pod.address)], check=True)
        for node in ("ec2-a", "ec2-b"):
            address = lab.node(node).private["vpc"]
            lab.exec("vpc-host", ["ping", "-c1", "-W2", str(address)], check=True)
        routes = lab.exec("vpc-host", ["ip", "route"], check=True).stdout
        for cidr in ("172.20.0.0/16", "10.20.0.0/16", "10.200.0.0/16"):
            assert f"{cidr} via {lab.node('ec2-a').private['vpc']}" in routes
    finally:
        lab.down()


@pytest.mark.parametrize(("node", "delivered"), [
    ("ec2-a", True),  # public address: open
    ("fullcone-1", True),  # full cone: any source may use the mapping
    ("prc-1", False),  # port-restricted cone
    ("sym1-1", False),  # symmetric
])
def test_unsolicited_inbound(lab: Lab, probes: Callable[[str, str], Probe], node: str,
                             delivered: bool) -> None:
    info = lab.node(node)
    stun_a, stun_b = lab.stun
    inside = probes(node, f"0.0.0.0:{next(_ports)}")
    mapped = inside.ask("stun", server=str(stun_a))["mapped"]
    # Two strangers: another address, and the contacted address from another port.
    strangers = [probes("internet", f"{stun_b.host}:0"), probes("internet", f"{stun_a.host}:0")]
    router = lab.routers[info.site].name
    for number, stranger in enumerate(strangers):
        dropped_before = counter(lab, router, "unsolicited") if not delivered else 0
        assert stranger.ask("send", to=mapped, data=f"hello-{number}")["sent"] > 0
        if delivered:
            got = inside.ask("recv", timeout=5)
            assert got == {"from": stranger.local, "data": f"hello-{number}"}
            # ...and the answer goes back out through the same mapping.
            inside.ask("send", to=stranger.local, data=f"reply-{number}")
            assert stranger.ask("recv", timeout=5) == {"from": mapped, "data": f"reply-{number}"}
        else:
            wait_for(lambda: counter(lab, router, "unsolicited") > dropped_before, 5,
                     f"{router} to drop the unsolicited datagram")
            assert inside.ask("drain") == {"datagrams": []}
    # The pitfall: an unsolicited probe must not move the mapping of the node's own flow.
    assert inside.ask("stun", server=str(stun_a))["mapped"] == mapped


def test_cut_and_restore_at_a_router(lab: Lab, probes: Callable[[str, str], Probe]) -> None:
    """An outage at a router (Lab.cut) and its end (Lab.restore), on a flow that keeps its
    NAT mapping across the cut."""
    stun_a, stun_b = lab.stun
    inside = probes("prc-2", f"0.0.0.0:{next(_ports)}")
    mapped = inside.ask("stun", server=str(stun_a))["mapped"]
    lab.cut("prc", "udp", peer=str(stun_a.host))
    try:
        assert inside.ask("stun", server=str(stun_a), timeout=0.5) == {"error": "timeout"}
        assert "mapped" in inside.ask("stun", server=str(stun_b))  # only that peer is cut
        rules = lab.exec("prc-router", ["nft", "list", "chain", "ip", "wklab", "impair"]).stdout
        assert "packets 0 " not in rules.split("ip daddr", 1)[1].split("\n", 1)[0], rules
    finally:
        lab.restore("prc")
    assert inside.ask("stun", server=str(stun_a))["mapped"] == mapped
    with pytest.raises(ValueError, match="protocol"):
        lab.cut("prc", "sctp")


def test_two_nodes_behind_one_nat_share_its_address_and_their_lan(lab: Lab) -> None:
    one, two = lab.node("prc-1"), lab.node("prc-2")
    assert one.public_ip == two.public_ip == lab.routers["prc"].wan_ip
    lab.exec("prc-1", ["ping", "-c1", "-W2", str(two.lan_ip)], check=True)
    mapped = [stun_once(lab, n, [str(lab.stun[0])])[0] for n in ("prc-1", "prc-2")]
    assert {m.rpartition(":")[0] for m in mapped if m} == {str(one.public_ip)}


def test_turnutils_stunclient_agrees(lab: Lab) -> None:
    """An independent STUN client (coturn's) sees the same public address from a NAT site."""
    if shutil.which("turnutils_stunclient") is None:
        pytest.skip("coturn's turnutils_stunclient is not installed")
    stun = lab.stun[1]
    out = lab.exec("fullcone-1", ["turnutils_stunclient", "-p", str(stun.port), str(stun.host)],
                   timeout=20)
    assert f"UDP reflexive addr: {lab.routers['fullcone'].wan_ip}:" in out.stdout, out


# ---------------------------------------------------------------- isolation and addressing


def test_sites_are_isolated_and_nothing_routes_out_of_the_lab(lab: Lab) -> None:
    other_lan = lab.node("fullcone-1").lan_ip
    result = lab.exec("prc-1", ["ping", "-c1", "-W1", str(other_lan)])
    assert result.returncode != 0  # private LANs are not routed on the internet
    for target in ("internet", *(r.name for r in lab.routers.values())):
        routes = lab.exec(target, ["ip", "route", "show", "default"], check=True).stdout
        assert ("default" in routes) is (target != "internet"), (target, routes)
    assert lab.exec("internet", ["ping", "-c1", "-W1", "192.0.2.1"]).returncode != 0
    # The VPC: hosts reach the nodes attached to it, and its routes point at the gateway.
    vpc_host = lab.hosts["vpc-host"]
    for node in ("ec2-a", "ec2-b"):
        lab.exec("vpc-host", ["ping", "-c1", "-W2", str(lab.node(node).private["vpc"])], check=True)
    routes = lab.exec("vpc-host", ["ip", "route"], check=True).stdout
    assert f"192.168.2.0/24 via {lab.node('ec2-a').private['vpc']}" in routes
    assert vpc_host.address.compressed in routes


def test_every_exec_target_runs_commands_in_its_own_namespace(lab: Lab) -> None:
    for target in lab.targets():
        out = lab.exec(target, ["readlink", "/proc/self/ns/net"], check=True).stdout.strip()
        assert out == f"net:[{os.stat(f'/run/netns/{lab.netns(target)}').st_ino}]", target
    with pytest.raises(KeyError, match="no 'ghost'"):
        lab.exec("ghost", ["true"])


def test_attach_rebuilds_the_running_lab_from_its_state(lab: Lab) -> None:
    again = Lab.attach(lab.name, lab.workdir)
    assert again.nodes == lab.nodes and again.holder_pid("prc-1") == lab.holder_pid("prc-1")
    assert again.exec("prc-1", ["ip", "-br", "addr", "show", "eth0"], check=True).stdout


# ---------------------------------------------------------------- management path


@pytest.fixture
def fake_api() -> Iterator[tuple[str, int]]:
    """A TCP server on the host's loopback that greets every connection."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(f"api hello {peer[0]}\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()
    stop.set()
    thread.join()
    server.close()


def _connect(lab: Lab, target: str, host: str, port: int) -> str:
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 3); "
            "print(s.makefile().readline().strip())")
    result = lab.exec(target, [PY, "-c", code, host, str(port)])
    return result.stdout.strip() if result.returncode == 0 else f"failed: {result.stderr[-200:]}"


def test_management_path_reaches_the_host_loopback_from_every_node_only(
        lab: Lab, fake_api: tuple[str, int]) -> None:
    with pytest.raises(LabError, match="not a loopback address"):
        lab.forward_api(("192.0.2.2", 6443))
    endpoint = lab.forward_api(fake_api, port=6443)
    routed = lab.api_routed_endpoint
    assert endpoint is not None and routed is not None
    assert (str(endpoint), str(routed)) == ("127.0.0.1:6443", "10.254.0.1:6443")
    for node in lab.nodes:
        assert _connect(lab, node, "127.0.0.1", 6443) == "api hello 127.0.0.1"
        assert _connect(lab, node, str(routed.host), 6443) == "api hello 127.0.0.1"
        route = lab.exec(node, ["ip", "route", "get", str(routed.host)], check=True).stdout
        assert " dev mgmt " in route, route
    # Not from routers or hosts, and the hub does not connect nodes to each other.
    assert _connect(lab, "prc-router", str(routed.host), 6443).startswith("failed")
    assert _connect(lab, "vpc-host", str(routed.host), 6443).startswith("failed")
    other = lab.node("prc-2").mgmt_ip
    assert lab.exec("prc-1", ["ping", "-c1", "-W1", str(other)]).returncode != 0


# ---------------------------------------------------------------- per-node mounts


def test_each_node_runs_its_own_wireguard_go_with_the_same_interface_name(lab: Lab) -> None:
    if shutil.which("wireguard-go") is None or shutil.which("wg") is None:
        pytest.skip("needs wireguard-go and wg")
    nodes = ["prc-1", "prc-2"]
    env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
    engines = [lab.spawn_in_node(n, ["wireguard-go", "-f", "wire_kube"],
                                 lab.log_dir / f"wg-{n}.log", env=env) for n in nodes]
    try:
        for node in nodes:
            wait_for(lambda: lab.exec(node, ["wg", "show", "wire_kube"]).returncode == 0, 10,
                     f"wireguard-go UAPI in {node}")
            assert lab.exec(node, ["ls", "/run/wireguard"]).stdout.split() == ["wire_kube.sock"]
        assert all(engine.poll() is None for engine in engines), logs(lab)
    finally:
        for engine in engines:
            lab.stop(engine)


# ---------------------------------------------------------------- lifecycle


def snapshot(name: str) -> dict[str, Any]:
    prefix = netns_prefix(name)
    mounts = []
    for path in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            if f"/run/netns/{prefix}" in path.read_text():
                mounts.append(path)
        except OSError:
            continue
    return {
        "netns": sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix)),
        "links": set(subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                                    check=True).stdout.split("\n")),
        "mounts": mounts,
    }


def link_names(lines: set[str]) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in lines if line.strip()}


def test_up_down_leaves_nothing_behind_and_down_is_idempotent(tmp_path: Path) -> None:
    require_netns()
    name = f"t{uuid.uuid4().hex[:6]}"
    workdir = tmp_path / "lab"
    before = snapshot(name)
    lab = Lab(parse_topology_yaml(SMALL_TOPOLOGY), name, workdir)
    try:
        lab.up()
        assert len(snapshot(name)["netns"]) == len(lab.plan.namespaces)
        # A pod reaches its node (at the pod gateway and at the node's own LAN address).
        lab.exec("home-2.pod0", ["ping", "-c1", "-W2", "10.200.0.1"], check=True)
        lab.exec("home-2.pod0", ["ping", "-c1", "-W2", str(lab.node("home-2").lan_ip)], check=True)
        sleeper = lab.spawn_in_node("home-1", ["sleep", "600"])
        # A daemon started through exec is not recorded, but lives in the lab's namespace.
        lab.exec("vpc-host", ["sh", "-c", "sleep 600 >/dev/null 2>&1 &"], check=True)
        inode = os.stat(f"/run/netns/{lab.netns('vpc-host')}").st_ino
        (stray,) = procs.pids_in_netns({inode})
        recorded = [procs.ProcessRecord.from_json(r)
                    for r in json.loads((workdir / "state.json").read_text())["processes"]]
        assert {r.role for r in recorded} == {"holder", "spawn"}
        stray_started = procs.start_time(stray)
    finally:
        lab.down()
    after = snapshot(name)
    assert after["netns"] == [] and after["mounts"] == []
    ours = {v.ifname_a for v in lab.plan.veths} | {v.ifname_b for v in lab.plan.veths}
    assert not (link_names(after["links"] - before["links"]) & ours)
    assert not any(procs.is_alive(r) for r in recorded)
    assert sleeper.returncode is not None
    assert procs.start_time(stray) != stray_started
    assert not workdir.exists()
    lab.down()  # twice is fine
    Lab.destroy(name, workdir)
    assert not workdir.exists() and snapshot(name)["netns"] == []


def test_down_removes_only_what_the_lab_made_in_a_shared_workdir(tmp_path: Path) -> None:
    require_netns()
    workdir = tmp_path / "shared"
    (workdir / "logs").mkdir(parents=True)
    foreign = [workdir / "orchestrator.json", workdir / "logs" / "cluster.log"]
    for path in foreign:
        path.write_text("not the lab's")
    lab = Lab(parse_topology_yaml(SMALL_TOPOLOGY), f"t{uuid.uuid4().hex[:6]}", workdir)
    try:
        lab.up()
        proc = lab.spawn("internet", ["sleep", "600"])  # default log: <workdir>/logs/...
        lab.stop(proc)  # its log is still the lab's to remove
    finally:
        lab.down()
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == [
        Path("logs"), Path("logs/cluster.log"), Path("orchestrator.json")]


CRASHING_UP = """
import os, sys
from wirekube.lab.net import Lab
from wirekube.lab.topology import parse_topology_yaml
lab = Lab(parse_topology_yaml(sys.argv[1]), sys.argv[2], sys.argv[3]).up()
p = lab.spawn_in_node("home-1", ["sleep", "600"])
print(p.pid, flush=True)
os._exit(0)  # "crash": no down()
"""


def test_up_after_a_crash_cleans_the_leftovers_first(tmp_path: Path) -> None:
    require_netns()
    name = f"t{uuid.uuid4().hex[:6]}"
    workdir = tmp_path / "lab"
    out = subprocess.run([PY, "-c", CRASHING_UP, SMALL_TOPOLOGY, name, str(workdir)],
                         capture_output=True, text=True, timeout=120)
    try:
        assert out.returncode == 0, out.stderr
        left = [procs.ProcessRecord.from_json(r)
                for r in json.loads((workdir / "state.json").read_text())["processes"]]
        assert left and all(procs.is_alive(r) for r in left)
        assert int(out.stdout) in {r.pid for r in left}
        assert Lab.exists(name, workdir)
        lab = Lab(parse_topology_yaml(SMALL_TOPOLOGY), name, workdir).up()
        assert not any(procs.is_alive(r) for r in left)
        lab.exec("home-1", ["ping", "-c1", "-W2", str(lab.node("home-2").lan_ip)], check=True)
    finally:
        Lab.destroy(name, workdir)
    assert snapshot(name)["netns"] == [] and not Lab.exists(name, workdir)


def test_two_labs_side_by_side_with_the_same_addresses(tmp_path: Path) -> None:
    require_netns()
    topology = parse_topology_yaml(SMALL_TOPOLOGY)
    labs = [Lab(topology, f"t{uuid.uuid4().hex[:6]}", tmp_path / str(i)) for i in range(2)]
    try:
        for each in labs:
            each.up()
            start_stun_servers(each)
        first, second = labs
        assert first.node("home-1").lan_ip == second.node("home-1").lan_ip
        assert not {n.netns for n in first.plan.namespaces} & {n.netns for n in second.plan.namespaces}
        port = next(_ports)  # the same local port in both labs: separate NATs, same mapping
        for each in labs:
            assert stun_once(each, "home-1", [str(each.stun[0])], port) == [
                f"{each.routers['home'].wan_ip}:{port}"]
        first.down()
        assert snapshot(first.name)["netns"] == [] and snapshot(first.name)["mounts"] == []
        assert stun_once(second, "home-1", [str(second.stun[1])])[0] is not None
        second.exec("home-1", ["ping", "-c1", "-W2", str(second.node("home-2").lan_ip)], check=True)
    finally:
        for each in labs:
            each.down()
    assert all(snapshot(each.name)["netns"] == [] for each in labs)

