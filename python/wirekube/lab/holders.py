"""The process that holds each node's namespaces while the lab runs.

A userspace node's holder is ``ip netns exec NODE unshare --mount --propagation private`` with a
tmpfs on ``/run/wireguard``, then ``sleep infinity``: ``exec``/``spawn`` in the node enter it
(``nsenter -t HOLDER -m -n``), so each node's wireguard-go has its own ``/run/wireguard``.  A kernel
node's holder is its qemu guest (:mod:`wirekube.lab.vm`), in the foreground in the node's namespace.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from loguru import logger

from wirekube.lab import procs, vm
from wirekube.lab.netbase import PRIVATE_DIR, READY_TIMEOUT_S, WIREGUARD_RUN, LabError
from wirekube.lab.plan import LabPlan
from wirekube.lab.procs import ProcessRecord
from wirekube.lab.supervisor import Supervisor


class Holders:
    """Starts the holders (recorded through the supervisor) and knows them by node (``records``);
    also what each kernel node's guest is told and where its console is logged."""

    def __init__(self, plan: LabPlan, workdir: Path, kernel_nodes: frozenset[str],
                 supervisor: Supervisor) -> None:
        self.plan = plan
        self.workdir = workdir
        self.kernel_nodes = kernel_nodes
        self.supervisor = supervisor
        self.records: dict[str, ProcessRecord] = {}
        self.api_port = 6443
        """The API server's port that guests are told (``Lab.up``'s ``api_port``)."""
        self.vms_started = time.monotonic()

    @property
    def private_dir(self) -> Path:
        return self.workdir / PRIVATE_DIR

    def get(self, node: str) -> ProcessRecord:
        """The running holder of ``node``; KeyError for a name that is no node, LabError when its
        holder is not running."""
        if node not in self.plan.nodes:
            raise KeyError(f"{node!r} is not a node of lab {self.plan.lab!r}")
        record = self.records.get(node)
        if record is None or not procs.is_alive(record):
            raise LabError(f"the namespace holder of node {node} is not running; is the lab up?")
        return record

    def start(self) -> None:
        """Start every node's holder (a guest for kernel nodes) and wait for the userspace ones to
        have mounted their tmpfs."""
        WIREGUARD_RUN.mkdir(parents=True, exist_ok=True)
        pending: dict[str, tuple[subprocess.Popen[Any], Path]] = {}
        script = ('mount -t tmpfs -o mode=0755,size=4m wirekube-lab /run/wireguard && '
                  'echo "$$" > "$1" && exec sleep infinity')
        for node in self.plan.nodes.values():
            if node.name in self.kernel_nodes:
                self.start_vm(node.name)
                continue
            ready = self.private_dir / f"holder-{node.name}"
            ready.unlink(missing_ok=True)
            argv = ["ip", "netns", "exec", node.netns, "unshare", "--mount",
                    "--propagation", "private", "--", "sh", "-c", script, "holder", str(ready)]
            log = self.private_dir / "holders.log"
            with open(log, "a") as log_file:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log_file,
                                         start_new_session=True)
            self.supervisor.children[popen.pid] = popen
            record = procs.record_for(popen, "holder", node.name, argv, str(log))
            self.records[node.name] = record
            self.supervisor.add_process(record)
            pending[node.name] = (popen, ready)
        self._wait_ready(pending)

    def _wait_ready(self, pending: dict[str, tuple[subprocess.Popen[Any], Path]]) -> None:
        """Wait until each holder wrote its PID to its ready file."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while pending:
            for name, (popen, ready) in list(pending.items()):
                if ready.exists() and ready.read_text().strip() == str(popen.pid):
                    del pending[name]
                elif popen.poll() is not None:
                    raise LabError(f"the namespace holder of node {name} exited with "
                                   f"{popen.returncode}; see {self.private_dir / 'holders.log'}")
            if pending and time.monotonic() > deadline:
                raise LabError(f"namespace holders not ready after {READY_TIMEOUT_S} s: "
                               f"{', '.join(pending)}")
            if pending:
                time.sleep(procs.POLL_S)

    # ---------------------------------------------------------------- kernel nodes (qemu guests)

    def wait_vms(self) -> None:
        """Wait until every kernel node's guest runs commands (seconds since qemu started go to
        the state file as ``vmBootSeconds``); at once when there are none."""
        if not self.kernel_nodes:
            return
        booted = vm.wait_ready(self.plan.mgmt_netns, [self.vm_config(n) for n in sorted(self.kernel_nodes)],
                               lambda n: n in self.records and procs.is_alive(self.records[n]),
                               console=self.console_log, started=self.vms_started)
        logger.info("lab {}: VMs ready after {}", self.plan.lab, ", ".join(f"{n} {t:.1f} s" for n, t in booted.items()))
        self.supervisor.state.update(lambda d: d.__setitem__("vmBootSeconds", booted))

    def vm_config(self, node: str) -> vm.GuestConfig:
        """What the guest of kernel node ``node`` is told (deterministic: rebuilt on attach)."""
        info = self.plan.nodes[node]
        sysctls = next(ns.sysctls for ns in self.plan.namespaces if ns.key == node)
        lab = self.plan.lab
        return vm.GuestConfig(
            node=node, lan_address=f"{info.lan_ip}/{info.lan.prefixlen}", gateway=str(info.lan_gateway),
            mgmt_address=f"{info.mgmt_ip}/32", api_address=str(self.plan.api_address), api_port=self.api_port,
            lan_mac=vm.mac_for(lab, node, "lan"), mgmt_mac=vm.mac_for(lab, node, "mgmt"),
            token_file=str(vm.token_path(self.private_dir, node)), modules_dir=str(vm.guest_pieces().modules),
            sysctls=tuple(sysctls))

    def console_log(self, node: str) -> Path:
        """Where a kernel node's serial console (kernel, init and guest service) is logged."""
        return self.workdir / "logs" / f"console-{node}.log"

    def start_vm(self, node: str) -> None:
        """qemu in the node's namespace, in the foreground: the node's holder (ended by PID)."""
        pieces = vm.guest_pieces()
        config = self.vm_config(node)
        config_path = vm.write_guest_files(self.private_dir, config)
        argv = ["ip", "netns", "exec", self.plan.nodes[node].netns,
                *vm.qemu_argv(pieces, config, config_path, self.workdir)]
        popen = self.supervisor.popen(argv, self.console_log(node), role="holder", target=node)
        self.records[node] = procs.record_for(popen, "holder", node, argv, str(self.console_log(node)))
