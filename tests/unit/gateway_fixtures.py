"""Builders for gateway unit tests: real CR dicts turned into models by the real parsers."""

from __future__ import annotations

import ipaddress
from typing import Any

from tests.fixtures.keys import public_key
from wirekube import ipam, models
from wirekube.gateway.plan import ClusterView

MESH_CIDR = "10.255.0.0/16"


def mesh(**spec: Any) -> models.Mesh:
    return models.mesh_from_cr({"metadata": {"name": "default"}, "spec": {"meshCIDR": MESH_CIDR, **spec}})


def peer_obj(
    name: str,
    allowed: list[str] | None = None,
    *,
    connected: bool = True,
    endpoint: str | None = None,
    created: str = "2026-01-01T00:00:00Z",
    annotations: dict[str, str] | None = None,
    rv: str = "1",
    host_endpoints: list[str] | None = None,
) -> dict[str, Any]:
    mesh_ip = ipam.mesh_ip(name, MESH_CIDR)
    spec: dict[str, Any] = {"publicKey": public_key(),
                            "allowedIPs": allowed if allowed is not None else [f"{mesh_ip}/32"]}
    if endpoint:
        spec["endpoint"] = endpoint
    status: dict[str, Any] = {"connected": connected}
    if host_endpoints:
        status["hostEndpoints"] = host_endpoints
    return {
        "apiVersion": "wirekube.io/v1alpha1",
        "kind": "WireKubePeer",
        "metadata": {"name": name, "creationTimestamp": created, "resourceVersion": rv,
                     "annotations": annotations or {}},
        "spec": spec,
        "status": status,
    }


def peer(name: str, allowed: list[str] | None = None, **kw: Any) -> models.Peer:
    return models.peer_from_cr(peer_obj(name, allowed, **kw))


def gateway(
    peer_refs: list[str],
    routes: list[str],
    *,
    name: str = "gw",
    status: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    client_refs: list[str] | None = None,
    generation: int = 1,
) -> models.Gateway:
    return models.gateway_from_cr(gateway_obj(peer_refs, routes, name=name, status=status, health=health,
                                              client_refs=client_refs, generation=generation))


def gateway_obj(
    peer_refs: list[str],
    routes: list[str],
    *,
    name: str = "gw",
    status: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    client_refs: list[str] | None = None,
    generation: int = 1,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"peerRefs": peer_refs, "routes": [{"cidr": r} for r in routes]}
    if health is not None:
        spec["healthCheck"] = health
    if client_refs is not None:
        spec["clientRefs"] = client_refs
    return {"metadata": {"name": name, "generation": generation}, "spec": spec, "status": status or {}}


HC = {"enabled": True, "target": "10.100.0.2:443", "intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}


def view(*peers: models.Peer, m: models.Mesh | None = None,
         addresses: dict[str, list[str]] | None = None) -> ClusterView:
    return ClusterView(
        mesh=m if m is not None else mesh(),
        peers={p.name: p for p in peers},
        addresses={k: frozenset(ipaddress.ip_address(a) for a in v) for k, v in (addresses or {}).items()},
    )


def net(text: str) -> models.IPNetwork:
    return ipaddress.ip_network(text)
