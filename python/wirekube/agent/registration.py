"""The node's own WireKubePeer: what it should say.  Pure module (no I/O, no clock).

- name = node name, label ``wirekube.io/node``, ownerReference to the Node (garbage collection);
- spec.publicKey = this node's key;
- spec.endpoint = annotation ``wirekube.io/endpoint`` (``ip`` or ``ip:port``), else what endpoint
  discovery found (STUN from the WireGuard port, else the AWS IMDSv2 public IPv4: see
  :func:`first_discovered` and :mod:`wirekube.agent.imds`), else the node's ExternalIP, else its
  InternalIP, with the mesh listen port (also for a discovered address without a port);
- spec.allowedIPs = [mesh /32] (+ the private InternalIP when
  ``autoAllowedIPs.includeNodeInternalIP``; annotation ``wirekube.io/internal-ip`` overrides),
  followed by every entry a user added.  The entries the agent added itself are remembered in
  the annotation ``wirekube.io/auto-allowed-ips`` so that a changed InternalIP replaces the old
  one instead of piling up, and user entries are never dropped.

The mesh /32 is sticky: an address already published is kept unless an older peer claims it
too (:func:`wirekube.ipam.conflict_winner`); a new one is chosen with
:func:`wirekube.ipam.choose_mesh_ip` against the other peers' claims.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wirekube import API_VERSION, ipam
from wirekube.models import (
    ANNOTATION_ENDPOINT,
    ANNOTATION_INTERNAL_IP,
    LABEL_NODE,
    Endpoint,
    EndpointDiscovery,
    IPAddress,
    IPNetwork,
    Mesh,
    Peer,
    PeerSpec,
    peer_spec_to_cr,
)

ANNOTATION_AUTO_ALLOWED_IPS = "wirekube.io/auto-allowed-ips"
DEFAULT_KEEPALIVE = 25
PRIVATE_RANGES = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
"""RFC 1918, RFC 6598 (shared/CGNAT) and IPv6 ULA: the only InternalIPs added automatically."""


def is_private(ip: IPAddress) -> bool:
    return any(ip in n for n in PRIVATE_RANGES)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    uid: str = ""
    internal_ips: tuple[IPAddress, ...] = ()
    external_ips: tuple[IPAddress, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Registration:
    spec: PeerSpec
    auto_entries: tuple[IPNetwork, ...]
    endpoint_method: EndpointDiscovery | None
    problems: tuple[str, ...] = ()
    """Annotations that could not be used (reported, then ignored)."""


def node_info_from_obj(obj: Mapping[str, Any]) -> NodeInfo:
    meta = obj.get("metadata") or {}
    internal: list[IPAddress] = []
    external: list[IPAddress] = []
    for addr in (obj.get("status") or {}).get("addresses") or []:
        try:
            ip = ipaddress.ip_address(addr.get("address", ""))
        except ValueError:
            continue
        if addr.get("type") == "InternalIP":
            internal.append(ip)
        elif addr.get("type") == "ExternalIP":
            external.append(ip)
    return NodeInfo(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        internal_ips=tuple(internal),
        external_ips=tuple(external),
        annotations=dict(meta.get("annotations") or {}),
    )


def desired_registration(
    node: NodeInfo,
    mesh: Mesh,
    public_key: str,
    existing: Peer | None,
    others: Sequence[Peer],
    discovered: tuple[Endpoint | None, EndpointDiscovery | None] = (None, None),
) -> Registration:
    """``discovered``: what endpoint discovery found (STUN, IMDS); it ranks below the node
    annotation and above the node's ExternalIP/InternalIP."""
    problems: list[str] = []
    mesh_net = ipaddress.ip_network(f"{_mesh_ip(node, mesh, existing, others)}/32")
    internal = _internal_ip(node, mesh, problems)
    auto: tuple[IPNetwork, ...] = (ipaddress.ip_network(internal),) if internal is not None else ()
    previous_auto = _previous_auto(existing)
    old = existing.spec.allowed_ips[1:] if existing is not None else ()
    user = tuple(n for n in old if n not in previous_auto and n not in auto and n != mesh_net)
    endpoint, method = _endpoint(node, mesh, problems, discovered)
    return Registration(
        spec=PeerSpec(
            public_key=public_key,
            endpoint=endpoint,
            allowed_ips=(mesh_net, *auto, *user),
            persistent_keepalive=existing.spec.persistent_keepalive if existing is not None else DEFAULT_KEEPALIVE,
        ),
        auto_entries=auto,
        endpoint_method=method,
        problems=tuple(problems),
    )


def _mesh_ip(node: NodeInfo, mesh: Mesh, existing: Peer | None, others: Sequence[Peer]) -> ipaddress.IPv4Address:
    cidr = mesh.spec.mesh_cidr
    claims: dict[ipaddress.IPv4Address, list[Peer]] = {}
    for p in others:
        ip = p.mesh_ip
        if p.name != node.name and ip is not None and ip in cidr:
            claims.setdefault(ip, []).append(p)
    current = existing.mesh_ip if existing is not None else None
    if current is not None and current in cidr:
        rivals = claims.get(current, [])
        contenders = [(existing.creation_timestamp or "~", existing.name)] + [  # type: ignore[union-attr]
            (p.creation_timestamp or "~", p.name) for p in rivals
        ]
        if not rivals or ipam.conflict_winner(contenders) == node.name:
            return current
    return ipam.choose_mesh_ip(node.name, cidr, {ip: ps[0].name for ip, ps in claims.items()})


