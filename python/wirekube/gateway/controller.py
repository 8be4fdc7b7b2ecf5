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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from wirekube import errors, k8s
from wirekube.gateway import awsroutes
from wirekube.gateway import conditions as cond
from wirekube.gateway.awsfollower import DISABLED, SYNCING, AWSSettings, EC2Api, RouteFollower, SyncResult
from wirekube.gateway.cidrs import OwnedCIDR
from wirekube.gateway.clients import own_addresses
from wirekube.gateway.grants import plan_grants
from wirekube.gateway.metrics import ControllerMetrics, GatewaySummary, Summary
from wirekube.gateway.plan import (
    ClusterView,
    GatewayMemory,
    GatewayPlan,
    PlanSettings,
    invalid_gateway_patch,
    plan_gateway,
)
from wirekube.gateway.podcidr import PodCIDRPlan, Refusal, cilium_pod_cidrs, node_pod_cidrs, plan_pod_cidrs
from wirekube.gateway.relay import RelayDiscovery, discover_relay
from wirekube.models import (
    GRANT_MANAGER,
    LABEL_MANAGED_BY,
    MESH_SINGLETON,
    Gateway,
    Mesh,
    Peer,
    PodCIDRSync,
    gateway_from_cr,
    mesh_from_cr,
    peer_from_cr,
    route_grant_from_cr,
    route_grant_to_cr,
)

JSON = dict[str, Any]
CILIUM_CRD = "ciliumnodes.cilium.io"
COMPONENT = "gateway-controller"
RELAY_READY = "RelayEndpointsReady"
POD_CIDR_SYNC = "PodCIDRSync"
VPC_ROUTES_SYNCED = "VPCRoutesSynced"


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


@dataclass(frozen=True)
class Snapshot:
    mesh_obj: JSON | None
    mesh: Mesh | None
    peer_objs: Mapping[str, JSON]
    peers: Mapping[str, Peer]
    invalid_peers: Mapping[str, str]
    nodes: Mapping[str, JSON]
    gateways: tuple[JSON, ...]
    service: JSON | None


