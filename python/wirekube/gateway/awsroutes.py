"""AWS VPC routes that follow a gateway's active peer (``WireKubeGateway.spec.awsVPCRoutes``).  Pure.

An AWS VPC route table names one ENI as the next hop, and it does not learn from ARP, so a
``spec.virtualIP`` cannot move the VPC -> mesh direction (the API server's ``kubectl exec`` and
``logs`` to hybrid kubelets) after a failover.  With::

    spec:
      awsVPCRoutes:
        routeTableIDs: [rtb-0123456789abcdef0]
        destinationCIDRs: [172.20.0.0/16, 10.200.0.0/16]   # hybrid node and pod networks
        disableSourceDestCheck: true                       # default
        region: us-west-2                                  # optional

the controller's route follower (:mod:`wirekube.gateway.awsfollower`, the I/O half) keeps, in
every listed route table, a route for every destination CIDR to the primary ENI of the active
gateway peer's EC2 instance, and turns source/destination checking off on every gateway peer's
primary ENI.  This module holds what can be decided without AWS:

* :func:`vpc_routes_from_cr` parses and validates the field from the raw object (the CRD
  validates it too; this names the field path when an object got past an older CRD);
* :func:`target_for` decides whether routes may move and to which instance: only once the
  active peer has confirmed forwarding (make-before-break: the VPC keeps sending to the old
  gateway until the new one forwards), resolved from ``Node.spec.providerID``
  (``aws:///<zone>/<instance-id>``);
* :func:`plan_routes` turns the route tables as DescribeRouteTables returned them into the
  CreateRoute/ReplaceRoute calls that make them right (nothing when they are), and
  :func:`conflicts` finds two gateways claiming the same route.

Routes are never deleted: removing a CIDR or the whole field leaves its routes as they are.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wirekube.gateway.contract import acknowledged
from wirekube.models import ForwardingAck, IPNetwork, _Ctx

FIELD = "awsVPCRoutes"
PATH = f"spec.{FIELD}"
MAX_ROUTE_TABLES = 50
MAX_DESTINATIONS = 50
ROUTE_TABLE_ID = re.compile(r"^rtb-([0-9a-f]{8}|[0-9a-f]{17})$")
REGION = re.compile(r"^[a-z]{2,5}(-[a-z]+)+-[0-9]{1,2}$")
_PROVIDER_ID = re.compile(r"^aws://[^/]*/(?:(?P<zone>[a-z0-9-]+)/)?(?P<instance>i-[0-9a-f]{8,17})$")
_ZONE_REGION = re.compile(r"^(?:[a-z]+-)+[0-9]+")

CREATE = "CreateRoute"
REPLACE = "ReplaceRoute"

# Reasons of the VPCRoutesSynced condition that come from here (the follower adds AWS's).
NO_ACTIVE_PEER = "NoActivePeer"
FORWARDING_NOT_CONFIRMED = "ForwardingNotConfirmed"
NODE_NOT_FOUND = "NodeNotFound"
NO_AWS_PROVIDER_ID = "NoAWSProviderID"
NO_REGION = "NoRegion"
CONFLICT = "Conflict"

# What the route follower needs from IAM (README "AWS VPC routes follow failover").
IAM_ACTIONS = (
    "ec2:DescribeInstances",
    "ec2:DescribeRouteTables",
    "ec2:CreateRoute",
    "ec2:ReplaceRoute",
    "ec2:ModifyNetworkInterfaceAttribute",
)


@dataclass(frozen=True)
class VPCRoutes:
    """``spec.awsVPCRoutes`` of one gateway."""

    route_table_ids: tuple[str, ...]
    destination_cidrs: tuple[IPNetwork, ...]
    disable_source_dest_check: bool = True
    region: str = ""


@dataclass(frozen=True)
class Instance:
    """A gateway peer's EC2 instance, from its Node's ``spec.providerID``."""

    node: str
    instance_id: str
    zone: str = ""


@dataclass(frozen=True)
class Target:
    """Where one gateway's VPC routes must point now."""

    gateway: str
    spec: VPCRoutes
    active: Instance
    peers: tuple[Instance, ...]
    """Every gateway peer with an AWS instance (the active one included): their primary ENIs get
    source/destination checking turned off when ``spec.disable_source_dest_check``."""
    region: str
    skipped: tuple[str, ...] = ()
    """Gateway peers other than the active one that have no AWS instance (nothing is done for them)."""


