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

Modules: :mod:`~wirekube.lab.plan` plans the network as data, :mod:`~wirekube.lab.netbuild` applies
the plan, :mod:`~wirekube.lab.supervisor` starts, records and stops processes,
:mod:`~wirekube.lab.holders` keeps each node's namespaces (or qemu guest) alive,
:mod:`~wirekube.lab.cleanup` removes a lab, :mod:`~wirekube.lab.netbase` holds what they share (the
state file, the workdir lock, :class:`LabError`), and :class:`~wirekube.lab.labview.LabView` is what
a lab is, read from its plan.  :class:`Lab` coordinates them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from wirekube.lab import nat, netbuild, vm
from wirekube.lab.cleanup import cleanup
from wirekube.lab.holders import Holders
from wirekube.lab.labview import LabView
from wirekube.lab.netbase import (
    DEFAULT_ROOT,
    NETNS_DIR,
    PRIVATE_DIR,
    READY_TIMEOUT_S,
    STATE_VERSION,
    WIREGUARD_RUN,
    LabError,
    LabNotFound,
    LabState,
    default_workdir,
    lab_namespaces,
    locked,
    run,
)
from wirekube.lab.plan import IF_WAN, INTERNET, check_lab_name
from wirekube.lab.procs import ProcessRecord
from wirekube.lab.supervisor import Supervisor, wait_ready_line
from wirekube.lab.topology import DEFAULT_WAN_MTU, MIN_WAN_MTU, Endpoint, Topology, parse_topology

__all__ = [
    "DEFAULT_ROOT",
    "NETNS_DIR",
    "PRIVATE_DIR",
    "READY_TIMEOUT_S",
    "STATE_VERSION",
    "WIREGUARD_RUN",
    "Lab",
    "LabError",
    "LabNotFound",
    "default_workdir",
    "run",
]


def _endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(ipaddress.IPv4Address(host), int(port))