def node_internal_ip(node: NodeInfo, mesh: Mesh, problems: list[str] | None = None) -> IPAddress | None:
    """The address ``autoAllowedIPs.includeNodeInternalIP`` adds for ``node`` (None: none).

    The gateway controller grants the same address (``wirekube.gateway.grants``)."""
    return _internal_ip(node, mesh, problems if problems is not None else [])


def _internal_ip(node: NodeInfo, mesh: Mesh, problems: list[str]) -> IPAddress | None:
    if not mesh.spec.include_node_internal_ip:
        return None
    override = node.annotations.get(ANNOTATION_INTERNAL_IP, "").strip()
    if override:
        try:
            return ipaddress.ip_address(override)
        except ValueError:
            problems.append(f"annotation {ANNOTATION_INTERNAL_IP}={override!r} is not an IP address")
    # Only a private address: a public one in AllowedIPs would hijack SSH/API traffic.
    return next((ip for ip in node.internal_ips if is_private(ip)), None)


def _endpoint(
    node: NodeInfo,
    mesh: Mesh,
    problems: list[str],
    discovered: tuple[Endpoint | None, EndpointDiscovery | None] = (None, None),
) -> tuple[Endpoint | None, EndpointDiscovery | None]:
    port = mesh.spec.listen_port
    text = node.annotations.get(ANNOTATION_ENDPOINT, "").strip()
    if text:
        try:
            return _parse_endpoint(text, port), EndpointDiscovery.ANNOTATION
        except ValueError as e:
            problems.append(f"annotation {ANNOTATION_ENDPOINT}={text!r}: {e}")
    found, how = first_discovered(discovered)
    if found is not None:
        return (Endpoint(found.ip, port) if found.port == 0 else found), how
    if node.external_ips:
        return Endpoint(node.external_ips[0], port), EndpointDiscovery.EXTERNAL_IP
    if node.internal_ips:
        return Endpoint(node.internal_ips[0], port), EndpointDiscovery.INTERNAL_IP
    return None, None


def first_discovered(
    *candidates: tuple[Endpoint | None, EndpointDiscovery | None],
) -> tuple[Endpoint | None, EndpointDiscovery | None]:
    """The first usable discovery result, in the order given (the agent passes STUN, then IMDS).

    Unusable: no endpoint, or a loopback one.  Port 0 means "address only" (IMDS): the caller
    publishes it with the mesh listen port.
    """
    for endpoint, method in candidates:
        if endpoint is not None and not endpoint.ip.is_loopback:
            return endpoint, method
    return None, None


def _parse_endpoint(text: str, default_port: int) -> Endpoint:
    try:
        return Endpoint(ipaddress.ip_address(text.strip("[]")), default_port)
    except ValueError:
        return Endpoint.parse(text)


def _previous_auto(existing: Peer | None) -> set[IPNetwork]:
    if existing is None:
        return set()
    out: set[IPNetwork] = set()
    for part in existing.annotations.get(ANNOTATION_AUTO_ALLOWED_IPS, "").split(","):
        try:
            out.add(ipaddress.ip_network(part.strip()))
        except ValueError:
            continue
    return out


def auto_annotation(reg: Registration) -> str:
    return ",".join(str(n) for n in reg.auto_entries)


def new_peer_body(node: NodeInfo, reg: Registration) -> dict[str, Any]:
    """The WireKubePeer to create for ``node``."""
    meta: dict[str, Any] = {
        "name": node.name,
        "labels": {LABEL_NODE: node.name},
        "annotations": {ANNOTATION_AUTO_ALLOWED_IPS: auto_annotation(reg)},
    }
    if node.uid:
        meta["ownerReferences"] = [owner_reference(node)]
    return {"apiVersion": API_VERSION, "kind": "WireKubePeer", "metadata": meta, "spec": peer_spec_to_cr(reg.spec)}


def owner_reference(node: NodeInfo) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}


def update_patch(node: NodeInfo, reg: Registration, existing: Peer, existing_obj: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch bringing ``existing`` to ``reg`` (empty when nothing differs)."""
    patch: dict[str, Any] = {}
    if existing.spec != reg.spec:
        patch["spec"] = peer_spec_to_cr(reg.spec)
        if reg.spec.endpoint is None:
            patch["spec"]["endpoint"] = None
    meta: dict[str, Any] = {}
    if existing.labels.get(LABEL_NODE) != node.name:
        meta["labels"] = {LABEL_NODE: node.name}
    if existing.annotations.get(ANNOTATION_AUTO_ALLOWED_IPS, "") != auto_annotation(reg):
        meta["annotations"] = {ANNOTATION_AUTO_ALLOWED_IPS: auto_annotation(reg)}
    owners = (existing_obj.get("metadata") or {}).get("ownerReferences") or []
    if node.uid and not any(o.get("uid") == node.uid for o in owners):
        meta["ownerReferences"] = [*owners, owner_reference(node)]
    if meta:
        patch["metadata"] = meta
    return patch