@dataclass(frozen=True)
class Waiting:
    """Routes must not move now, and why (the VPCRoutesSynced condition's reason and message)."""

    reason: str
    message: str


@dataclass(frozen=True)
class RouteAction:
    op: str
    """CREATE or REPLACE."""
    route_table_id: str
    cidr: IPNetwork
    eni: str
    previous: str = ""
    """For REPLACE, what the route pointed at before (``eni-...``, ``igw-...``, ``blackhole``)."""

    def __str__(self) -> str:
        was = f" (was {self.previous})" if self.previous else ""
        return f"{self.route_table_id}: {self.cidr} -> {self.eni}{was}"


@dataclass(frozen=True)
class RouteProblem:
    reason: str
    message: str


# ---------------------------------------------------------------------------------- the spec field


def vpc_routes_from_cr(obj: Mapping[str, Any]) -> VPCRoutes | None:
    """``spec.awsVPCRoutes`` of a raw WireKubeGateway, or None without it.

    Raises :class:`~wirekube.errors.InvalidObject` naming the field, e.g.
    ``spec.awsVPCRoutes.routeTableIDs[1]: ...``.
    """
    name = str((obj.get("metadata") or {}).get("name") or "")
    c = _Ctx("WireKubeGateway", name)
    spec = c.mapping(obj.get("spec"), "spec")
    if spec.get(FIELD) is None:
        return None
    raw = c.mapping(spec.get(FIELD), PATH)
    known = {"routeTableIDs", "destinationCIDRs", "disableSourceDestCheck", "region"}
    for key in sorted(set(raw) - known, key=str):
        raise c.fail(f"{PATH}.{key}", f"unknown field (known: {', '.join(sorted(known))})")
    tables: list[str] = []
    items = c.list(raw.get("routeTableIDs"), f"{PATH}.routeTableIDs")
    if not 1 <= len(items) <= MAX_ROUTE_TABLES:
        raise c.fail(f"{PATH}.routeTableIDs", f"needs 1 to {MAX_ROUTE_TABLES} route table IDs, got {len(items)}")
    for i, item in enumerate(items):
        path = f"{PATH}.routeTableIDs[{i}]"
        text = c.string(item, path)
        if not ROUTE_TABLE_ID.match(text):
            raise c.fail(path, f"{text!r} is not a route table ID like rtb-0123456789abcdef0")
        if text in tables:
            raise c.fail(path, f"{text} is listed twice (first at routeTableIDs[{tables.index(text)}])")
        tables.append(text)
    cidrs: list[IPNetwork] = []
    items = c.list(raw.get("destinationCIDRs"), f"{PATH}.destinationCIDRs")
    if not 1 <= len(items) <= MAX_DESTINATIONS:
        raise c.fail(f"{PATH}.destinationCIDRs", f"needs 1 to {MAX_DESTINATIONS} CIDRs, got {len(items)}")
    for i, item in enumerate(items):
        path = f"{PATH}.destinationCIDRs[{i}]"
        net = c.cidr(item, path)
        if net.prefixlen == 0:
            raise c.fail(path, f"{net} would send every destination to the gateway; list the hybrid networks")
        if net in cidrs:
            raise c.fail(path, f"{net} is listed twice (first at destinationCIDRs[{cidrs.index(net)}])")
        cidrs.append(net)
    region = c.string(raw.get("region"), f"{PATH}.region")
    if region and not REGION.match(region):
        raise c.fail(f"{PATH}.region", f"{region!r} is not an AWS region like us-west-2")
    return VPCRoutes(
        route_table_ids=tuple(tables),
        destination_cidrs=tuple(cidrs),
        disable_source_dest_check=c.boolean(raw.get("disableSourceDestCheck"), f"{PATH}.disableSourceDestCheck",
                                            True),
        region=region,
    )


