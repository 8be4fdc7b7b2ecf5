"""A throw-away multi-node network for agent tests: N node namespaces on one bridge.

Every namespace is named with a unique prefix (``wkt-<random>-``).  Each node has a *holder*
process (``sleep``) owning a private mount namespace with a tmpfs on /run/wireguard, so each
node's wireguard-go gets its own UAPI socket directory; agents and commands enter the node with
``nsenter -t HOLDER -m -n``.  Teardown kills, by PID, only processes living in these namespaces,
then deletes the namespaces.  Traffic stays inside them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.wait import wait_for
from wirekube import ipam
from wirekube.agent import keys as keystore

SUBNET = ipaddress.ip_network("192.168.77.0/24")
MESH_CIDR = "10.254.0.0/16"
LISTEN_PORT = 51820


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class Node:
    name: str
    netns: str
    address: ipaddress.IPv4Address
    holder: subprocess.Popen[bytes]
    state_dir: Path
    public_key: str
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path | None = None

    @property
    def mesh_ip(self) -> ipaddress.IPv4Address:
        return ipam.mesh_ip(self.name, MESH_CIDR)

    def enter(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh(*self.enter(*argv), check=check, timeout=timeout)

    def peer_object(self, endpoint: bool = True, extra_allowed: Sequence[str] = ()) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "publicKey": self.public_key,
            "allowedIPs": [f"{self.mesh_ip}/32", *extra_allowed],
            "persistentKeepalive": 5,
        }
        if endpoint:
            spec["endpoint"] = f"{self.address}:{LISTEN_PORT}"
        return {
            "apiVersion": "wirekube.io/v1alpha1",
            "kind": "WireKubePeer",
            "metadata": {"name": self.name, "creationTimestamp": f"2025-01-01T00:00:{int(self.name[-1]):02d}Z"},
            "spec": spec,
        }


@dataclass
class NetnsLab:
    workdir: Path
    prefix: str = field(default_factory=lambda: f"wkt-{uuid.uuid4().hex[:6]}-")
    nodes: list[Node] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    kubeconfig: Path | None = None
    """When set, agents read the API server through this kubeconfig instead of ``peers_file``."""

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    @property
    def peers_file(self) -> Path:
        return self.workdir / "peers.yaml"

    def up(self) -> NetnsLab:
        Path("/run/wireguard").mkdir(parents=True, exist_ok=True)
        self._add_ns(self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        return self

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def add_node(self, name: str) -> Node:
        index = len(self.nodes)
        ns = f"{self.prefix}{name}"
        self._add_ns(ns)
        host_side = f"v{index}"
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", host_side, "netns", self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "set", host_side, "master", "br0", "up")
        address = SUBNET.network_address + 10 + index
        sh("ip", "-n", ns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        holder = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs none /run/wireguard && exec sleep infinity"],
            start_new_session=True,
        )
        state = self.workdir / name
        state.mkdir(parents=True, exist_ok=True)
        keys = keystore.load_or_create(state)
        node = Node(name, ns, address, holder, state, keys.public_key)
        wait_for(lambda: _mounted_tmpfs(holder.pid), 10, f"{name}'s private /run/wireguard")
        self.nodes.append(node)
        return node

    def write_peers(self, nodes: Sequence[Node], **mesh_spec: Any) -> None:
        doc = {
            "mesh": {"metadata": {"name": "default"},
                     "spec": {"meshCIDR": MESH_CIDR, "listenPort": LISTEN_PORT, "engine": "userspace", **mesh_spec}},
            "peers": [n.peer_object() for n in nodes],
        }
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        os.replace(tmp, self.peers_file)

    def agent_argv(self, node: Node, *extra: str) -> list[str]:
        source = ("--kubeconfig", str(self.kubeconfig)) if self.kubeconfig else ("--peers-file", str(self.peers_file))
        return node.enter(
            sys.executable, "-m", "wirekube.agent.main",
            "--node-name", node.name,
            *source,
            "--state-dir", str(node.state_dir),
            "--engine", "userspace",
            "--no-imds",  # test traffic stays in the test's namespaces
            *extra,
        )

    def start_agent(self, node: Node, resync: float = 2.0) -> subprocess.Popen[bytes]:
        node.agent_log = node.state_dir / "agent.log"
        with open(node.agent_log, "ab") as log:
            node.agent = subprocess.Popen(
                self.agent_argv(node, "--resync-seconds", str(resync)),
                stdout=log, stderr=log, start_new_session=True,
            )
        return node.agent

    def once(self, node: Node, dry_run: bool = True) -> dict[str, Any]:
        import json

        argv = ["--once", "--dry-run"] if dry_run else ["--once"]
        out = sh(*self.agent_argv(node, *argv, "--log-level", "WARNING"), timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def ping(self, src: Node, dst: ipaddress.IPv4Address, count: int = 1, interval: float = 0.2,
             timeout: float = 1) -> tuple[int, int]:
        out = src.run("ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(timeout), str(dst),
                      check=False, timeout=count * interval + timeout + 10)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out.stdout)
        return (int(m[1]), int(m[2])) if m else (count, 0)

    def reachable(self, src: Node, dst: ipaddress.IPv4Address) -> bool:
        return self.ping(src, dst, count=1, timeout=1)[1] == 1

    def daemon_pids(self, node: Node) -> list[int]:
        return [p for p in pids_in_netns(node.netns) if _comm(p) == "wireguard-go"]

    def down(self) -> None:
        for node in self.nodes:
            if node.agent is not None and node.agent.poll() is None:
                node.agent.kill()
                node.agent.wait()
        for ns in self.namespaces:
            for pid in pids_in_netns(ns):
                _kill(pid)
        for node in self.nodes:
            node.holder.wait(timeout=10)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    missing: tuple[int, ...]
    """icmp_seq numbers that never got a reply."""
    log: str

    @property
    def lost(self) -> int:
        return self.transmitted - self.received


class ContinuousPing:
    """``ping -i 0.1`` (10 per second) from ``src`` until :meth:`stop`.

    :meth:`stop` interrupts ping right after a reply arrived, so no probe is in flight when it
    ends (the round trip is ~1 ms against a 100 ms interval): every unanswered probe is a loss.
    """

    def __init__(self, src: Node, dst: ipaddress.IPv4Address, interval: float = 0.1) -> None:
        self.label = f"{src.name} -> {dst}"
        self._proc = subprocess.Popen(
            src.enter("ping", "-n", "-D", "-O", "-i", str(interval), str(dst)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._lines: list[str] = []
        self._replies: list[int] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                m = re.search(r"bytes from .* icmp_seq=(\d+)", line)
                if m:
                    self._replies.append(int(m[1]))
                self._cond.notify_all()

    @property
    def replies(self) -> int:
        with self._cond:
            return len(self._replies)

    def wait_replies(self, more: int, timeout: float = 30) -> None:
        """Wait until ``more`` further replies than now have arrived (traffic demonstrably flows)."""
        target = self.replies + more
        wait_for(lambda: self.replies >= target or self._proc.poll() is not None, timeout,
                 f"{more} more replies on {self.label}")
        assert self._proc.poll() is None, f"ping {self.label} exited:\n" + "\n".join(self._lines[-20:])

    def stop(self, timeout: float = 10) -> PingResult:
        with self._cond:
            seen = len(self._replies)
            self._cond.wait_for(lambda: len(self._replies) > seen or self._proc.poll() is not None, timeout)
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGINT)
        self._proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        log = "\n".join(self._lines)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", log)
        transmitted, received = (int(m[1]), int(m[2])) if m else (0, 0)
        missing = tuple(sorted(set(range(1, transmitted + 1)) - set(self._replies)))
        return PingResult(transmitted, received, missing, log)

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def wirekube_rules(node: Node) -> list[str]:
    """``ip -4 rule`` lines WireKube owns (priorities 100..200), duplicates included."""
    lines = node.run("ip", "-4", "rule").stdout.splitlines()
    return [ln for ln in lines if 100 <= int(ln.split(":", 1)[0]) <= 200]


def table_routes(node: Node) -> list[str]:
    return node.run("ip", "-4", "route", "show", "table", "22347", check=False).stdout.splitlines()


def wg_dump(node: Node) -> dict[str, str]:
    """WireGuard peers on ``wire_kube``: public key -> allowed-ips."""
    lines = node.run("wg", "show", "wire_kube", "dump").stdout.splitlines()[1:]
    return {f[0]: f[3] for f in (ln.split("\t") for ln in lines)}


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def pids_in_netns(name: str) -> list[int]:
    """PIDs of processes whose network namespace is ``name`` (precise: compared by inode)."""
    inode = _netns_inode(name)
    if inode is None:
        return []
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _mounted_tmpfs(pid: int) -> bool:
    try:
        mounts = Path(f"/proc/{pid}/mounts").read_text()
    except OSError:
        return False
    return any(line.split()[1:3] == ["/run/wireguard", "tmpfs"] for line in mounts.splitlines())
