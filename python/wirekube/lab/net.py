"""Build and tear down a lab's network: namespaces, links, NAT routers, management path, processes.

API (what the lab orchestrator calls)::

    from wirekube.lab.net import Lab
    from wirekube.lab.topology import default_topology, load_topology

    lab = Lab(default_topology(), name="default", workdir=None).up(api_target=("127.0.0.1", 6443))
    lab.nodes["prc-1"]            # NodeInfo: site, nat, netns, lan_ip (InternalIP), public_ip,
                                  #   mgmt_ip, private {network: ip}, interfaces, pod_cidr, pods
    lab.routers["prc"]            # RouterInfo: name "prc-router", nat, netns, wan_ip, lan_ip, lan
    lab.hosts["vpc-host"]         # HostInfo: network, netns, address
    lab.pods["ec2-a.pod0"]        # PodInfo: node, netns, address
    lab.relay, lab.stun           # Endpoint(host, port) of the relay / each STUN server
    lab.api_address               # 10.254.0.1: routed API address (an IP SAN for the API cert)
    lab.api_endpoint              # 127.0.0.1:PORT: the API server as seen inside every node
    lab.api_routed_endpoint       # 10.254.0.1:PORT: the same over the node's `mgmt` link
    lab.nat_by_site()             # {"prc": NatKind.PORT_RESTRICTED_CONE, ...}
    lab.targets()                 # every exec name: nodes, SITE-router, internet, hosts, pods
    lab.netns("prc-1")            # "wkl-default.prc-1" (for pyroute2 NetNS or `ip -n`)
    lab.exec("prc-1", ["ip", "-br", "addr"])       # CompletedProcess (text), waits
    proc = lab.spawn_in_node("prc-1", ["wirekube-agent", ...], log_path)   # Popen
    proc = lab.spawn("internet", ["wirekube-relay", ...], log_path)        # any target
    proc = lab.spawn_on_host(["wirekube-gateway", ...], log_path)         # host namespace
    lab.stop(proc)                # SIGTERM, then SIGKILL after a grace period; returns the code
    lab.command("prc-1", argv)    # the full argv that runs argv there (for os.execvp: a tty)
    lab.forward_api(("127.0.0.1", 6443))           # start the API proxies later (or in up)
    lab.cut("prc", "udp", peer="198.18.4.2"); lab.restore("prc")  # outages at a router
    lab.down()                    # idempotent; also Lab.destroy(name) without a topology
    Lab.attach("default")         # the running lab, from its state file (another process)

Design:

- Every namespace is named ``wkl-<lab>.<key>`` (see ``wirekube.lab.plan`` for the keys and the
  address plan).  Lab names never contain ``.``, so ``wkl-<lab>.`` identifies one lab's
  namespaces exactly; two labs use identical interface names and addresses side by side.
- Nothing is created in the host's network namespace: no links, no addresses, no routes, no
  nftables tables.  Packets therefore cannot leave the lab; the internet namespace has no
  default route.
- Management path (the API server stays on the host's loopback; nothing it serves crosses a
  site LAN, a router or ``wire_kube``): ``forward_api`` starts ``wirekube.lab.apiproxy`` twice,
  processes in the host namespace whose listening sockets were created inside other namespaces:
  (1) on ``127.0.0.1:PORT`` inside every node, the address node kubeconfigs use (the API
  certificate already carries 127.0.0.1); (2) on the API address (``10.254.0.1``) inside the
  hub namespace ``_mgmt``, which every node reaches over its own /32 point-to-point veth
  ``mgmt``: a routed API address, as on a real machine, for tests of the agent's "keep a /32 to
  the API server in the main table" rule (that certificate needs the API address as an IP SAN:
  ``ControlPlane(extra_sans=[str(lab.plan.api_address)])``).  The hub does not forward, so nodes
  cannot reach each other through it.
- Each node has a *holder* process: ``ip netns exec NODE unshare --mount --propagation private``
  with a tmpfs on ``/run/wireguard``, then ``sleep infinity``.  ``exec``/``spawn`` in a node run
  through ``nsenter -t HOLDER -m -n``, so each node's wireguard-go has its own
  ``/run/wireguard``.  Routers, the internet, hosts and pods use ``ip netns exec``.
- Every process the lab starts is recorded (PID + start time) in ``<workdir>/state.json`` and
  ended by PID only; processes found running inside the lab's namespaces at ``down`` (daemons
  started through ``exec``) are ended by PID too.  ``up`` first cleans whatever a crashed lab
  of the same name left (state file and namespace prefix), then writes the state before
  creating anything, so a crash at any point can be cleaned.
- Default workdir: ``/run/wirekube-lab/<lab>`` (it may be shared with the orchestrator's own
  files).  ``down`` removes ``state.json``, ``<workdir>/net/`` (holders' and proxies' files) and,
  unless ``keep_logs``, the logs of processes the lab started that lie in ``<workdir>/logs``;
  then the logs directory and the workdir if they are empty.  It never removes other files.  The
  shared ``/run/wireguard`` mount point on the host is created if missing and left in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from loguru import logger

from wirekube.errors import WireKubeError
from wirekube.lab import nat, procs, vm
from wirekube.lab.plan import (
    IF_WAN,
    INTERNET,
    HostInfo,
    LabPlan,
    NodeInfo,
    PodInfo,
    RouterInfo,
    check_lab_name,
    netns_prefix,
    plan_lab,
)
from wirekube.lab.procs import ProcessRecord
from wirekube.lab.topology import DEFAULT_WAN_MTU, MIN_WAN_MTU, Endpoint, NatKind, Topology, parse_topology

DEFAULT_ROOT = Path("/run/wirekube-lab")
NETNS_DIR = Path("/run/netns")
WIREGUARD_RUN = Path("/run/wireguard")
STATE_VERSION = 1
PRIVATE_DIR = "net"  # <workdir>/net: holders' ready files and log, proxies' ready files
READY_TIMEOUT_S = 10.0


class LabError(WireKubeError):
    """A lab operation failed; ``command`` and ``stderr`` say which and why when known."""

    def __init__(self, message: str, command: Sequence[str] = (), stderr: str = "") -> None:
        detail = f"\n  command: {' '.join(command)}" if command else ""
        detail += f"\n  stderr: {stderr.strip()}" if stderr.strip() else ""
        super().__init__(message + detail)
        self.command = tuple(command)
        self.stderr = stderr


class LabNotFound(LabError):
    """No lab of that name is up (no state file)."""


def run(argv: Sequence[str], input: str | None = None, check: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion; raise :class:`LabError` if it fails and ``check``."""
    logger.trace("run: {}", " ".join(argv))
    try:
        result = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                                timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"could not run {argv[0]}: {e}", argv) from e
    if check and result.returncode != 0:
        raise LabError(f"{argv[0]} failed with exit code {result.returncode}", argv,
                       result.stderr)
    return result