# ---------------------------------------------------------------------------------- where to point


def instance_of(node: str, node_obj: Mapping[str, Any] | None) -> Instance | None:
    """The EC2 instance behind a Node, from ``spec.providerID`` (``aws:///us-west-2a/i-0abc...``)."""
    if node_obj is None:
        return None
    pid = str((node_obj.get("spec") or {}).get("providerID") or "")
    m = _PROVIDER_ID.match(pid)
    if m is None:
        return None
    return Instance(node, m["instance"], m["zone"] or "")


def region_of_zone(zone: str) -> str:
    """``us-west-2a`` -> ``us-west-2``; also Local and Wavelength Zones (``us-west-2-lax-1a``)."""
    m = _ZONE_REGION.match(zone)
    return m.group(0) if m else ""


def target_for(
    gateway: str,
    spec: VPCRoutes,
    peer_refs: Sequence[str],
    active_peer: str,
    forwarding: Mapping[str, ForwardingAck],
    routes: Sequence[IPNetwork],
    nodes: Mapping[str, Mapping[str, Any]],
    *,
    followed_peer: str = "",
    default_region: str = "",
) -> Target | Waiting:
    """Where ``gateway``'s VPC routes must point, or why they must stay where they are.

    A new active peer gets the routes only once it has confirmed forwarding for ``routes``
    (``status.forwarding.<peer>``); ``followed_peer`` (the peer the routes were last sent to)
    keeps them while its acknowledgement is being renewed for a route change.  The region is
    ``spec.region``, else ``default_region`` (``$AWS_REGION``), else the active instance's zone's.
    """
    if not active_peer:
        return Waiting(NO_ACTIVE_PEER, "the gateway has no active peer yet; the VPC routes stay as they are")
    if active_peer != followed_peer and not acknowledged(forwarding, active_peer, routes):
        return Waiting(FORWARDING_NOT_CONFIRMED,
                       f"waiting for {active_peer} to confirm forwarding before the VPC routes move to it")
    if active_peer not in nodes:
        return Waiting(NODE_NOT_FOUND, f"no Node named {active_peer} (the active peer): cannot find its EC2 instance")
    active = instance_of(active_peer, nodes.get(active_peer))
    if active is None:
        pid = (nodes[active_peer].get("spec") or {}).get("providerID") or ""
        return Waiting(NO_AWS_PROVIDER_ID, f"Node {active_peer} (the active peer) is not an EC2 instance: "
                                           f"spec.providerID is {pid!r}, expected aws:///<zone>/<instance-id>")
    region = spec.region or default_region or region_of_zone(active.zone)
    if not region:
        return Waiting(NO_REGION, f"no region: set {PATH}.region or AWS_REGION (Node {active_peer}'s providerID "
                                  "names no zone)")
    peers: list[Instance] = []
    skipped: list[str] = []
    for name in peer_refs:
        inst = active if name == active_peer else instance_of(name, nodes.get(name))
        if inst is None:
            skipped.append(name)
        elif inst not in peers:
            peers.append(inst)
    return Target(gateway, spec, active, tuple(peers), region, tuple(skipped))


