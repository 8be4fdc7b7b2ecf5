"""Which peers route through a gateway.  Pure.

With ``spec.clientRefs`` the clients are exactly those peers (that exist), less the active
gateway peer itself.  Without it they are every peer except the gateway's own peers and the
peers whose own address lies inside one of the routes: a node already on the network behind
the gateway (an EC2 node in the VPC) reaches it directly and must not send it through the mesh.

A peer's own addresses (:func:`own_addresses`) are its endpoint, its LAN endpoints
(``status.hostEndpoints``), its Node's InternalIP/ExternalIP addresses and the
``wirekube.io/internal-ip`` annotation of the Node.  The mesh address is not one of them: it
lies in the mesh CIDR, which no route may overlap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wirekube.models import ANNOTATION_INTERNAL_IP, Endpoint, Gateway, IPAddress, IPNetwork


def own_addresses(peer_obj: Mapping[str, Any], node_obj: Mapping[str, Any] | None) -> frozenset[IPAddress]:
    """The addresses of a peer's node (from the raw WireKubePeer and its Node, if any)."""
    found: set[IPAddress] = set()
    spec = peer_obj.get("spec") or {}
    status = peer_obj.get("status") or {}
    for text in [spec.get("endpoint"), *(status.get("hostEndpoints") or [])]:
        ip = _endpoint_ip(text)
        if ip is not None:
            found.add(ip)
    if node_obj is not None:
        found.update(_node_addresses(node_obj))
    return frozenset(found)


def _endpoint_ip(text: Any) -> IPAddress | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return Endpoint.parse(text).ip
    except ValueError:
        return None


def _node_addresses(node_obj: Mapping[str, Any]) -> set[IPAddress]:
    out: set[IPAddress] = set()
    texts = [
        a.get("address", "")
        for a in (node_obj.get("status") or {}).get("addresses") or []
        if a.get("type") in ("InternalIP", "ExternalIP")
    ]
    texts.append(((node_obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_INTERNAL_IP, ""))
    for text in texts:
        try:
            out.add(ipaddress.ip_address(str(text).strip()))
        except ValueError:
            continue
    return out


def inside_routes(addresses: Iterable[IPAddress], routes: Sequence[IPNetwork]) -> IPAddress | None:
    """The first address that lies inside one of ``routes``."""
    return next((a for a in sorted(addresses, key=str) for r in routes if a.version == r.version and a in r), None)


def select_clients(
    gateway: Gateway,
    peers: Iterable[str],
    addresses: Mapping[str, frozenset[IPAddress]],
    routes: Sequence[IPNetwork],
    active: str,
) -> tuple[str, ...]:
    """The client peers of ``gateway``, sorted by name (see the module docstring)."""
    existing = set(peers)
    if gateway.spec.client_refs:
        return tuple(sorted(c for c in set(gateway.spec.client_refs) if c in existing and c != active))
    gateway_peers = set(gateway.spec.peer_refs)
    return tuple(
        sorted(
            name
            for name in existing
            if name not in gateway_peers and inside_routes(addresses.get(name, frozenset()), routes) is None
        )
    )
