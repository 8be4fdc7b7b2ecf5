"""The gateway controller's reconcile loop: observe -> plan (pure) -> diff -> apply.

Threads:

* informers (:class:`wirekube.k8s.Informer`) on WireKubeGateways, WireKubePeers, the
  WireKubeMesh, Nodes, the relay's namespace's Services and, once pod CIDR sync asks for them and
  their CRD exists, CiliumNodes.  Every change wakes the worker;
* the leader elector (with ``leader_elect``): renews a Lease every ``retry_period``; only the
  holder writes anything;
* the AWS route follower (:mod:`~wirekube.gateway.awsfollower`), only busy while some gateway
  has ``spec.awsVPCRoutes``: moves VPC routes to the active peer's ENI, outside the worker so a
  slow AWS call never delays an election; the worker hands it targets and reads its outcome into
  the ``VPCRoutesSynced`` condition;
* the worker: a level-triggered full pass over the caches on every wake-up, at the earliest time
  the plan can change by itself (a health report turning stale, a handover timing out), and at
  least every ``resync_period``.  A pass writes only differences, so a second pass writes
  nothing.

After a write the informer's cache lags for a moment; the object the API server returned is kept
as an overlay until the cache holds that resourceVersion or a newer one, so the next pass never
plans from a stale object (which would repeat Events or make a conflicting write).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from wirekube import errors, k8s
from wirekube.gateway import conditions as cond
from wirekube.gateway.awsfollower import AWSSettings, EC2Api, RouteFollower
from wirekube.gateway.caches import Caches, Snapshot
from wirekube.gateway.cidrs import OwnedCIDR
from wirekube.gateway.metrics import ControllerMetrics, GatewaySummary, Summary
from wirekube.gateway.plan import (
    ClusterView,
    GatewayMemory,
    GatewayPlan,
    PlanSettings,
    invalid_gateway_patch,
    plan_gateway,
)
from wirekube.gateway.podcidr import PodCIDRPlan
from wirekube.gateway.podsync import PodCIDRSyncer
from wirekube.gateway.relay import RelayDiscovery, discover_relay
from wirekube.gateway.vpcsync import VPC_ROUTES_SYNCED, AWSPass, VPCRouteSync
from wirekube.gateway.writes import COMPONENT, Writer, generation
from wirekube.models import MESH_SINGLETON, Gateway, Mesh, PodCIDRSync, gateway_from_cr

JSON = dict[str, Any]
RELAY_READY = "RelayEndpointsReady"
POD_CIDR_SYNC = "PodCIDRSync"


@dataclass(frozen=True)
class ControllerSettings:
    namespace: str = "wirekube-system"
    """Namespace of the relay Service and the leader Lease."""
    relay_service: str = "wirekube-relay"
    event_namespace: str = "default"
    """Events about cluster-scoped objects go here (where ``kubectl describe`` finds them)."""
    leader_elect: bool = True
    lease_name: str = "wirekube-gateway"
    identity: str = ""
    """Leader election identity; empty = hostname plus a random suffix."""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    resync_period: float = 30.0
    error_backoff: float = 1.0
    crd_poll_period: float = 30.0
    watch_timeout: int = 300
    """Server-side timeout of each watch request (informers re-watch after it)."""
    plan: PlanSettings = field(default_factory=PlanSettings)
    aws: AWSSettings = field(default_factory=AWSSettings)
    """The AWS route follower (WireKubeGateway spec.awsVPCRoutes)."""


class GatewayController:
    """Reconciles WireKubeGateways, pod CIDR sync and relay endpoint discovery (see module docstring).

    The coordinator: it runs the threads and each pass; what it watches is :class:`Caches`, what it
    writes goes through :class:`Writer`, pod CIDRs and route grants are :class:`PodCIDRSyncer`'s,
    spec.awsVPCRoutes is :class:`VPCRouteSync`'s.
    """

    def __init__(
        self,
        kube: k8s.Kube,
        settings: ControllerSettings,
        *,
        clock: Callable[[], float] = time.time,
        metrics: ControllerMetrics | None = None,
        aws_ec2: Callable[[str], EC2Api] | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self._clock = clock
        self.metrics = metrics or ControllerMetrics()
        self.metrics.bind(lambda: self.summary)
        self._log = logger.bind(component=COMPONENT)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._elector = (
            k8s.LeaderElector(
                kube, settings.lease_name, settings.namespace, identity=settings.identity or None,
                lease_duration=settings.lease_duration, renew_deadline=settings.renew_deadline, clock=clock,
            )
            if settings.leader_elect
            else None
        )
        self._writer = Writer(kube, self.metrics, self._log, settings.event_namespace)
        self._caches = Caches(kube, settings, self._changed, self._writer, clock, self._log)
        self._pod_cidrs = PodCIDRSyncer(self._writer, self._caches, self._log)
        self._memory: dict[str, GatewayMemory] = {}
        self._was_leader = False
        self._reset_memory = False
        self.aws = (RouteFollower(settings.aws, on_change=self._wake.set, ec2=aws_ec2)
                    if settings.aws.enabled else None)
        self._vpc = VPCRouteSync(self.aws, settings.aws.default_region, self._writer, self._log)
        self.heartbeat = 0.0
        self.summary = Summary()

    @property
    def writes(self) -> int:
        """Writes this controller made (status, peers' AllowedIPs, route grants)."""
        return self._writer.writes

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> GatewayController:
        self._caches.start()
        if self.aws is not None:
            self.aws.start()
        self._spawn("gateway-worker", self._work)
        if self._elector is not None:
            self._spawn("gateway-leader", self._lead)
        return self

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception:  # noqa: BLE001 - a dying thread must say so
                self._log.exception("thread {} died", name)
            else:
                self._log.debug("thread {} ended", name)

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop acting, give the Lease up (so a standby takes over at once), then stop watching.

        Informer threads blocked in a watch end at their next event or at the watch's server-side
        timeout (``watch_timeout``); they are daemon threads, so nobody waits for them here.
        """
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        if self.aws is not None:
            self.aws.stop(timeout)
        if self._elector is not None:
            self._elector.release()
        self._caches.stop()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._caches.wait_synced(timeout)

    @property
    def synced(self) -> bool:
        return self._caches.synced

    @property
    def is_leader(self) -> bool:
        return self._elector is None or self._elector.is_leader

    def healthy(self, now: float | None = None) -> bool:
        """The worker has looped recently (it wakes at least every resync period)."""
        now = self._clock() if now is None else now
        return now - self.heartbeat < 2 * self.settings.resync_period + 10

    def _changed(self, _type: str, _obj: JSON) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ threads

    def _lead(self) -> None:
        assert self._elector is not None
        while not self._stop.is_set():
            leading = self._elector.try_acquire_or_renew()
            if leading and not self._was_leader:
                self._log.info("became leader ({})", self._elector.identity)
                self._reset_memory = True  # health report ages restart on this replica's clock
                self._wake.set()
            elif self._was_leader and not leading:
                self._log.warning("lost leadership ({})", self._elector.identity)
            self._was_leader = leading
            self._stop.wait(self.settings.retry_period)

    def _work(self) -> None:
        while not self.wait_synced(1.0):
            if self._stop.is_set():
                return
        next_at = 0.0
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(next_at - self._clock(), self.settings.resync_period)))
            self._wake.clear()
            if self._stop.is_set():
                return
            self.heartbeat = self._clock()
            if not self.is_leader:
                self.summary = Summary(leader=False)
                if self.aws is not None:
                    self.aws.set_targets({})  # only the leader touches AWS
                next_at = self._clock() + self.settings.resync_period
                continue
            started = time.monotonic()
            try:
                next_at = self.reconcile()
            except Exception:  # noqa: BLE001 - keep reconciling whatever happens
                self.metrics.errors.labels("pass").inc()
                self._log.exception("reconcile pass failed")
                next_at = self._clock() + self.settings.error_backoff
            self.metrics.duration.observe(time.monotonic() - started)

    # ------------------------------------------------------------------ one pass

    def reconcile(self) -> float:
        """One full pass; returns when the next pass is due at the latest (controller clock)."""
        if self._reset_memory:
            self._reset_memory = False
            self._memory.clear()
        now = self._clock()
        snap = self._caches.snapshot()
        next_at = now + self.settings.resync_period
        routes: list[OwnedCIDR] = []
        summaries: dict[str, GatewaySummary] = {}
        view = snap.view()
        aws = AWSPass.of(snap.gateways)
        for obj in snap.gateways:
            due = self._reconcile_gateway(obj, view, routes, summaries, now, snap.nodes, aws)
            if due is not None:
                next_at = min(next_at, due)
        self._vpc.set_targets(aws.targets)
        self._forget_deleted(snap)
        pod_plan, pod_problem = self._pod_cidrs.sync_pod_cidrs(snap, routes)
        self._pod_cidrs.sync_grants(snap, pod_plan)
        relay = self._reconcile_mesh(snap, pod_plan, pod_problem, now)
        self.summary = Summary(
            leader=True,
            gateways=summaries,
            relay_endpoints=len(relay.endpoints) if relay else 0,
            pod_cidrs_synced=sum(len(v) for v in pod_plan.synced.values()) if pod_plan else 0,
            pod_cidrs_refused=len(pod_plan.refused) if pod_plan else 0,
        )
        if pod_problem and pod_problem[0] == "Retry":
            next_at = min(next_at, now + self.settings.error_backoff)
        return next_at

    # ------------------------------------------------------------------ gateways

    def _reconcile_gateway(
        self,
        obj: JSON,
        view: ClusterView,
        routes: list[OwnedCIDR],
        summaries: dict[str, GatewaySummary],
        now: float,
        nodes: Mapping[str, JSON] | None = None,
        aws: AWSPass | None = None,
    ) -> float | None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        try:
            gateway = gateway_from_cr(obj)
        except errors.InvalidObject as e:
            invalid = invalid_gateway_patch(status, str(e), now, generation(obj))
            self._writer.write_status("gateways", k8s.GATEWAYS, name, invalid)
            summaries[name] = GatewaySummary()
            return None
        plan = plan_gateway(gateway, status, view, routes, self._memory.get(name, GatewayMemory()), now,
                            self.settings.plan)
        routes.extend(OwnedCIDR(r, f"WireKubeGateway {name}") for r in plan.routes)
        patch = plan.patch
        vpc = self._vpc.condition(gateway, plan, nodes or {}, aws or AWSPass.of([obj]))
        conditions = status.get("conditions") or []
        if vpc is not None or cond.find(conditions, VPC_ROUTES_SYNCED) is not None:
            conditions = [c for c in plan.status["conditions"] if c.get("type") != VPC_ROUTES_SYNCED]
            if vpc is not None:
                conditions = cond.set_condition(conditions, VPC_ROUTES_SYNCED, *vpc, now, generation(obj))
            patch = cond.merge_patch(status, {**plan.status, "conditions": conditions})
        if patch and not self._writer.write_status("gateways", k8s.GATEWAYS, name, patch):
            return now + self.settings.error_backoff
        self._memory[name] = plan.memory
        self._record(obj, gateway, plan)
        self._vpc.record(obj, name)
        summaries[name] = _summary(plan)
        return plan.recheck_at

    def _record(self, obj: JSON, gateway: Gateway, plan: GatewayPlan) -> None:
        log = self._log.bind(gateway=gateway.name)
        for ev in plan.events:
            (log.warning if ev.type == "Warning" else log.info)("{}: {}", ev.reason, ev.message)
            if ev.reason in ("GatewayActivated", "Failover", "Failback"):
                forced = any(e.reason == "HandoverForced" for e in plan.events)
                self.metrics.switches.labels(gateway.name, ev.reason, str(forced).lower()).inc()
            self._writer.event(obj, "WireKubeGateway", ev.reason, ev.message, type_=ev.type, action="Elect")

    def _forget_deleted(self, snap: Snapshot) -> None:
        names = {o["metadata"]["name"] for o in snap.gateways}
        for gone in set(self._memory) - names:
            del self._memory[gone]
        self._vpc.forget(names)

    # ------------------------------------------------------------------ mesh status

    def _reconcile_mesh(
        self, snap: Snapshot, pod_plan: PodCIDRPlan | None, pod_problem: tuple[str, str] | None, now: float
    ) -> RelayDiscovery | None:
        if snap.mesh is None or snap.mesh_obj is None:
            return None
        relay = discover_relay(snap.mesh, snap.service, snap.nodes.values(), self.settings.namespace,
                               self.settings.relay_service)
        status = snap.mesh_obj.get("status") or {}
        gen = generation(snap.mesh_obj)
        conditions = cond.set_condition(status.get("conditions") or [], RELAY_READY, relay.ready, relay.reason,
                                        relay.message, now, gen)
        ok, reason, message = _pod_condition(snap.mesh, pod_plan, pod_problem)
        conditions = cond.set_condition(conditions, POD_CIDR_SYNC, ok, reason, message, now, gen)
        endpoints = [str(e) for e in relay.endpoints]
        desired = {
            "relay": {"endpoints": endpoints, "source": relay.source},
            "totalPeers": len(snap.peer_objs),
            "readyPeers": sum(1 for p in snap.peers.values() if p.status.connected),
            "conditions": conditions,
        }
        patch = cond.merge_patch(status, desired)
        if patch:
            if "relay" in patch:
                self._log.info("relay endpoints: {} ({})", endpoints, relay.message)
            self._writer.write_status("meshes", k8s.MESHES, MESH_SINGLETON, patch)
        return relay


def _pod_condition(
    mesh: Mesh, plan: PodCIDRPlan | None, problem: tuple[str, str] | None
) -> tuple[bool, str, str]:
    if mesh.spec.pod_cidr_sync is PodCIDRSync.NONE:
        return True, "Disabled", "spec.podCIDRSync is none"
    if problem is not None and problem[0] != "Retry":
        return False, problem[0], problem[1]
    if plan is None:
        return False, "Syncing", "pod CIDR sync has not run yet"
    if plan.refused:
        return False, "Refused", "; ".join(str(r) for r in plan.refused)
    count = sum(len(v) for v in plan.synced.values())
    return True, "Synced", f"{count} pod CIDR(s) on {len(plan.synced)} peer(s) from {mesh.spec.pod_cidr_sync}"


def _summary(plan: GatewayPlan) -> GatewaySummary:
    s = plan.status
    return GatewaySummary(
        active_peer=s["activePeer"],
        pending_peer=s["pendingPeer"],
        ready=s["ready"],
        routes=s["routesInjected"],
        clients=len(s["clients"]),
        rejected_routes=len(plan.rejected),
        peer_health=dict(s["peerHealth"]),
    )