def conflicts(claims: Iterable[tuple[str, VPCRoutes]]) -> dict[str, str]:
    """Gateways whose routes another gateway already claims, with a message; first claimer wins.

    ``claims`` are (gateway, spec) in precedence order (the controller's: oldest first).  Two
    gateways routing the same CIDR in the same route table would move it back and forth.
    """
    owner: dict[tuple[str, IPNetwork], str] = {}
    out: dict[str, str] = {}
    for gateway, spec in claims:
        keys = [(rtb, cidr) for rtb in spec.route_table_ids for cidr in spec.destination_cidrs]
        clash = next((k for k in keys if k in owner), None)
        if clash is not None:
            out[gateway] = (f"{clash[1]} in {clash[0]} is already routed by WireKubeGateway {owner[clash]}; "
                            "only the older gateway's routes are followed")
            continue
        owner.update((k, gateway) for k in keys)
    return out


# ---------------------------------------------------------------------------------- the route plan


_TARGET_KEYS = ("NetworkInterfaceId", "InstanceId", "GatewayId", "NatGatewayId", "TransitGatewayId",
                "VpcPeeringConnectionId", "LocalGatewayId", "CarrierGatewayId", "EgressOnlyInternetGatewayId",
                "CoreNetworkArn", "VpcEndpointId")


def route_destination(route: Mapping[str, Any]) -> IPNetwork | None:
    text = route.get("DestinationCidrBlock") or route.get("DestinationIpv6CidrBlock")
    if not text:
        return None  # a prefix-list route (DestinationPrefixListId): not ours
    try:
        return ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        return None


def route_target(route: Mapping[str, Any]) -> str:
    """What a route points at, for messages (``eni-...``, ``igw-...``, ``local``, ``blackhole``)."""
    target = next((str(route[k]) for k in _TARGET_KEYS if route.get(k)), "")
    if route.get("State") == "blackhole":
        return f"blackhole ({target})" if target else "blackhole"
    return target or "nothing"


def plan_routes(
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    route_table_ids: Sequence[str],
    cidrs: Sequence[IPNetwork],
    eni: str,
) -> tuple[tuple[RouteAction, ...], tuple[RouteProblem, ...]]:
    """The calls that make every (table, CIDR) route point at ``eni``; nothing when all already do.

    ``tables`` maps route table ID -> its ``Routes`` as DescribeRouteTables returned them; a
    listed table missing from it does not exist (in this region and account).  A static route to
    anything else is replaced; a route only propagated from a virtual private gateway is
    overridden by a static one (CreateRoute: static routes win); the VPC's own local route cannot
    be replaced, which is a problem.
    """
    actions: list[RouteAction] = []
    problems: list[RouteProblem] = []
    for index, rtb in enumerate(route_table_ids):
        routes = tables.get(rtb)
        if routes is None:
            problems.append(RouteProblem("RouteTableNotFound",
                                         f"route table {rtb} ({PATH}.routeTableIDs[{index}]) does not exist"))
            continue
        for cidr in cidrs:
            matching = [r for r in routes if route_destination(r) == cidr]
            local = next((r for r in matching if r.get("Origin") == "CreateRouteTable"), None)
            static = next((r for r in matching if r.get("Origin") not in ("CreateRouteTable",
                                                                         "EnableVgwRoutePropagation")), None)
            if local is not None:
                problems.append(RouteProblem("LocalRouteConflict", f"{cidr} in {rtb} is the VPC's local route; "
                                                                   "it cannot point at a gateway"))
            elif static is None:
                actions.append(RouteAction(CREATE, rtb, cidr, eni))
            elif static.get("NetworkInterfaceId") != eni:
                actions.append(RouteAction(REPLACE, rtb, cidr, eni, route_target(static)))
    return tuple(actions), tuple(problems)


def primary_enis(instances: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, bool]]:
    """instance ID -> (primary ENI ID, source/dest check on) from DescribeInstances' instances."""
    out: dict[str, tuple[str, bool]] = {}
    for inst in instances:
        for eni in inst.get("NetworkInterfaces") or []:
            if (eni.get("Attachment") or {}).get("DeviceIndex") == 0 and eni.get("NetworkInterfaceId"):
                check = eni.get("SourceDestCheck")
                out[str(inst.get("InstanceId"))] = (str(eni["NetworkInterfaceId"]), check is not False)
    return out