class Lab(LabView):
    """One lab: a topology made real in network namespaces.  See the module docstring.

    What it is (addresses, targets) comes from :class:`~wirekube.lab.labview.LabView`; what it
    does is coordinated here: :mod:`~wirekube.lab.netbuild` creates the network from the plan, a
    :class:`~wirekube.lab.supervisor.Supervisor` starts, records and stops its processes,
    :class:`~wirekube.lab.holders.Holders` keeps each node's namespaces (or guest) alive, and
    :func:`~wirekube.lab.cleanup.cleanup` removes it all again."""

    def __init__(self, topology: Topology, name: str = "default",
                 workdir: str | Path | None = None) -> None:
        super().__init__(topology, name, workdir)
        self._state = LabState(self.workdir)
        self._supervisor = Supervisor(name, self.workdir, self._state)
        self._children = self._supervisor.children
        self._holders = Holders(self.plan, self.workdir, self.kernel_nodes, self._supervisor)
        for node in sorted(self.kernel_nodes):
            if self.plan.nodes[node].private:
                raise LabError(f"node {node}: a node with engine: kernel cannot join private networks (yet)")

    # ---------------------------------------------------------------- construction / lookup

    @classmethod
    def attach(cls, name: str = "default", workdir: str | Path | None = None) -> Lab:
        """The lab that is up under this name, rebuilt from its state file."""
        check_lab_name(name)
        workdir = Path(workdir) if workdir is not None else default_workdir(name)
        data = LabState(workdir).read()
        if data is None or data.get("phase") != "up":
            raise LabNotFound(f"lab {name!r} is not up (no complete state in {workdir})")
        lab = cls(parse_topology(data["topology"], f"state of lab {name!r}"), name, workdir)
        lab._load_runtime(data)
        return lab

    @staticmethod
    def exists(name: str = "default", workdir: str | Path | None = None) -> bool:
        """Whether a lab of this name left a state file or namespaces (up, or crashed)."""
        workdir = Path(workdir) if workdir is not None else default_workdir(name)
        return (workdir / "state.json").exists() or bool(lab_namespaces(name))

    def holder_pid(self, node: str) -> int:
        return self._holders.get(node).pid

    def _load_runtime(self, data: Mapping[str, Any]) -> None:
        for raw in data.get("processes", []):
            record = ProcessRecord.from_json(raw)
            if record.role == "holder":
                self._holders.records[record.target] = record
        if data.get("api"):
            loopback, routed = (_endpoint(text) for text in data["api"])
            self._api = (loopback, routed)

    # ---------------------------------------------------------------- up / down

    def up(self, api_target: tuple[str, int] | None = None, api_port: int = 6443, *,
           wait_vms: bool = True) -> Lab:
        """Create everything (after removing any leftovers of this lab); returns ``self``.

        On failure everything created so far is removed again before the error is raised.
        ``wait_vms=False`` returns while kernel nodes' guests still boot (TCG: a minute or
        more), so the caller can do other work meanwhile; it must then call :meth:`wait_vms`.
        """
        started = time.monotonic()
        self._holders.api_port = api_port
        with locked(self.workdir):
            if Lab.exists(self.name, self.workdir):
                logger.warning("lab {}: removing what an earlier run left behind", self.name)
            cleanup(self.name, self.workdir, keep_logs=False, remove_workdir=False)
            try:
                self._build()
                if wait_vms:
                    self.wait_vms()
                if api_target is not None:
                    self._forward_api_locked(api_target, api_port)
                self._state.update(lambda d: d.__setitem__("phase", "up"))
            except BaseException:
                logger.error("lab {} failed to come up; removing what was made", self.name)
                cleanup(self.name, self.workdir, keep_logs=True, remove_workdir=False,
                        children=self._children)
                raise
        logger.info("lab {} up in {:.2f} s: {} namespaces, {} nodes", self.name,
                    time.monotonic() - started, len(self.plan.namespaces), len(self.nodes))
        return self

    def down(self, keep_logs: bool = False) -> None:
        """Remove every namespace, link, process and file of this lab.  Safe to repeat."""
        with locked(self.workdir):
            cleanup(self.name, self.workdir, keep_logs=keep_logs, children=self._children)
        self._holders.records.clear()
        self._api = None

    @staticmethod
    def destroy(name: str = "default", workdir: str | Path | None = None,
                keep_logs: bool = False) -> None:
        """Remove a lab by name, without knowing its topology (crash recovery, CLI `down`)."""
        check_lab_name(name)
        path = Path(workdir) if workdir is not None else default_workdir(name)
        with locked(path):
            cleanup(name, path, keep_logs=keep_logs)

    def _build(self) -> None:
        plan = self.plan
        (self.workdir / PRIVATE_DIR).mkdir(parents=True, exist_ok=True)
        self._state.write({
            "version": STATE_VERSION,
            "lab": self.name,
            "phase": "building",
            "topology": self.topology.to_dict(),
            "namespaces": [n.netns for n in plan.namespaces],
            "processes": [],
        })
        netbuild.create_network(plan)
        if self.kernel_nodes:
            logger.info("lab {}: byte-compiled the guests' sources in {:.1f} s", self.name, vm.precompile_sources())
        netbuild.add_vm_shells(plan, self.kernel_nodes)
        self._holders.vms_started = time.monotonic()
        self._holders.start()
        netbuild.wait_links_up(plan)

    def wait_vms(self) -> None:
        """Wait until every kernel node's guest runs commands (seconds since qemu started go to
        the state file as ``vmBootSeconds``); at once when there are none."""
        self._holders.wait_vms()

    def vm_config(self, node: str) -> vm.GuestConfig:
        """What the guest of kernel node ``node`` is told (deterministic: rebuilt on attach)."""
        return self._holders.vm_config(node)

    def console_log(self, node: str) -> Path:
        """Where a kernel node's serial console (kernel, init and guest service) is logged."""
        return self._holders.console_log(node)

    # ---------------------------------------------------------------- management path

    def forward_api(self, target: tuple[str, int], port: int = 6443) -> Endpoint:
        """Make the API server at ``target`` (on the host's loopback) reachable from every node,
        at ``127.0.0.1:port`` inside the node and at ``API_ADDRESS:port`` over its ``mgmt``
        link; returns the loopback endpoint (see :attr:`api_routed_endpoint` for the other)."""
        with locked(self.workdir):
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
            popen = self._supervisor.popen(argv, log, role="apiproxy", target="", stdout_pipe=True)
            wait_ready_line(popen, log)
        self._api = (loopback, routed)
        self._state.update(lambda d: d.__setitem__("api", [str(loopback), str(routed)]))
        return loopback

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

    def command(self, target: str, argv: Sequence[str]) -> list[str]:
        """The full argv that runs ``argv`` inside ``target``'s namespaces."""
        if target in self.kernel_nodes:
            self._holders.get(target)
            return vm.client_argv(self.plan.mgmt_netns, self.vm_config(target), argv)
        if target in self.plan.nodes:
            holder = self._holders.get(target)
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
        with locked(self.workdir):
            return self._supervisor.popen(full, log, role="spawn", target=target, env=env,
                                          stdin_pipe=pipe, stdout_pipe=pipe, text=pipe)

    def spawn_on_host(self, argv: Sequence[str], log_path: str | Path | None = None, *,
                      env: Mapping[str, str] | None = None) -> subprocess.Popen[Any]:
        """Start a supervised process in the host's own namespaces (a controller that only talks to
        the API server on the host's loopback); recorded and ended by PID like every other."""
        log = Path(log_path) if log_path else self.log_dir / f"host.{Path(argv[0]).name}.log"
        with locked(self.workdir):
            return self._supervisor.popen(list(argv), log, role="spawn", target="", env=env)

    def spawn_in_node(self, node: str, argv: Sequence[str], log_path: str | Path | None = None,
                      **kwargs: Any) -> subprocess.Popen[Any]:
        self._holders.get(node)
        return self.spawn(node, argv, log_path, **kwargs)

    def stop(self, proc: subprocess.Popen[Any] | int, grace: float = 3.0) -> int | None:
        """End one process this lab started (SIGTERM to its group, SIGKILL after ``grace``);
        returns its exit code when it was our child."""
        return self._supervisor.stop(proc, grace)