class GatewayController:
    """Reconciles WireKubeGateways, pod CIDR sync and relay endpoint discovery (see module docstring)."""

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
        self._informers = self._make_informers()
        self._cilium: k8s.Informer | None = None
        self._cilium_checked_at = float("-inf")
        self._overlay: dict[tuple[str, str], JSON] = {}
        self._memory: dict[str, GatewayMemory] = {}
        self._reported_refusals: set[Refusal] = set()
        self._was_leader = False
        self._reset_memory = False
        self.aws = (RouteFollower(settings.aws, on_change=self._wake.set, ec2=aws_ec2)
                    if settings.aws.enabled else None)
        self._aws_followed: dict[str, str] = {}
        self._aws_reported: dict[str, int] = {}
        self._aws_warned: dict[str, tuple[str, str]] = {}
        self.heartbeat = 0.0
        self.writes = 0
        self.summary = Summary()

    # ------------------------------------------------------------------ lifecycle

    def _informer(self, res: k8s.Resource, namespace: str | None = None) -> k8s.Informer:
        return k8s.Informer(self.kube, res, self._changed, namespace=namespace,
                            watch_timeout_seconds=self.settings.watch_timeout)

    def _make_informers(self) -> dict[str, k8s.Informer]:
        return {
            "gateways": self._informer(k8s.GATEWAYS),
            "peers": self._informer(k8s.PEERS),
            "meshes": self._informer(k8s.MESHES),
            "nodes": self._informer(k8s.NODES),
            "services": self._informer(k8s.SERVICES, self.settings.namespace),
            "grants": k8s.Informer(self.kube, k8s.ROUTE_GRANTS, self._changed,
                                   label_selector=f"{LABEL_MANAGED_BY}={GRANT_MANAGER}",
                                   watch_timeout_seconds=self.settings.watch_timeout),
        }

    def start(self) -> GatewayController:
        for informer in self._informers.values():
            informer.start()
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
        for informer in [*self._informers.values(), *([self._cilium] if self._cilium else [])]:
            informer.stop(0)

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for informer in self._informers.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not informer.wait_synced(left):
                return False
        return True

    @property
    def synced(self) -> bool:
        return all(i.wait_synced(0) for i in self._informers.values())

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
        snap = self._snapshot()
        next_at = now + self.settings.resync_period
        routes: list[OwnedCIDR] = []
        summaries: dict[str, GatewaySummary] = {}
        view = self._view(snap)
        aws = _AWSPass.of(snap.gateways)
        for obj in snap.gateways:
            due = self._reconcile_gateway(obj, view, routes, summaries, now, snap.nodes, aws)
            if due is not None:
                next_at = min(next_at, due)
        if self.aws is not None:
            self.aws.set_targets(aws.targets)
        self._forget_deleted(snap)
        pod_plan, pod_problem = self._sync_pod_cidrs(snap, routes)
        self._sync_grants(snap, pod_plan)
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

    def _snapshot(self) -> Snapshot:
        mesh_obj = self._fresh("meshes", self._informers["meshes"].cache.get(MESH_SINGLETON))
        mesh: Mesh | None = None
        if mesh_obj is not None:
            try:
                mesh = mesh_from_cr(mesh_obj)
            except errors.InvalidObject as e:
                self._log.error("{}; mesh-dependent checks are off", e)
        peer_objs: dict[str, JSON] = {}
        peers: dict[str, Peer] = {}
        invalid: dict[str, str] = {}
        for name, raw in self._informers["peers"].cache.items():
            obj = self._fresh("peers", raw)
            assert obj is not None
            peer_objs[name] = obj
            try:
                peers[name] = peer_from_cr(obj)
            except errors.InvalidObject as e:
                invalid[name] = str(e)
        gateways = sorted(
            (g for g in (self._fresh("gateways", o) for o in self._informers["gateways"].cache.values()) if g),
            key=lambda o: (o["metadata"].get("creationTimestamp") or "~", o["metadata"]["name"]),
        )
        services = self._informers["services"].cache
        return Snapshot(
            mesh_obj=mesh_obj,
            mesh=mesh,
            peer_objs=peer_objs,
            peers=peers,
            invalid_peers=invalid,
            nodes=self._informers["nodes"].cache,
            gateways=tuple(gateways),
            service=services.get(f"{self.settings.namespace}/{self.settings.relay_service}"),
        )

    def _view(self, snap: Snapshot) -> ClusterView:
        addresses = {name: own_addresses(obj, snap.nodes.get(name)) for name, obj in snap.peer_objs.items()}
        return ClusterView(snap.mesh, snap.peers, snap.invalid_peers, addresses)

    # ------------------------------------------------------------------ gateways

    def _reconcile_gateway(
        self,
        obj: JSON,
        view: ClusterView,
        routes: list[OwnedCIDR],
        summaries: dict[str, GatewaySummary],
        now: float,
        nodes: Mapping[str, JSON] | None = None,
        aws: _AWSPass | None = None,
    ) -> float | None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        try:
            gateway = gateway_from_cr(obj)
        except errors.InvalidObject as e:
            self._write_status("gateways", k8s.GATEWAYS, name, invalid_gateway_patch(status, str(e), now, _gen(obj)))
            summaries[name] = GatewaySummary()
            return None
        plan = plan_gateway(gateway, status, view, routes, self._memory.get(name, GatewayMemory()), now,
                            self.settings.plan)
        routes.extend(OwnedCIDR(r, f"WireKubeGateway {name}") for r in plan.routes)
        patch = plan.patch
        vpc = self._vpc_routes(obj, gateway, plan, nodes or {}, aws or _AWSPass.of([obj]))
        conditions = status.get("conditions") or []
        if vpc is not None or cond.find(conditions, VPC_ROUTES_SYNCED) is not None:
            conditions = [c for c in plan.status["conditions"] if c.get("type") != VPC_ROUTES_SYNCED]
            if vpc is not None:
                conditions = cond.set_condition(conditions, VPC_ROUTES_SYNCED, vpc[0], vpc[1], vpc[2], now, _gen(obj))
            patch = cond.merge_patch(status, {**plan.status, "conditions": conditions})
        if patch and not self._write_status("gateways", k8s.GATEWAYS, name, patch):
            return now + self.settings.error_backoff
        self._memory[name] = plan.memory
        self._record(obj, gateway, plan)
        self._record_vpc_routes(obj, name)
        summaries[name] = _summary(plan)
        return plan.recheck_at

    def _record(self, obj: JSON, gateway: Gateway, plan: GatewayPlan) -> None:
        log = self._log.bind(gateway=gateway.name)
        for ev in plan.events:
            (log.warning if ev.type == "Warning" else log.info)("{}: {}", ev.reason, ev.message)
            if ev.reason in ("GatewayActivated", "Failover", "Failback"):
                forced = any(e.reason == "HandoverForced" for e in plan.events)
                self.metrics.switches.labels(gateway.name, ev.reason, str(forced).lower()).inc()
            self.kube.emit_event(
                _regarding(obj, "WireKubeGateway"), ev.reason, ev.message, type_=ev.type, action="Elect",
                component=COMPONENT, namespace=self.settings.event_namespace,
            )

    def _forget_deleted(self, snap: Snapshot) -> None:
        names = {o["metadata"]["name"] for o in snap.gateways}
        for gone in set(self._memory) - names:
            del self._memory[gone]
        for memo in (self._aws_followed, self._aws_reported, self._aws_warned):
            for gone in set(memo) - names:
                del memo[gone]

    # ------------------------------------------------------------------ AWS VPC routes

    def _vpc_routes(
        self, obj: JSON, gateway: Gateway, plan: GatewayPlan, nodes: Mapping[str, JSON], aws: _AWSPass
    ) -> tuple[bool, str, str] | None:
        """The VPCRoutesSynced condition (status, reason, message), or None without spec.awsVPCRoutes.

        Adds the gateway's target to ``aws.targets`` when its routes may move (see
        :func:`wirekube.gateway.awsroutes.target_for`).
        """
        name = gateway.name
        spec = aws.specs.get(name)
        if spec is None:
            self._aws_followed.pop(name, None)
            return None
        if isinstance(spec, errors.InvalidObject):
            return False, "InvalidSpec", str(spec)
        if self.aws is None:
            return False, DISABLED, "the controller runs with --aws-vpc-routes=off: nothing is done in AWS"
        if name in aws.conflicts:
            return False, awsroutes.CONFLICT, aws.conflicts[name]
        target = awsroutes.target_for(
            name, spec, gateway.spec.peer_refs, str(plan.status["activePeer"]), gateway.status.forwarding,
            plan.routes, nodes, followed_peer=self._aws_followed.get(name, ""),
            default_region=self.settings.aws.default_region,
        )
        if isinstance(target, awsroutes.Waiting):
            return False, target.reason, target.message
        aws.targets[name] = target
        self._aws_followed[name] = target.active.node
        result = self.aws.result(name)
        if result is None or result.target != target:
            return False, SYNCING, (f"pointing the VPC routes at Node {target.active.node} "
                                    f"({target.active.instance_id}, {target.region})")
        return result.ok, result.reason, result.message

    def _record_vpc_routes(self, obj: JSON, name: str) -> None:
        """Events for the follower's latest outcome: routes moved, or a new failure."""
        result: SyncResult | None = self.aws.result(name) if self.aws is not None else None
        if result is None or self._aws_reported.get(name, 0) >= result.seq:
            return
        self._aws_reported[name] = result.seq
        regarding = _regarding(obj, "WireKubeGateway")
        if result.applied:
            moved = any(a.op == awsroutes.REPLACE for a in result.applied)
            t = result.target
            note = (f"VPC routes now point at {result.eni} (Node {t.active.node}, {t.active.instance_id}): "
                    + "; ".join(str(a) for a in result.applied))
            self._log.bind(gateway=name).info("{}", note)
            self.kube.emit_event(regarding, "VPCRoutesMoved" if moved else "VPCRoutesCreated", note,
                                 action="SyncVPCRoutes", component=COMPONENT, namespace=self.settings.event_namespace)
        if result.ok:
            self._aws_warned.pop(name, None)
        elif self._aws_warned.get(name) != (result.reason, result.message):
            self._aws_warned[name] = (result.reason, result.message)
            self.kube.emit_event(regarding, "VPCRoutesNotSynced", f"{result.reason}: {result.message}",
                                 type_="Warning", action="SyncVPCRoutes", component=COMPONENT,
                                 namespace=self.settings.event_namespace)

    # ------------------------------------------------------------------ pod CIDR sync

    def _sync_pod_cidrs(
        self, snap: Snapshot, routes: list[OwnedCIDR]
    ) -> tuple[PodCIDRPlan | None, tuple[str, str] | None]:
        """Apply the pod CIDR plan; returns it, or (reason, message) when sync cannot run now."""
        mesh = snap.mesh
        if mesh is None:
            return None, None
        sources = self._pod_cidr_sources(mesh, snap)
        if isinstance(sources, tuple):
            return None, sources
        plan = plan_pod_cidrs(mesh, list(snap.peers.values()), sources, routes)
        retry = False
        for update in plan.updates:
            try:
                written = self.kube.patch_merge(k8s.PEERS, update.peer, update.merge_patch())
            except errors.Conflict:
                retry = True  # the agent wrote meanwhile; the next pass re-plans from its update
                continue
            except errors.ApiError as e:
                self.metrics.errors.labels("pod-cidr").inc()
                self._log.warning("cannot update AllowedIPs of WireKubePeer {}: {}", update.peer, e)
                retry = True
                continue
            self._overlay[("peers", update.peer)] = written
            self._count_write("peers")
            self._log.bind(peer=update.peer).info(
                "pod CIDRs of {} now {}", update.peer, ",".join(map(str, update.managed)) or "none"
            )
        self._report_refusals(plan.refused, snap)
        return plan, ("Retry", "a peer changed while its AllowedIPs were updated") if retry else None

    def _sync_grants(self, snap: Snapshot, pod_plan: PodCIDRPlan | None) -> None:
        """Keep one WireKubeRouteGrant per node saying what its Node object lets it route."""
        if snap.mesh is None:
            return
        informer = self._informers["grants"]
        if not informer.wait_synced(0):
            return
        existing = []
        for obj in informer.cache.values():
            try:
                existing.append(route_grant_from_cr(obj))
            except errors.InvalidObject as e:
                self._log.warning("ignoring {}", e)
        plan = plan_grants(snap.mesh, snap.nodes, pod_plan.synced if pod_plan else {}, existing)
        for grant in plan.apply:
            try:
                self.kube.apply(k8s.ROUTE_GRANTS, route_grant_to_cr(grant))
            except errors.ApiError as e:
                self.metrics.errors.labels("route-grant").inc()
                self._log.warning("cannot write WireKubeRouteGrant {}: {}", grant.name, e)
                continue
            self._count_write("grants")
            self._log.info("route grant {} now {}", grant.name, ",".join(map(str, grant.cidrs)))
        for name in plan.delete:
            try:
                self.kube.delete(k8s.ROUTE_GRANTS, name)
            except errors.NotFound:
                pass
            except errors.ApiError as e:
                self.metrics.errors.labels("route-grant").inc()
                self._log.warning("cannot delete WireKubeRouteGrant {}: {}", name, e)
                continue
            self._log.info("route grant {} deleted (its node has nothing to grant)", name)

    def _pod_cidr_sources(self, mesh: Mesh, snap: Snapshot) -> dict[str, Any] | tuple[str, str]:
        mode = mesh.spec.pod_cidr_sync
        if mode is PodCIDRSync.NODE:
            return {name: node_pod_cidrs(obj) for name, obj in snap.nodes.items()}
        if mode is PodCIDRSync.CILIUM:
            informer = self._cilium_informer()
            if informer is None:
                return ("CiliumNodeCRDMissing", f"podCIDRSync is cilium but the CRD {CILIUM_CRD} is not installed")
            if not informer.wait_synced(0):
                return ("Syncing", "waiting for the CiliumNode informer to sync")
            return {name: cilium_pod_cidrs(obj) for name, obj in informer.cache.items()}
        return {}

    def _cilium_informer(self) -> k8s.Informer | None:
        if self._cilium is not None:
            return self._cilium
        now = self._clock()
        if now - self._cilium_checked_at < self.settings.crd_poll_period:
            return None
        self._cilium_checked_at = now
        try:
            # Listing (which the controller may do) answers 404 while the CRD is absent; reading
            # the CRD itself would need a permission the controller has no other use for.
            self.kube.list(k8s.CILIUMNODES)
        except errors.NotFound:
            return None
        except errors.ApiError as e:
            self._log.warning("cannot list CiliumNodes: {}", e)
            self._cilium_checked_at = float("-inf")
            return None
        self._cilium = self._informer(k8s.CILIUMNODES).start()
        self._cilium.wait_synced(10)
        return self._cilium

    def _report_refusals(self, refused: tuple[Refusal, ...], snap: Snapshot) -> None:
        current = set(refused)
        for r in sorted(current - self._reported_refusals, key=str):
            self._log.bind(peer=r.peer).warning("pod CIDR {} of {} refused: {}", r.cidr, r.peer, r.reason)
            regarding = snap.peer_objs.get(r.peer) or {"metadata": {"name": r.peer}}
            self.kube.emit_event(
                _regarding(regarding, "WireKubePeer"), "PodCIDRRefused",
                f"pod CIDR {r.cidr} of node {r.peer} is not added to its AllowedIPs: {r.reason}",
                type_="Warning", action="SyncPodCIDRs", component=COMPONENT, namespace=self.settings.event_namespace,
            )
        self._reported_refusals = current

    # ------------------------------------------------------------------ mesh status

    def _reconcile_mesh(
        self, snap: Snapshot, pod_plan: PodCIDRPlan | None, pod_problem: tuple[str, str] | None, now: float
    ) -> RelayDiscovery | None:
        if snap.mesh is None or snap.mesh_obj is None:
            return None
        relay = discover_relay(snap.mesh, snap.service, snap.nodes.values(), self.settings.namespace,
                               self.settings.relay_service)
        status = snap.mesh_obj.get("status") or {}
        gen = _gen(snap.mesh_obj)
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
            self._write_status("meshes", k8s.MESHES, MESH_SINGLETON, patch)
        return relay

    # ------------------------------------------------------------------ writes

    def _write_status(self, informer: str, res: k8s.Resource, name: str, patch: Mapping[str, Any]) -> bool:
        try:
            obj = self.kube.patch_status(res, name, {"status": dict(patch)})
        except errors.NotFound:
            return False  # deleted meanwhile
        except errors.ApiError as e:
            self.metrics.errors.labels(informer).inc()
            self._log.warning("cannot write status of {} {}: {}", res.kind, name, e)
            return False
        self._overlay[(informer, name)] = obj
        self._count_write(informer)
        return True

    def _count_write(self, kind: str) -> None:
        self.writes += 1
        self.metrics.writes.labels(kind).inc()

    def _fresh(self, informer: str, cached: JSON | None) -> JSON | None:
        """The cached object, or the newer one this controller just wrote (see module docstring)."""
        if cached is None:
            return None
        key = (informer, cached["metadata"]["name"])
        written = self._overlay.get(key)
        if written is None:
            return cached
        if _rv(cached) >= _rv(written):
            del self._overlay[key]
            return cached
        return written


@dataclass
class _AWSPass:
    """One pass's view of every gateway's spec.awsVPCRoutes, and the targets it collects."""

    specs: dict[str, awsroutes.VPCRoutes | errors.InvalidObject]
    conflicts: dict[str, str]
    targets: dict[str, awsroutes.Target] = field(default_factory=dict)

    @classmethod
    def of(cls, gateways: Sequence[JSON]) -> _AWSPass:
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


def _regarding(obj: Mapping[str, Any], kind: str) -> JSON:
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": kind, **obj}


def _gen(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)


def _rv(obj: Mapping[str, Any]) -> int:
    """resourceVersion as a number (etcd revisions are); unparsable counts as oldest."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
