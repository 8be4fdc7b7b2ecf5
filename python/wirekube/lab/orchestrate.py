"""The whole lab: control plane + network + relay + agents, and what `wirekube-lab` shows of it.

    up(topology, name)     control plane, network (wirekube.lab.net), Node objects, the mesh,
                           two relays/STUN servers on the internet, one agent per node; waits
                           for convergence
    status(name)           nodes (NAT type, mesh IP) and every ordered pair (transport, RTT)
    down(name)             agents, relays, network, control plane; idempotent

State: the network's own state file (``net.Lab``), plus ``<workdir>/orchestrator.json`` with the
control plane's directory and the kubeconfig agents use. Every process is started through
``net.Lab.spawn*`` and so recorded and ended by PID.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wirekube import errors, k8s, reports
from wirekube.lab.cluster import ControlPlane, write_kubeconfig
from wirekube.lab.net import Lab, LabError, LabNotFound, default_workdir
from wirekube.lab.plan import RELAY_WSS_PORT
from wirekube.lab.procs import ProcessRecord, is_alive
from wirekube.lab.topology import Endpoint, Topology
from wirekube.progress import step

PY = sys.executable
STATE = "orchestrator.json"
MESH_CIDR = "10.255.0.0/16"
LISTEN_PORT = 51820


def _bin(name: str) -> str:
    """A console script of this venv (the lab runs the real entry points)."""
    candidate = Path(PY).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass(frozen=True)
class LabHandle:
    name: str
    workdir: Path
    cluster_dir: Path
    admin_kubeconfig: Path
    node_kubeconfig: Path


def _handle(name: str) -> LabHandle:
    workdir = default_workdir(name)
    return LabHandle(name, workdir, workdir / "cluster", workdir / "cluster" / "kubeconfig",
                     workdir / "node.kubeconfig")


# ---- up --------------------------------------------------------------------------------------------


def up(topology: Topology, name: str = "default", *, wait: float = 90.0, mesh_overrides: dict[str, Any] | None = None,
       controller: bool = False, gateways: list[dict[str, Any]] | None = None) -> LabHandle:
    """``controller``: also run ``wirekube-gateway`` (on the host, against the admin kubeconfig);
    ``gateways``: WireKubeGateway objects (or just their ``metadata.name`` + ``spec``) to create
    once the nodes exist."""
    if topology.kubernetes == "kubelet":  # real kubelet nodes, WireKube from the Helm chart
        from wirekube.lab import kubelet
        return kubelet.up(topology, name, wait=max(wait, 240.0))
    down(name)  # a crashed lab of the same name is cleaned first
    h = _handle(name)
    steps = 6
    step("lab", 1, steps, "building the network (namespaces, NAT routers, management path)")
    lab = Lab(topology, name=name)
    lab.up(wait_vms=False)  # kernel nodes' guests boot while the control plane starts
    try:
        step("lab", 2, steps, "starting the real etcd + kube-apiserver")
        cp = ControlPlane(h.cluster_dir, extra_sans=[str(lab.api_address)])
        cp.up()
        assert cp.state is not None
        lab.forward_api(("127.0.0.1", cp.state.apiserver_port))
        write_kubeconfig(h.node_kubeconfig, "https://127.0.0.1:6443", cp.pki)
        (h.workdir / STATE).write_text(json.dumps({"cluster": str(h.cluster_dir)}))
        kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
        step("lab", 3, steps, f"creating {len(lab.nodes)} Node objects and the WireKubeMesh")
        _create_nodes(kube, lab)
        overrides = dict(mesh_overrides or {})
        if lab.kernel_nodes:  # kernel nodes run the default choice; the others ask for wireguard-go
            overrides.setdefault("engine", "auto")
        _create_mesh(kube, lab, overrides)
        for gw in gateways or []:
            kube.apply(k8s.GATEWAYS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeGateway", **gw})
        if controller:
            start_controller(lab, h)
        replicas = lab.topology.internet.relay_replicas
        behind = f" ({len(replicas)} replicas behind a load balancer)" if replicas else ""
        step("lab", 4, steps, f"starting the relay on {lab.relay}{behind} and STUN on {', '.join(map(str, lab.stun))}")
        if lab.topology.internet.proxy is not None:
            start_proxy(lab)
        _start_relays(lab)
        if lab.kernel_nodes:
            step("lab", 5, steps, f"waiting for the VMs of {', '.join(sorted(lab.kernel_nodes))} to boot")
            lab.wait_vms()
        step("lab", 5, steps, f"starting {len(lab.nodes)} agents")
        started = time.monotonic()
        for node in lab.nodes:
            start_agent(lab, h, node)
        step("lab", 6, steps, f"waiting up to {wait:.0f}s for every pair that can work to pass traffic")
        converged = wait_converged(lab, kube, timeout=wait)
        kube.close()
        (h.workdir / STATE).write_text(json.dumps({
            "cluster": str(h.cluster_dir), "converged": converged,
            "convergence_seconds": round(time.monotonic() - started, 2) if converged else None,
            "agents_started_at": round(time.time() - (time.monotonic() - started), 3)}))
        if not converged:
            print("lab: not every expected pair converged in time; see `wirekube-lab status`", file=sys.stderr)
    except BaseException:
        down(name)
        raise
    return h


def _create_nodes(kube: k8s.Kube, lab: Lab) -> None:
    for name, node in lab.nodes.items():
        addresses = [{"type": "InternalIP", "address": str(node.lan_ip)}, {"type": "Hostname", "address": name}]
        if node.nat.value == "none":
            addresses.insert(1, {"type": "ExternalIP", "address": str(node.public_ip)})
        labels = {"wirekube.io/lab-site": node.site,
                  "eks.amazonaws.com/compute-type": "ec2" if node.nat.value == "none" else "hybrid"}
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
        if node.pod_cidr is not None:
            body["spec"] = {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(node.pod_cidr)]}
        created = kube.apply(k8s.NODES, body)
        kube.patch_status(k8s.NODES, name, {"status": {"addresses": addresses}})
        del created


def _create_mesh(kube: k8s.Kube, lab: Lab, overrides: dict[str, Any]) -> None:
    spec: dict[str, Any] = {
        "meshCIDR": MESH_CIDR,
        "listenPort": LISTEN_PORT,
        "engine": "userspace",
        "stunServers": [str(s) for s in lab.stun],
        "relay": {"mode": "auto", "provider": "external", "external": {"endpoint": str(lab.relay)},
                  "handshakeTimeoutSeconds": 20, "directRetryIntervalSeconds": 30},
        "autoAllowedIPs": {"includeNodeInternalIP": False},
    }
    if lab.topology.internet.proxy is not None:  # proxy-only sites reach the relay over WSS (issue 19)
        spec["relay"]["wssEndpoint"] = relay_wss_endpoint(lab)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    kube.apply(k8s.MESHES, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeMesh",
                            "metadata": {"name": "default"}, "spec": spec})


RELAY_MESH_PORT = 3480


def relay_endpoints(lab: Lab) -> list[Any]:
    """Where each relay process listens: the relay replicas behind the load balancer (or the one
    relay), then a plain relay/STUN server for every other STUN address."""
    internet = lab.topology.internet
    relays = [Endpoint(a, internet.relay.port) for a in internet.relay_replicas] or [lab.relay]
    taken = {lab.relay.host, *internet.relay_replicas}
    return [*relays, *[s for s in lab.stun if s.host not in taken]]


def relay_replicas(lab: Lab) -> list[int]:
    """The indexes (in :func:`relay_endpoints`) of the relay replicas behind the load balancer."""
    return list(range(len(lab.topology.internet.relay_replicas)))


def _relay_mesh_secret(lab: Lab) -> Path:
    """One secret for the lab's relay replicas, made once (in the lab's private directory)."""
    path = lab.workdir / "net" / "relay-mesh-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path


def start_relay(lab: Lab, index: int) -> subprocess.Popen[Any]:
    ep = relay_endpoints(lab)[index]
    argv = [_bin("wirekube-relay"), f"--listen={ep.host}:{ep.port}", f"--stun-listen={ep.host}:{ep.port}",
            f"--nat-probe-listen={ep.host}:{ep.port + 1}", f"--metrics-listen={ep.host}:9478",
            "--log-format=text", "--log-level=INFO"]
    if lab.topology.internet.proxy is not None and (index in relay_replicas(lab) or ep == lab.relay):
        tls = _proxy_files(lab)
        argv += [f"--wss-listen={ep.host}:{RELAY_WSS_PORT}", f"--wss-path={RELAY_WSS_PATH}",
                 f"--tls-cert={tls['cert']}", f"--tls-key={tls['key']}"]
    if index in relay_replicas(lab):
        peers = ",".join(f"{a}:{RELAY_MESH_PORT}" for a in lab.topology.internet.relay_replicas)
        argv += [f"--mesh-listen={ep.host}:{RELAY_MESH_PORT}", f"--mesh-peers={peers}",
                 f"--mesh-secret-file={_relay_mesh_secret(lab)}", "--drain-timeout=5"]
    proc = lab.spawn("internet", argv, lab.log_dir / f"relay-{index}.log")
    _wait_tcp(lab, "internet", str(ep.host), ep.port)
    return proc


RELAY_WSS_PATH = "/relay"
PROXY_USER = "wirekube-lab"


def relay_wss_endpoint(lab: Lab) -> str:
    return f"wss://{lab.relay.host}:{RELAY_WSS_PORT}{RELAY_WSS_PATH}"


def _proxy_files(lab: Lab) -> dict[str, str]:
    """The lab's CA and the relay's WSS certificate (for the relay's load-balancer address), the
    proxy's password and the credentials file agents in proxy-only sites read; made once, in the
    lab's directory (the key and the password 0600)."""
    from wirekube.lab.certs import make_server_cert

    base = lab.workdir / "net" / "proxy"
    paths = {"ca": base / "tls" / "ca.crt", "cert": base / "tls" / "tls.crt", "key": base / "tls" / "tls.key",
             "credentials": base / "credentials", "squid": base / "squid"}
    if not paths["credentials"].exists():
        make_server_cert(base / "tls", [], [str(lab.relay.host)])
        fd = os.open(paths["credentials"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{PROXY_USER}:{secrets.token_urlsafe(16)}\n")
    return {k: str(v) for k, v in paths.items()}


def start_proxy(lab: Lab) -> subprocess.Popen[Any]:
    """A real squid in the internet namespace (``internet.proxy``): CONNECT to 443 only, for the
    lab's one user; in the foreground, recorded and ended by PID like every lab process."""
    from wirekube.lab.squid import squid_argv, squid_available, write_squid

    proxy = lab.topology.internet.proxy
    assert proxy is not None
    why = squid_available()
    if why is not None:
        raise errors.WireKubeError(f"internet.proxy: {why}")
    files = _proxy_files(lab)
    user, _, password = Path(files["credentials"]).read_text().strip().partition(":")
    squid = write_squid(Path(files["squid"]), str(proxy), {user: password})
    for parent in Path(files["squid"]).parents:  # squid drops to its own user: it must reach its files
        parent.chmod(parent.stat().st_mode | 0o001)  # search only, not listing
        if parent == lab.workdir:
            break
    proc = lab.spawn("internet", squid_argv(squid), lab.log_dir / "proxy-squid.log")
    _wait_tcp(lab, "internet", str(proxy.host), proxy.port, timeout=30.0)
    return proc


def squid_access_log(lab: Lab) -> list[str]:
    from wirekube.lab.squid import SquidFiles, access_log_lines

    base = Path(_proxy_files(lab)["squid"])
    return access_log_lines(SquidFiles(base, base / "squid.conf", base / "access.log", base / "cache.log"))


def _start_relays(lab: Lab) -> None:
    for i in range(len(relay_endpoints(lab))):
        start_relay(lab, i)


def _wait_tcp(lab: Lab, target: str, host: str, port: int, timeout: float = 15.0) -> None:
    code = f"import socket; socket.create_connection(({host!r}, {port}), 1).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.exec(target, [PY, "-c", code], check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise errors.WireKubeError(f"{host}:{port} did not start listening in {target} within {timeout:.0f}s")


def start_controller(lab: Lab, h: LabHandle) -> subprocess.Popen[Any]:
    """``wirekube-gateway`` in the host namespace (the API server is on the host's loopback).

    Failback after 5 s instead of 30 s: the lab's VPC host routes to the first gateway peer (the
    VPC route table), and whichever peer reports healthy first at start-up is elected."""
    from wirekube.lab.cluster import free_port

    argv = [_bin("wirekube-gateway"), f"--kubeconfig={h.admin_kubeconfig}", "--namespace=wirekube-system",
            "--failback-delay=5", f"--metrics-listen=127.0.0.1:{free_port('127.0.0.1')}", "--log-format=text"]
    return lab.spawn_on_host(argv, lab.log_dir / "gateway-controller.log")


def agent_argv(h: LabHandle, node: str) -> list[str]:
    return [_bin("wirekube-agent"), f"--node-name={node}", f"--kubeconfig={h.node_kubeconfig}",
            f"--state-dir={h.workdir / 'nodes' / node}", "--metrics-listen=127.0.0.1:9090",
            # No EC2 metadata service in the lab: never send to 169.254.169.254 from a lab node.
            "--resync-seconds=10", "--log-format=text", "--no-imds"]


def running_agents(lab: Lab, node: str) -> list[ProcessRecord]:
    """The live agent processes of ``node``, from the lab's own records (PID + start time; never by name)."""
    records = [ProcessRecord.from_json(r) for r in (lab._state.read() or {}).get("processes", [])]
    return [r for r in records if r.role == "spawn" and r.target == node
            and any(Path(a).name == "wirekube-agent" for a in r.argv) and is_alive(r)]


def start_agent(lab: Lab, h: LabHandle, node: str, *, credentials: str | None = None) -> subprocess.Popen[Any]:
    """The same for every node: a kernel node's agent runs inside its VM (``Lab.spawn_in_node``
    starts it through the VM's command channel; the recorded host process stands for it).  A node
    in a ``proxy-only`` site gets ``HTTPS_PROXY`` (the API server's 127.0.0.1 forwarder stays
    off the proxy), the proxy credentials file (``credentials`` overrides it) and the lab's CA."""
    (h.workdir / "nodes" / node).mkdir(parents=True, exist_ok=True)
    argv = agent_argv(h, node)
    if lab.kernel_nodes and node not in lab.kernel_nodes:
        argv.append("--engine=userspace")  # the mesh says auto for the kernel nodes' sake
    env = None
    proxy = lab.topology.internet.proxy
    if proxy is not None and lab.nodes[node].nat.value == "proxy-only":
        files = _proxy_files(lab)
        argv += [f"--relay-proxy-credentials-file={credentials or files['credentials']}",
                 f"--relay-ca-file={files['ca']}"]
        env = {**os.environ, "HTTPS_PROXY": f"http://{proxy}", "NO_PROXY": "127.0.0.1,localhost"}
    return lab.spawn_in_node(node, argv, lab.log_dir / f"agent-{node}.log", env=env)


# ---- convergence and status -----------------------------------------------------------------------


def restart_agents(lab: Lab, h: LabHandle, nodes: tuple[str, ...], *, kill: bool, down_for: float = 0.0) -> None:
    """Stop the agents of ``nodes`` (kill -9, or SIGTERM and wait for them), keep them down
    ``down_for`` seconds (a scenario's pause), start them again.  Namespace nodes only: a kernel
    node's recorded process stands for the agent inside its VM."""
    records = [r for node in nodes for r in running_agents(lab, node)]
    if len(records) != len(nodes):
        raise LabError(f"expected one running agent per node of {nodes}, found {len(records)}")
    for record in records:
        if kill:
            os.kill(record.pid, 9)  # the PID the lab recorded for that agent, nothing else
        lab.stop(record.pid, grace=10)  # SIGTERM and wait (killed: reaps it and drops the record)
    time.sleep(down_for)
    for node in nodes:
        start_agent(lab, h, node)


def expected_pairs(lab: Lab) -> dict[tuple[str, str], str]:
    """Every ordered pair with the transport the NAT matrix predicts ("direct" or "relay")."""
    from wirekube.models import NatType, RelayMode
    from wirekube.traversal.nat import NodeFacts, choose_path

    kinds = {"none": NatType.OPEN, "full-cone": NatType.CONE, "port-restricted-cone": NatType.PORT_RESTRICTED_CONE,
             "symmetric": NatType.SYMMETRIC, "udp-blocked": NatType.UNKNOWN, "proxy-only": NatType.UNKNOWN}
    facts = {n: NodeFacts(kinds[i.nat.value], str(i.public_ip), i.nat.value in ("udp-blocked", "proxy-only"), True)
             for n, i in lab.nodes.items()}
    out = {}
    for a in facts:
        for b in facts:
            if a != b:
                d = choose_path(facts[a], facts[b], relay_mode=RelayMode.AUTO, birthday=False)
                out[(a, b)] = "relay" if d.relayed else "direct"
    return out


def ping(lab: Lab, src: str, dst_ip: str, count: int = 1, timeout: float = 1.0) -> float | None:
    """RTT in ms of a ping from ``src`` to ``dst_ip``, or None."""
    try:
        proc = lab.exec(src, ["ping", "-n", "-q", "-c", str(count), "-W", str(max(1, int(timeout))), dst_ip],
                        check=False, timeout=timeout * count + (30 if src in lab.kernel_nodes else 5))
    except LabError:  # timed out: a busy (TCG-emulated) kernel node answered too late
        return None
    m = re.search(r"= [\d.]+/([\d.]+)/", proc.stdout)
    return float(m.group(1)) if proc.returncode == 0 and m else None


def collect_nodes(lab: Lab, kube: k8s.Kube, peers: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    if peers is None:
        peers = {p["metadata"]["name"]: p for p in reports.list_peers(kube)}
    nodes = []
    for name, info in sorted(lab.nodes.items()):
        p = peers.get(name, {})
        allowed = (p.get("spec") or {}).get("allowedIPs") or []
        nodes.append({"name": name, "site": info.site, "natType": (p.get("status") or {}).get("natType", ""),
                      "meshIP": allowed[0].split("/")[0] if allowed else "", "labNAT": info.nat.value,
                      "engine": (p.get("status") or {}).get("engine", "")})
    return nodes


def collect(lab: Lab, kube: k8s.Kube) -> dict[str, Any]:
    peers = {p["metadata"]["name"]: p for p in reports.list_peers(kube)}
    nodes = collect_nodes(lab, kube, peers)
    mesh_ip = {n["name"]: n["meshIP"] for n in nodes}
    pairs_in = [(a["name"], b["name"]) for a in nodes for b in nodes if a["name"] != b["name"]]

    def measure(pair: tuple[str, str]) -> dict[str, Any]:
        a, b = pair
        status = (peers.get(a, {}).get("status") or {})
        transport = (status.get("peerTransports") or {}).get(b)
        rtt = ping(lab, a, mesh_ip[b]) if mesh_ip.get(b) else None
        if rtt is None and mesh_ip.get(b):  # one lost echo on a loaded machine is not a dead pair
            rtt = ping(lab, a, mesh_ip[b], timeout=2.0)
        return {"from": a, "to": b, "transport": transport if rtt is not None and transport else "none",
                "rttMs": rtt, "reason": (status.get("relayReasons") or {}).get(b, "")}

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        pairs = list(pool.map(measure, pairs_in))
    return {"nodes": nodes, "pairs": pairs}


def wait_converged(lab: Lab, kube: k8s.Kube, timeout: float) -> bool:
    expected = expected_pairs(lab)
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        # Ping (a process per pair; through the command channel for kernel nodes) only once every
        # agent reports the predicted transport: cheap while the mesh still forms.
        peers = {p["metadata"]["name"]: p for p in reports.list_peers(kube)}
        reported = sum(1 for (a, b), t in expected.items()
                       if ((peers.get(a, {}).get("status") or {}).get("peerTransports") or {}).get(b) == t)
        if reported < len(expected):
            step("lab", 6, 6, f"{reported}/{len(expected)} pairs report the predicted transport")
            time.sleep(2)
            continue
        last = collect(lab, kube)
        good = sum(1 for p in last["pairs"] if p["transport"] == expected[(p["from"], p["to"])])
        step("lab", 6, 6, f"{good}/{len(expected)} pairs pass traffic over the predicted transport")
        if good == len(expected):
            return True
        time.sleep(2)
    return False


def render_status(data: dict[str, Any], log_dir: Path) -> str:
    lines = [f"{'NODE':<12} {'SITE':<10} {'LAB NAT':<22} {'DETECTED':<22} {'MESH-IP':<15} ENGINE"]
    for n in data["nodes"]:
        engine = (n.get("engine") or "-").split(" (")[0]
        lines.append(f"{n['name']:<12} {n['site']:<10} {n['labNAT']:<22} {n['natType'] or '-':<22} "
                     f"{n['meshIP'] or '-':<15} {engine}")
    lines.append("")
    lines.append(f"{'FROM':<12} {'TO':<12} {'TRANSPORT':<10} {'RTT ms':>7}  REASON")
    for p in data["pairs"]:
        rtt = f"{p['rttMs']:.2f}" if p["rttMs"] is not None else "-"
        lines.append(f"{p['from']:<12} {p['to']:<12} {p['transport']:<10} {rtt:>7}  {p['reason']}")
    lines.append("")
    lines.append(f"logs: {log_dir}")
    return "\n".join(lines) + "\n"


def state(name: str) -> dict[str, Any]:
    path = _handle(name).workdir / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def attach(name: str) -> tuple[Lab, k8s.Kube, LabHandle]:
    h = _handle(name)
    lab = Lab.attach(name)
    return lab, k8s.Kube.from_kubeconfig(str(h.admin_kubeconfig)), h


# ---- down ------------------------------------------------------------------------------------------


def down(name: str = "default") -> None:
    from wirekube.lab import kubelet

    h = _handle(name)
    kubelet.down_hook(name, h.workdir)  # kubelet nodes: their containers first
    try:
        Lab.destroy(name)
    except LabNotFound:
        pass
    kubelet.remove_files(h.workdir)
    if (h.cluster_dir / "cluster.json").exists():
        ControlPlane.load(h.cluster_dir).down()
    for leftover in (h.workdir / STATE, h.node_kubeconfig):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(h.workdir / "nodes", ignore_errors=True)
    try:
        h.workdir.rmdir()  # only when nothing else is left in it
    except OSError:
        pass