def _endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(ipaddress.IPv4Address(host), int(port))


def default_workdir(name: str) -> Path:
    return DEFAULT_ROOT / name


@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[None]:
    """An exclusive lock on the workdir (created if needed), safe against its removal."""
    while True:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(workdir).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
        finally:
            os.close(fd)


class _State:
    """The state file: what exists, so that any process (or a later `up`) can remove it."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "state.json"

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning("unreadable lab state {}: {}; cleaning by name prefix", self.path, e)
            return None
        return data if isinstance(data, dict) else None

    def write(self, data: Mapping[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def update(self, change: Any) -> None:
        data = self.read()
        if data is None:
            raise LabNotFound(f"no lab state at {self.path}")
        change(data)
        self.write(data)


class Lab:
    """One lab: a topology made real in network namespaces.  See the module docstring."""

    def __init__(self, topology: Topology, name: str = "default",
                 workdir: str | Path | None = None) -> None:
        check_lab_name(name)
        self.topology = topology
        self.name = name
        self.workdir = Path(workdir) if workdir is not None else default_workdir(name)
        self.plan: LabPlan = plan_lab(topology, name)
        self._state = _State(self.workdir)
        self._children: dict[int, subprocess.Popen[Any]] = {}
        self._holders: dict[str, ProcessRecord] = {}
        self._vms_started = time.monotonic()
        self._api: tuple[Endpoint, Endpoint] | None = None
        self._api_port = 6443
        self.kernel_nodes: frozenset[str] = frozenset(
            n.name for site in topology.sites for n in site.nodes if n.engine == "kernel")
        """Nodes that run as qemu guests (``engine: kernel``, see :mod:`wirekube.lab.vm`)."""
        for node in sorted(self.kernel_nodes):
            if self.plan.nodes[node].private:
                raise LabError(f"node {node}: a node with engine: kernel cannot join private networks (yet)")

    # ---------------------------------------------------------------- construction / lookup

    @classmethod
    def attach(cls, name: str = "default", workdir: str | Path | None = None) -> Lab:
        """The lab that is up under this name, rebuilt from its state file."""
        check_lab_name(name)
        workdir = Path(workdir) if workdir is not None else default_workdir(name)
        data = _State(workdir).read()
        if data is None or data.get("phase") != "up":
            raise LabNotFound(f"lab {name!r} is not up (no complete state in {workdir})")
        lab = cls(parse_topology(data["topology"], f"state of lab {name!r}"), name, workdir)
        lab._load_runtime(data)
        return lab

    @staticmethod
    def exists(name: str = "default", workdir: str | Path | None = None) -> bool:
        """Whether a lab of this name left a state file or namespaces (up, or crashed)."""
        workdir = Path(workdir) if workdir is not None else default_workdir(name)
        return (workdir / "state.json").exists() or bool(_lab_namespaces(name))

    def _load_runtime(self, data: Mapping[str, Any]) -> None:
        for raw in data.get("processes", []):
            record = ProcessRecord.from_json(raw)
            if record.role == "holder":
                self._holders[record.target] = record
        if data.get("api"):
            loopback, routed = (_endpoint(text) for text in data["api"])
            self._api = (loopback, routed)

    # ---------------------------------------------------------------- information

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        return self.plan.nodes

    def node(self, name: str) -> NodeInfo:
        return self.plan.nodes[name]

    @property
    def routers(self) -> Mapping[str, RouterInfo]:
        return self.plan.routers

    @property
    def hosts(self) -> Mapping[str, HostInfo]:
        return self.plan.hosts

    @property
    def pods(self) -> Mapping[str, PodInfo]:
        return self.plan.pods

    @property
    def relay(self) -> Endpoint:
        return self.plan.relay

    @property
    def stun(self) -> tuple[Endpoint, ...]:
        return self.plan.stun

    @property
    def api_address(self) -> ipaddress.IPv4Address:
        """The routed management address of the API server, known before :meth:`forward_api`
        (give it to the API server certificate as an IP SAN)."""
        return self.plan.api_address

    @property
    def api_endpoint(self) -> Endpoint | None:
        """Where a node's kubeconfig points (127.0.0.1:PORT inside the node), once
        :meth:`forward_api` ran (else None)."""
        return self._api[0] if self._api else None

    @property
    def api_routed_endpoint(self) -> Endpoint | None:
        """The same API server at a routed address over each node's ``mgmt`` link
        (10.254.0.1:PORT by default); its certificate needs that IP as a SAN."""
        return self._api[1] if self._api else None

    def nat_by_site(self) -> dict[str, NatKind]:
        return self.topology.nat_by_site()

    def targets(self) -> list[str]:
        return sorted(self.plan.targets)

    def netns(self, target: str) -> str:
        return self.plan.netns(target)

    def holder_pid(self, node: str) -> int:
        return self._holder(node).pid

    @property
    def log_dir(self) -> Path:
        """Where process logs go by default (``<workdir>/logs``)."""
        return self.workdir / "logs"

    @property
    def _private_dir(self) -> Path:
        return self.workdir / PRIVATE_DIR

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: every address, NAT kind and exec target."""
        return {
            "lab": self.name,
            "workdir": str(self.workdir),
            "relay": str(self.relay),
            "stun": [str(s) for s in self.stun],
            "api": [str(e) for e in self._api] if self._api else None,
            "nodes": [
                {"name": n.name, "site": n.site, "nat": n.nat.value, "netns": n.netns,
                 "lanIP": str(n.lan_ip), "publicIP": str(n.public_ip),
                 "mgmtIP": str(n.mgmt_ip),
                 "engine": "kernel" if n.name in self.kernel_nodes else "userspace",
                 "private": {k: str(v) for k, v in n.private.items()},
                 "podCIDR": str(n.pod_cidr) if n.pod_cidr else None,
                 "pods": {p.name: str(p.address) for p in n.pods}}
                for n in self.nodes.values()
            ],
            "routers": [
                {"name": r.name, "site": r.site, "nat": r.nat.value, "wanIP": str(r.wan_ip),
                 "lan": str(r.lan)}
                for r in self.routers.values()
            ],
            "hosts": [{"name": h.name, "network": h.network, "address": str(h.address)}
                      for h in self.hosts.values()],
        }

    # ---------------------------------------------------------------- up / down

    def up(self, api_target: tuple[str, int] | None = None, api_port: int = 6443, *,
           wait_vms: bool = True) -> Lab:
        """Create everything (after removing any leftovers of this lab); returns ``self``.

        On failure everything created so far is removed again before the error is raised.
        ``wait_vms=False`` returns while kernel nodes' guests still boot (TCG: a minute or
        more), so the caller can do other work meanwhile; it must then call :meth:`wait_vms`.
        """
        started = time.monotonic()
        self._api_port = api_port
        with _locked(self.workdir):
            if Lab.exists(self.name, self.workdir):
                logger.warning("lab {}: removing what an earlier run left behind", self.name)
            _cleanup(self.name, self.workdir, keep_logs=False, remove_workdir=False)
            try:
                self._build()
                if wait_vms:
                    self.wait_vms()
                if api_target is not None:
                    self._forward_api_locked(api_target, api_port)
                self._state.update(lambda d: d.__setitem__("phase", "up"))
            except BaseException:
                logger.error("lab {} failed to come up; removing what was made", self.name)
                _cleanup(self.name, self.workdir, keep_logs=True, remove_workdir=False,
                         children=self._children)
                raise
        logger.info("lab {} up in {:.2f} s: {} namespaces, {} nodes", self.name,
                    time.monotonic() - started, len(self.plan.namespaces), len(self.nodes))
        return self

    def down(self, keep_logs: bool = False) -> None:
        """Remove every namespace, link, process and file of this lab.  Safe to repeat."""
        with _locked(self.workdir):
            _cleanup(self.name, self.workdir, keep_logs=keep_logs, children=self._children)
        self._holders.clear()
        self._api = None

    @staticmethod
    def destroy(name: str = "default", workdir: str | Path | None = None,
                keep_logs: bool = False) -> None:
        """Remove a lab by name, without knowing its topology (crash recovery, CLI `down`)."""
        check_lab_name(name)
        path = Path(workdir) if workdir is not None else default_workdir(name)
        with _locked(path):
            _cleanup(name, path, keep_logs=keep_logs)

    def _build(self) -> None:
        plan = self.plan
        (self._private_dir).mkdir(parents=True, exist_ok=True)
        self._state.write({
            "version": STATE_VERSION,
            "lab": self.name,
            "phase": "building",
            "topology": self.topology.to_dict(),
            "namespaces": [n.netns for n in plan.namespaces],
            "processes": [],
        })
        for namespace in plan.namespaces:
            run(["ip", "netns", "add", namespace.netns])
        for veth in plan.veths:
            run(["ip", "-n", veth.netns_a, "link", "add", "name", veth.ifname_a, "type", "veth",
                 "peer", "name", veth.ifname_b, "netns", veth.netns_b])
        for phase in ("links", "routes"):
            for namespace in plan.namespaces:
                lines = getattr(namespace, phase)
                if lines:
                    run(["ip", "-n", namespace.netns, "-batch", "-"], input="\n".join(lines) + "\n")
        for namespace in plan.namespaces:
            enter = ["nsenter", f"--net={NETNS_DIR / namespace.netns}"]
            if namespace.sysctls:
                run(enter + ["sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in namespace.sysctls])
            if namespace.nft:
                run(enter + ["nft", "-f", "-"], input=namespace.nft)
        if self.kernel_nodes:
            logger.info("lab {}: byte-compiled the guests' sources in {:.1f} s", self.name, vm.precompile_sources())
        for node in sorted(self.kernel_nodes):  # the VM's shell: bridges to its taps
            info = self.plan.nodes[node]
            run(["ip", "-n", info.netns, "-batch", "-"],
                input="\n".join(vm.shell_links(info.interfaces["lan"], info.interfaces["mgmt"])) + "\n")
        self._vms_started = time.monotonic()
        self._start_holders()
        self._wait_links_up()

    def wait_vms(self) -> None:
        """Wait until every kernel node's guest runs commands (seconds since qemu started go to
        the state file as ``vmBootSeconds``); at once when there are none."""
        if not self.kernel_nodes:
            return
        booted = vm.wait_ready(self.plan.mgmt_netns, [self.vm_config(n) for n in sorted(self.kernel_nodes)],
                               lambda n: n in self._holders and procs.is_alive(self._holders[n]),
                               console=self.console_log, started=self._vms_started)
        logger.info("lab {}: VMs ready after {}", self.name, ", ".join(f"{n} {t:.1f} s" for n, t in booted.items()))
        self._state.update(lambda d: d.__setitem__("vmBootSeconds", booted))

    # ---------------------------------------------------------------- kernel nodes (qemu guests)

    def vm_config(self, node: str) -> vm.GuestConfig:
        """What the guest of kernel node ``node`` is told (deterministic: rebuilt on attach)."""
        info = self.plan.nodes[node]
        sysctls = next(ns.sysctls for ns in self.plan.namespaces if ns.key == node)
        return vm.GuestConfig(
            node=node, lan_address=f"{info.lan_ip}/{info.lan.prefixlen}", gateway=str(info.lan_gateway),
            mgmt_address=f"{info.mgmt_ip}/32", api_address=str(self.plan.api_address), api_port=self._api_port,
            lan_mac=vm.mac_for(self.name, node, "lan"), mgmt_mac=vm.mac_for(self.name, node, "mgmt"),
            token_file=str(vm.token_path(self._private_dir, node)), modules_dir=str(vm.guest_pieces().modules),
            sysctls=tuple(sysctls))

    def console_log(self, node: str) -> Path:
        """Where a kernel node's serial console (kernel, init and guest service) is logged."""
        return self.log_dir / f"console-{node}.log"

    def _start_vm(self, node: str) -> None:
        """qemu in the node's namespace, in the foreground: the node's holder (ended by PID)."""
        pieces = vm.guest_pieces()
        config = self.vm_config(node)
        config_path = vm.write_guest_files(self._private_dir, config)
        argv = ["ip", "netns", "exec", self.plan.nodes[node].netns,
                *vm.qemu_argv(pieces, config, config_path, self.workdir)]
        popen = self._popen(argv, self.console_log(node), role="holder", target=node)
        self._holders[node] = procs.record_for(popen, "holder", node, argv, str(self.console_log(node)))

    def _wait_links_up(self) -> None:
        """Wait until every link is operationally up: the kernel activates a new link's queue
        asynchronously (linkwatch), and drops what is sent before that."""
        pending = {n.netns for n in self.plan.namespaces}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for netns in sorted(pending):
                out = run(["ip", "-n", netns, "-o", "link", "show"]).stdout
                states = [line.split(" state ", 1)[1].split()[0] for line in out.splitlines()
                          if " state " in line and ": lo:" not in line]
                if all(state == "UP" for state in states):
                    pending.discard(netns)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LabError(f"links not up after {READY_TIMEOUT_S} s in: {sorted(pending)}")
            time.sleep(procs.POLL_S)

    def _start_holders(self) -> None:
        WIREGUARD_RUN.mkdir(parents=True, exist_ok=True)
        pending: dict[str, tuple[subprocess.Popen[Any], Path]] = {}
        script = ('mount -t tmpfs -o mode=0755,size=4m wirekube-lab /run/wireguard && '
                  'echo "$$" > "$1" && exec sleep infinity')
        for node in self.plan.nodes.values():
            if node.name in self.kernel_nodes:
                self._start_vm(node.name)
                continue
            ready = self._private_dir / f"holder-{node.name}"
            ready.unlink(missing_ok=True)
            argv = ["ip", "netns", "exec", node.netns, "unshare", "--mount",
                    "--propagation", "private", "--", "sh", "-c", script, "holder", str(ready)]
            log = self._private_dir / "holders.log"
            with open(log, "a") as log_file:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log_file,
                                         start_new_session=True)
            self._children[popen.pid] = popen
            record = procs.record_for(popen, "holder", node.name, argv, str(log))
            self._holders[node.name] = record
            self._add_process(record)
            pending[node.name] = (popen, ready)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while pending:
            for name, (popen, ready) in list(pending.items()):
                if ready.exists() and ready.read_text().strip() == str(popen.pid):
                    del pending[name]
                elif popen.poll() is not None:
                    raise LabError(f"the namespace holder of node {name} exited with "
                                   f"{popen.returncode}; see {self._private_dir / 'holders.log'}")
            if pending and time.monotonic() > deadline:
                raise LabError(f"namespace holders not ready after {READY_TIMEOUT_S} s: "
                               f"{', '.join(pending)}")
            if pending:
                time.sleep(procs.POLL_S)

    def _add_process(self, record: ProcessRecord) -> None:
        self._state.update(lambda d: d["processes"].append(record.to_json()))

    # ---------------------------------------------------------------- management path

    def forward_api(self, target: tuple[str, int], port: int = 6443) -> Endpoint:
        """Make the API server at ``target`` (on the host's loopback) reachable from every node,
        at ``127.0.0.1:port`` inside the node and at ``API_ADDRESS:port`` over its ``mgmt``
        link; returns the loopback endpoint (see :attr:`api_routed_endpoint` for the other)."""
        with _locked(self.workdir):
            return self._forward_api_locked(target, port)

    def _forward_api_locked(self, target: tuple[str, int], port: int) -> Endpoint:
        if not ipaddress.ip_address(target[0]).is_loopback:
            raise LabError(f"API target {target[0]} is not a loopback address; the management "
                           "path only reaches the host's loopback")
        loopback = Endpoint(ipaddress.IPv4Address("127.0.0.1"), port)
        routed = Endpoint(self.plan.api_address, port)
        node_netns = [n.netns for n in self.plan.nodes.values()]
        for listen, namespaces in ((loopback, node_netns), (routed, [self.plan.mgmt_netns])):
            argv = [sys.executable, "-m", "wirekube.lab.apiproxy",
                    "--target", f"{target[0]}:{target[1]}", "--listen", str(listen), *namespaces]
            log = self.log_dir / f"apiproxy-{listen.host}-{listen.port}.log"
            popen = self._popen(argv, log, role="apiproxy", target="", stdout_pipe=True)
            self._wait_ready_line(popen, log)
        self._api = (loopback, routed)
        self._state.update(lambda d: d.__setitem__("api", [str(loopback), str(routed)]))
        return loopback

    @staticmethod
    def _wait_ready_line(popen: subprocess.Popen[Any], log: Path) -> None:
        """Wait for the "ready" line a proxy prints once it listens."""
        assert popen.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        buffered = b""
        fd = popen.stdout.fileno()
        while b"ready" not in buffered:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"the API proxy was not ready in {READY_TIMEOUT_S} s; see {log}")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    popen.wait()
                    raise LabError(f"the API proxy exited with {popen.returncode}; see {log}")
                buffered += chunk

    # ---------------------------------------------------------------- impairments

    def cut(self, site: str, proto: str = "udp", peer: str | None = None) -> None:
        """Drop ``proto`` (udp, tcp, icmp or all) crossing ``site``'s router, in both
        directions, only to and from ``peer`` (an address) if given, until :meth:`restore`.
        Conntrack entries stay, so traffic resumes on the same NAT mappings afterwards."""
        if peer is not None:
            ipaddress.IPv4Address(peer)
        rules = nat.cut_rules(proto, peer)
        self.exec(self.routers[site].name, ["nft", "-f", "-"], input=rules, check=True)

    def restore(self, site: str) -> None:
        """Remove every :meth:`cut` of ``site``'s router."""
        self.exec(self.routers[site].name,
                  ["nft", "flush", "chain", "ip", nat.TABLE, nat.IMPAIR_CHAIN], check=True)

    def set_wan_mtu(self, site: str, mtu: int) -> None:
        """Change the MTU of ``site``'s WAN link while the lab runs (a path change): the router's
        end, and the internet's end too unless the site has ``blockICMP`` (see
        :class:`~wirekube.lab.topology.Site`)."""
        if not MIN_WAN_MTU <= mtu <= DEFAULT_WAN_MTU:
            raise LabError(f"wanMTU {mtu}: must be from {MIN_WAN_MTU} to {DEFAULT_WAN_MTU}")
        router = self.routers[site]
        self.exec(router.name, ["ip", "link", "set", "dev", IF_WAN, "mtu", str(mtu)], check=True)
        if not next(s for s in self.plan.topology.sites if s.name == site).block_icmp:
            inet_if = next(v.ifname_a for v in self.plan.veths if v.netns_b == router.netns and v.ifname_b == IF_WAN)
            self.exec(INTERNET, ["ip", "link", "set", "dev", inet_if, "mtu", str(mtu)], check=True)

    # ---------------------------------------------------------------- running things

    def _holder(self, node: str) -> ProcessRecord:
        if node not in self.plan.nodes:
            raise KeyError(f"{node!r} is not a node of lab {self.name!r}")
        record = self._holders.get(node)
        if record is None or not procs.is_alive(record):
            raise LabError(f"the namespace holder of node {node} is not running; is the lab up?")
        return record

    def command(self, target: str, argv: Sequence[str]) -> list[str]:
        """The full argv that runs ``argv`` inside ``target``'s namespaces."""
        if target in self.kernel_nodes:
            self._holder(target)
            return vm.client_argv(self.plan.mgmt_netns, self.vm_config(target), argv)
        if target in self.plan.nodes:
            holder = self._holder(target)
            return ["nsenter", "-t", str(holder.pid), "-m", "-n", "--", *argv]
        return ["ip", "netns", "exec", self.plan.netns(target), *argv]

    def exec(self, target: str, argv: Sequence[str], *, timeout: float = 60.0,
             input: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command inside a node, router (SITE-router), the internet, a host or a pod,
        wait for it (killing its process group at ``timeout``) and return its output."""
        full = self.command(target, argv)
        popen = subprocess.Popen(full, stdin=subprocess.PIPE if input is not None else
                                 subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = popen.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
            raise LabError(f"timed out after {timeout} s in {target}", full, err) from None
        result = subprocess.CompletedProcess(full, popen.returncode, out, err)
        if check and result.returncode != 0:
            raise LabError(f"exit code {result.returncode} in {target}", full, err)
        return result

    def spawn(self, target: str, argv: Sequence[str], log_path: str | Path | None = None, *,
              env: Mapping[str, str] | None = None, pipe: bool = False) -> subprocess.Popen[Any]:
        """Start a supervised long-running process inside ``target``; returns its Popen.

        stdout and stderr go to ``log_path`` (default ``<workdir>/logs/<target>.<prog>.log``,
        appended); with ``pipe=True`` stdin and stdout are text pipes instead (stderr still to
        the log).  The process leads its own session and is recorded for :meth:`stop`/`down`.
        """
        full = self.command(target, argv)
        log = Path(log_path) if log_path else self.log_dir / f"{target}.{Path(argv[0]).name}.log"
        with _locked(self.workdir):
            return self._popen(full, log, role="spawn", target=target, env=env,
                               stdin_pipe=pipe, stdout_pipe=pipe, text=pipe)

    def spawn_on_host(self, argv: Sequence[str], log_path: str | Path | None = None, *,
                      env: Mapping[str, str] | None = None) -> subprocess.Popen[Any]:
        """Start a supervised process in the host's own namespaces (a controller that only talks to
        the API server on the host's loopback); recorded and ended by PID like every other."""
        log = Path(log_path) if log_path else self.log_dir / f"host.{Path(argv[0]).name}.log"
        with _locked(self.workdir):
            return self._popen(list(argv), log, role="spawn", target="", env=env)

    def spawn_in_node(self, node: str, argv: Sequence[str], log_path: str | Path | None = None,
                      **kwargs: Any) -> subprocess.Popen[Any]:
        self._holder(node)
        return self.spawn(node, argv, log_path, **kwargs)

    def _popen(self, argv: Sequence[str], log: Path, *, role: str, target: str,
               env: Mapping[str, str] | None = None, stdin_pipe: bool = False,
               stdout_pipe: bool = False, text: bool = False) -> subprocess.Popen[Any]:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file: IO[str]
        with open(log, "a") as log_file:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log_file,
                stderr=log_file,
                text=text,
                bufsize=1 if text else -1,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self._children[popen.pid] = popen
        record = procs.record_for(popen, role, target, argv, str(log))

        def add(data: dict[str, Any]) -> None:
            data["processes"].append(record.to_json())
            if str(log) not in data.setdefault("logs", []):
                data["logs"].append(str(log))

        self._state.update(add)
        return popen

    def stop(self, proc: subprocess.Popen[Any] | int, grace: float = 3.0) -> int | None:
        """End one process this lab started (SIGTERM to its group, SIGKILL after ``grace``);
        returns its exit code when it was our child."""
        pid = proc if isinstance(proc, int) else proc.pid
        with _locked(self.workdir):
            data = self._state.read() or {"processes": []}
            records = [ProcessRecord.from_json(r) for r in data.get("processes", [])]
            mine = [r for r in records if r.pid == pid]
            if not mine:
                raise LabError(f"pid {pid} was not started by lab {self.name}")
            procs.terminate(mine, grace, self._children)
            data["processes"] = [r.to_json() for r in records if r.pid != pid]
            if self._state.read() is not None:
                self._state.write(data)
        popen = self._children.pop(pid, None)
        return popen.wait() if popen is not None else None


# -------------------------------------------------------------------- cleanup


def _lab_namespaces(name: str) -> list[str]:
    prefix = netns_prefix(name)
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _cleanup(name: str, workdir: Path, *, keep_logs: bool, remove_workdir: bool = True,
             children: Mapping[int, subprocess.Popen[Any]] | None = None) -> None:
    """Remove what lab ``name`` made, from its state file and the namespace prefix."""
    state = _State(workdir)
    data = state.read() if workdir.exists() else None
    records = [ProcessRecord.from_json(r) for r in (data or {}).get("processes", [])]
    # Workloads first (they may use the management path or the holders), holders last.
    order = {"spawn": 0, "apiproxy": 1, "holder": 2}
    for role in sorted({r.role for r in records}, key=lambda r: order.get(r, 0)):
        procs.terminate([r for r in records if r.role == role], children=children)

    namespaces = sorted(set((data or {}).get("namespaces", [])) | set(_lab_namespaces(name)))
    namespaces = [n for n in namespaces if n.startswith(netns_prefix(name))]
    inodes = set()
    for netns in namespaces:
        with contextlib.suppress(FileNotFoundError):
            inodes.add(os.stat(NETNS_DIR / netns).st_ino)
    strays = []
    for pid in procs.pids_in_netns(inodes) if inodes else []:
        started = procs.start_time(pid)
        if started is not None:
            comm = Path(f"/proc/{pid}/comm").read_text().strip() if os.path.exists(
                f"/proc/{pid}/comm") else "?"
            logger.warning("lab {}: ending pid {} ({}) still running inside its namespaces",
                           name, pid, comm)
            strays.append(ProcessRecord(pid, started, "stray", "", (comm,)))
    procs.terminate(strays, children=children)
    for netns in namespaces:
        result = run(["ip", "netns", "delete", netns], check=False)
        if result.returncode != 0 and (NETNS_DIR / netns).exists():
            raise LabError(f"could not delete namespace {netns}", ["ip", "netns", "delete", netns],
                           result.stderr)

    if not workdir.exists():
        return
    state.path.unlink(missing_ok=True)
    state.path.with_name(state.path.name + ".tmp").unlink(missing_ok=True)
    shutil.rmtree(workdir / PRIVATE_DIR, ignore_errors=True)
    legacy = workdir / "run"  # where the first version kept the holders' files
    for path in [*legacy.glob("holder-*"), legacy / "holders.log"]:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        legacy.rmdir()
    if not keep_logs:
        # Only logs of processes this lab started, and only inside the workdir: the workdir may
        # be shared (the orchestrator keeps its own files there), and a log path elsewhere was
        # the caller's choice.
        logs_dir = workdir / "logs"
        for log in (data or {}).get("logs", []):
            path = Path(log)
            if path.parent == logs_dir:
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            logs_dir.rmdir()
    if remove_workdir:
        with contextlib.suppress(OSError):
            workdir.rmdir()  # only if empty: never remove files the lab did not make
        if workdir.parent == DEFAULT_ROOT:
            with contextlib.suppress(OSError):
                DEFAULT_ROOT.rmdir()
    if data is not None or namespaces:
        logger.info("lab {}: removed {} namespaces and {} processes", name, len(namespaces),
                    sum(1 for r in records) + len(strays))
