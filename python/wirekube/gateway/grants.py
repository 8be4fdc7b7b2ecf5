"""The route grants the controller keeps from the Node objects.  Pure.

Agents route an AllowedIPs entry only when it is granted (:mod:`wirekube.authority`).  What a
node may route because of what its Node object says is granted here, one WireKubeRouteGrant per
node named ``node.<name>`` and labelled ``app.kubernetes.io/managed-by=wirekube-gateway``:

* its InternalIP (/32) when ``autoAllowedIPs.includeNodeInternalIP`` is on, picked exactly as the
  agent picks it (the ``wirekube.io/internal-ip`` annotation, else the first private InternalIP);
* its pod CIDRs as pod-CIDR sync accepted them (from ``Node.spec.podCIDRs`` or the CiliumNode).

The grant follows the Node, not the peer: a peer claiming more gets nothing more.  Grants of
nodes that are gone, or that no longer have anything to grant, are deleted; administrators'
grants (any other name or no label) are never touched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wirekube.agent.registration import node_info_from_obj, node_internal_ip
from wirekube.models import GRANT_NODE_PREFIX, IPNetwork, Mesh, RouteGrant


@dataclass(frozen=True)
class GrantPlan:
    apply: tuple[RouteGrant, ...] = ()
    delete: tuple[str, ...] = ()


def node_grant(mesh: Mesh, node_obj: Mapping[str, Any], pod_cidrs: Sequence[IPNetwork]) -> RouteGrant | None:
    info = node_info_from_obj(node_obj)
    cidrs: list[IPNetwork] = []
    ip = node_internal_ip(info, mesh)
    if ip is not None:
        cidrs.append(ipaddress.ip_network(ip))
    cidrs.extend(c for c in pod_cidrs if c not in cidrs)
    if not info.name or not cidrs:
        return None
    return RouteGrant(
        name=GRANT_NODE_PREFIX + info.name,
        nodes=(info.name,),
        cidrs=tuple(cidrs),
        description=f"kept by the gateway controller from Node {info.name}",
        managed=True,
    )


def plan_grants(
    mesh: Mesh,
    nodes: Mapping[str, Mapping[str, Any]],
    pod_cidrs: Mapping[str, Sequence[IPNetwork]],
    existing: Iterable[RouteGrant],
) -> GrantPlan:
    """What to write so that the managed grants say what the Nodes say; ``existing`` are the
    managed grants read back (others are ignored)."""
    want = {g.name: g for obj in nodes.values() if (g := node_grant(mesh, obj, pod_cidrs.get(
        str((obj.get("metadata") or {}).get("name", "")), ()))) is not None}
    have = {g.name: g for g in existing if g.managed}
    apply = tuple(g for name, g in sorted(want.items()) if have.get(name) != g)
    delete = tuple(sorted(name for name in have if name not in want))
    return GrantPlan(apply, delete)
