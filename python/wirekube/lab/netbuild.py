"""Applying a :class:`~wirekube.lab.plan.LabPlan`: namespaces, veths, addresses, routes, sysctls and
nftables rule sets, in the order the plan gives, with ``ip``, ``sysctl`` and ``nft`` commands.

Creates only what the plan names (every namespace ``wkl-<lab>.<key>``); removing it again is
:mod:`wirekube.lab.cleanup`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from wirekube.lab import procs, vm
from wirekube.lab.netbase import NETNS_DIR, READY_TIMEOUT_S, LabError, run
from wirekube.lab.plan import LabPlan


def create_network(plan: LabPlan) -> None:
    """Every namespace, then every veth, then each namespace's links and (once all have their
    links) its routes, then sysctls and rule sets."""
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


def add_vm_shells(plan: LabPlan, kernel_nodes: Iterable[str]) -> None:
    """In each kernel node's namespace, the VM's shell: bridges to its taps."""
    for node in sorted(kernel_nodes):
        info = plan.nodes[node]
        run(["ip", "-n", info.netns, "-batch", "-"],
            input="\n".join(vm.shell_links(info.interfaces["lan"], info.interfaces["mgmt"])) + "\n")


def wait_links_up(plan: LabPlan) -> None:
    """Wait until every link is operationally up: the kernel activates a new link's queue
    asynchronously (linkwatch), and drops what is sent before that."""
    pending = {n.netns for n in plan.namespaces}
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
