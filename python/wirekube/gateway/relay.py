"""Relay endpoint discovery: where agents can reach the relay.  Pure (works on Service/Node dicts).

For relay provider ``managed`` the address comes from the relay's Service, so that nobody has to
copy a LoadBalancer address into the mesh by hand:

* ``LoadBalancer``: every ``status.loadBalancer.ingress`` entry (``ip``, else ``hostname``) and
  every ``spec.externalIPs`` entry, with the Service port;
* ``NodePort``: every Ready node's address (ExternalIP preferred, else InternalIP) with the node
  port, nodes with an ExternalIP first (they are the ones reachable from outside), then by name;
  with ``externalIPs``, those come first with the Service port;
* ``ClusterIP`` with ``externalIPs``: those; without: nothing (a ClusterIP is not reachable
  from a node whose CNI is not up yet, or from outside the cluster).

The Service port is the one named ``relay``, else the one equal to the mesh's
``relay.managed.port``, else the first TCP port.  For provider ``external`` the endpoint is
``spec.relay.external.endpoint``, published too so agents read one place.  At most
:data:`MAX_ENDPOINTS` endpoints are published (the CRD's limit).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wirekube.models import HostPort, Mesh, RelayProvider

MAX_ENDPOINTS = 16


@dataclass(frozen=True)
class RelayDiscovery:
    endpoints: tuple[HostPort, ...]
    source: str
    reason: str  # CamelCase condition reason
    message: str

    @property
    def ready(self) -> bool:
        return bool(self.endpoints)


def discover_relay(
    mesh: Mesh,
    service: Mapping[str, Any] | None,
    nodes: Iterable[Mapping[str, Any]],
    namespace: str,
    name: str,
) -> RelayDiscovery:
    """The relay endpoints to publish in WireKubeMesh ``status.relay.endpoints``."""
    relay = mesh.spec.relay
    if relay.provider is RelayProvider.EXTERNAL and relay.external_endpoint is not None:
        ep = relay.external_endpoint
        return RelayDiscovery((ep,), "external", "External", f"relay.external.endpoint {ep}")
    where = f"{namespace}/{name}"
    if service is None:
        return RelayDiscovery((), "", "ServiceNotFound", f"relay Service {where} does not exist")
    port = relay_port(service, relay.managed_port)
    if port is None:
        return RelayDiscovery((), "", "NoServicePort", f"relay Service {where} has no TCP port")
    spec = service.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    external = [HostPort(str(ip), int(port["port"])) for ip in spec.get("externalIPs") or []]
    if kind == "LoadBalancer":
        return _load_balancer(service, int(port["port"]), external, where)
    if kind == "NodePort":
        return _node_port(port, nodes, external, where)
    if external:
        return _found(external, f"ExternalIPs {where}", "ExternalIPs")
    return RelayDiscovery((), "", "ServiceNotExposed", f"relay Service {where} is of type {kind}: "
                          "make it LoadBalancer or NodePort, or use relay provider external")


def relay_port(service: Mapping[str, Any], managed_port: int) -> Mapping[str, Any] | None:
    ports = [p for p in (service.get("spec") or {}).get("ports") or [] if (p.get("protocol") or "TCP") == "TCP"]
    for pick in (lambda p: p.get("name") == "relay", lambda p: p.get("port") == managed_port, lambda p: True):
        found: Mapping[str, Any] | None = next((p for p in ports if pick(p)), None)
        if found is not None:
            return found
    return None


def _load_balancer(service: Mapping[str, Any], port: int, external: list[HostPort], where: str) -> RelayDiscovery:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    found = [HostPort(str(i.get("ip") or i.get("hostname")), port) for i in ingress if i.get("ip") or i.get("hostname")]
    if not found and not external:
        return RelayDiscovery((), "", "LoadBalancerPending",
                              f"relay Service {where} has no load balancer ingress address yet")
    return _found([*found, *external], f"LoadBalancer {where}", "LoadBalancer")


def _node_port(
    port: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]], external: list[HostPort], where: str
) -> RelayDiscovery:
    node_port = port.get("nodePort")
    if not node_port:
        return RelayDiscovery((), "", "NodePortPending", f"relay Service {where} has no node port allocated yet")
    ranked = sorted(
        (not is_external, node_name, address)
        for node in nodes
        if _node_ready(node)
        for node_name, address, is_external in [_node_address(node)]
        if address
    )
    found = [*external, *(HostPort(address, int(node_port)) for _, _, address in ranked)]
    if not found:
        return RelayDiscovery((), "", "NoNodeAddresses", f"relay Service {where} is a NodePort, but no Ready node "
                              "has an address")
    return _found(found, f"NodePort {where}", "NodePort")


def _node_address(node: Mapping[str, Any]) -> tuple[str, str, bool]:
    name = str((node.get("metadata") or {}).get("name", ""))
    addresses = (node.get("status") or {}).get("addresses") or []
    for kind in ("ExternalIP", "InternalIP"):
        hit = next((a.get("address") for a in addresses if a.get("type") == kind and a.get("address")), None)
        if hit:
            return name, str(hit), kind == "ExternalIP"
    return name, "", False


def _node_ready(node: Mapping[str, Any]) -> bool:
    """False only when the node's Ready condition says False or Unknown (no condition: assume ready)."""
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    return ready is None or ready.get("status") == "True"


def _found(endpoints: list[HostPort], source: str, reason: str) -> RelayDiscovery:
    unique = list(dict.fromkeys(endpoints))[:MAX_ENDPOINTS]
    return RelayDiscovery(tuple(unique), source, reason, f"{len(unique)} endpoint(s) from {source}")
