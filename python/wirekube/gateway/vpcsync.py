"""The gateway controller's side of WireKubeGateway spec.awsVPCRoutes: the VPCRoutesSynced condition,
the targets handed to the AWS route follower (:mod:`~wirekube.gateway.awsfollower`, which does the
AWS calls in its own thread), and Events for the follower's outcomes."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wirekube import errors
from wirekube.gateway import awsroutes
from wirekube.gateway.awsfollower import DISABLED, SYNCING, RouteFollower, SyncResult
from wirekube.gateway.plan import GatewayPlan
from wirekube.gateway.writes import Writer
from wirekube.models import Gateway

if TYPE_CHECKING:
    from loguru import Logger

JSON = dict[str, Any]
VPC_ROUTES_SYNCED = "VPCRoutesSynced"


@dataclass
class AWSPass:
    """One pass's view of every gateway's spec.awsVPCRoutes, and the targets it collects."""

    specs: dict[str, awsroutes.VPCRoutes | errors.InvalidObject]
    conflicts: dict[str, str]
    targets: dict[str, awsroutes.Target] = field(default_factory=dict)

    @classmethod
    def of(cls, gateways: Sequence[JSON]) -> AWSPass:
        specs: dict[str, awsroutes.VPCRoutes | errors.InvalidObject] = {}
        for obj in gateways:  # in precedence order: oldest first
            try:
                spec = awsroutes.vpc_routes_from_cr(obj)
            except errors.InvalidObject as e:
                specs[obj["metadata"]["name"]] = e
                continue
            if spec is not None:
                specs[obj["metadata"]["name"]] = spec
        valid = [(n, s) for n, s in specs.items() if isinstance(s, awsroutes.VPCRoutes)]
        return cls(specs, awsroutes.conflicts(valid))


class VPCRouteSync:
    """Owns, per gateway, which peer the VPC routes follow and which follower outcomes were reported.

    ``follower`` is None when the controller runs with ``--aws-vpc-routes=off``.
    """

    def __init__(self, follower: RouteFollower | None, default_region: str, writer: Writer, log: Logger) -> None:
        self.follower = follower
        self._default_region = default_region
        self._writer = writer
        self._log = log
        self._followed: dict[str, str] = {}
        self._reported: dict[str, int] = {}
        self._warned: dict[str, tuple[str, str]] = {}

    def set_targets(self, targets: Mapping[str, awsroutes.Target]) -> None:
        if self.follower is not None:
            self.follower.set_targets(targets)

    def forget(self, names: Collection[str]) -> None:
        """Drop what is remembered about gateways not among ``names`` (deleted)."""
        for memo in (self._followed, self._reported, self._warned):
            for gone in set(memo) - set(names):
                del memo[gone]

    def condition(
        self, gateway: Gateway, plan: GatewayPlan, nodes: Mapping[str, JSON], aws: AWSPass
    ) -> tuple[bool, str, str] | None:
        """The VPCRoutesSynced condition (status, reason, message), or None without spec.awsVPCRoutes.

        Adds the gateway's target to ``aws.targets`` when its routes may move (see
        :func:`wirekube.gateway.awsroutes.target_for`).
        """
        name = gateway.name
        spec = aws.specs.get(name)
        if spec is None:
            self._followed.pop(name, None)
            return None
        if isinstance(spec, errors.InvalidObject):
            return False, "InvalidSpec", str(spec)
        if self.follower is None:
            return False, DISABLED, "the controller runs with --aws-vpc-routes=off: nothing is done in AWS"
        if name in aws.conflicts:
            return False, awsroutes.CONFLICT, aws.conflicts[name]
        target = awsroutes.target_for(
            name, spec, gateway.spec.peer_refs, str(plan.status["activePeer"]), gateway.status.forwarding,
            plan.routes, nodes, followed_peer=self._followed.get(name, ""),
            default_region=self._default_region,
        )
        if isinstance(target, awsroutes.Waiting):
            return False, target.reason, target.message
        aws.targets[name] = target
        self._followed[name] = target.active.node
        result = self.follower.result(name)
        if result is None or result.target != target:
            return False, SYNCING, (f"pointing the VPC routes at Node {target.active.node} "
                                    f"({target.active.instance_id}, {target.region})")
        return result.ok, result.reason, result.message

    def record(self, obj: JSON, name: str) -> None:
        """Events for the follower's latest outcome: routes moved, or a new failure."""
        result: SyncResult | None = self.follower.result(name) if self.follower is not None else None
        if result is None or self._reported.get(name, 0) >= result.seq:
            return
        self._reported[name] = result.seq
        if result.applied:
            moved = any(a.op == awsroutes.REPLACE for a in result.applied)
            t = result.target
            note = (f"VPC routes now point at {result.eni} (Node {t.active.node}, {t.active.instance_id}): "
                    + "; ".join(str(a) for a in result.applied))
            self._log.bind(gateway=name).info("{}", note)
            self._writer.event(obj, "WireKubeGateway", "VPCRoutesMoved" if moved else "VPCRoutesCreated", note,
                               action="SyncVPCRoutes")
        if result.ok:
            self._warned.pop(name, None)
        elif self._warned.get(name) != (result.reason, result.message):
            self._warned[name] = (result.reason, result.message)
            self._writer.event(obj, "WireKubeGateway", "VPCRoutesNotSynced", f"{result.reason}: {result.message}",
                               type_="Warning", action="SyncVPCRoutes")
