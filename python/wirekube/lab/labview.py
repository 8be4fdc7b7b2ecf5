"""What a planned lab is, read from its :class:`~wirekube.lab.plan.LabPlan`: nodes, routers, hosts,
pods, the relay and STUN endpoints, the API endpoints once forwarded, exec targets.  No side
effects; :class:`wirekube.lab.net.Lab` adds what a lab does."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wirekube.lab.netbase import default_workdir
from wirekube.lab.plan import HostInfo, LabPlan, NodeInfo, PodInfo, RouterInfo, check_lab_name, plan_lab
from wirekube.lab.topology import Endpoint, NatKind, Topology


class LabView:
    """A lab's plan and the facts read from it (see :mod:`wirekube.lab.net` for the API)."""

    def __init__(self, topology: Topology, name: str = "default",
                 workdir: str | Path | None = None) -> None:
        check_lab_name(name)
        self.topology = topology
        self.name = name
        self.workdir = Path(workdir) if workdir is not None else default_workdir(name)
        self.plan: LabPlan = plan_lab(topology, name)
        self._api: tuple[Endpoint, Endpoint] | None = None
        self.kernel_nodes: frozenset[str] = frozenset(
            n.name for site in topology.sites for n in site.nodes if n.engine == "kernel")
        """Nodes that run as qemu guests (``engine: kernel``, see :mod:`wirekube.lab.vm`)."""

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

    @property
    def log_dir(self) -> Path:
        """Where process logs go by default (``<workdir>/logs``)."""
        return self.workdir / "logs"

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
