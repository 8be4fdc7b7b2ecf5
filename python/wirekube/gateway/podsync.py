"""Pod CIDR sync and route grants: the gateway controller's writes to WireKubePeers' AllowedIPs and
to the WireKubeRouteGrants that say what each node may route."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wirekube import errors, k8s
from wirekube.gateway.caches import CILIUM_CRD, Caches, Snapshot
from wirekube.gateway.cidrs import OwnedCIDR
from wirekube.gateway.grants import plan_grants
from wirekube.gateway.podcidr import PodCIDRPlan, Refusal, cilium_pod_cidrs, node_pod_cidrs, plan_pod_cidrs
from wirekube.gateway.writes import Writer
from wirekube.models import Mesh, PodCIDRSync, route_grant_from_cr, route_grant_to_cr

if TYPE_CHECKING:
    from loguru import Logger


class PodCIDRSyncer:
    """Owns one pass's pod CIDR writes and route grant writes, and which refusals were reported."""

    def __init__(self, writer: Writer, caches: Caches, log: Logger) -> None:
        self._writer = writer
        self._kube = writer.kube
        self._metrics = writer.metrics
        self._caches = caches
        self._log = log
        self._reported_refusals: set[Refusal] = set()

    def sync_pod_cidrs(
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
                written = self._kube.patch_merge(k8s.PEERS, update.peer, update.merge_patch())
            except errors.Conflict:
                retry = True  # the agent wrote meanwhile; the next pass re-plans from its update
                continue
            except errors.ApiError as e:
                self._metrics.errors.labels("pod-cidr").inc()
                self._log.warning("cannot update AllowedIPs of WireKubePeer {}: {}", update.peer, e)
                retry = True
                continue
            self._writer.wrote("peers", update.peer, written)
            self._log.bind(peer=update.peer).info(
                "pod CIDRs of {} now {}", update.peer, ",".join(map(str, update.managed)) or "none"
            )
        self._report_refusals(plan.refused, snap)
        return plan, ("Retry", "a peer changed while its AllowedIPs were updated") if retry else None

    def sync_grants(self, snap: Snapshot, pod_plan: PodCIDRPlan | None) -> None:
        """Keep one WireKubeRouteGrant per node saying what its Node object lets it route."""
        if snap.mesh is None:
            return
        informer = self._caches.informers["grants"]
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
                self._kube.apply(k8s.ROUTE_GRANTS, route_grant_to_cr(grant))
            except errors.ApiError as e:
                self._metrics.errors.labels("route-grant").inc()
                self._log.warning("cannot write WireKubeRouteGrant {}: {}", grant.name, e)
                continue
            self._writer.count("grants")
            self._log.info("route grant {} now {}", grant.name, ",".join(map(str, grant.cidrs)))
        for name in plan.delete:
            try:
                self._kube.delete(k8s.ROUTE_GRANTS, name)
            except errors.NotFound:
                pass
            except errors.ApiError as e:
                self._metrics.errors.labels("route-grant").inc()
                self._log.warning("cannot delete WireKubeRouteGrant {}: {}", name, e)
                continue
            self._log.info("route grant {} deleted (its node has nothing to grant)", name)

    def _pod_cidr_sources(self, mesh: Mesh, snap: Snapshot) -> dict[str, Any] | tuple[str, str]:
        mode = mesh.spec.pod_cidr_sync
        if mode is PodCIDRSync.NODE:
            return {name: node_pod_cidrs(obj) for name, obj in snap.nodes.items()}
        if mode is PodCIDRSync.CILIUM:
            informer = self._caches.cilium()
            if informer is None:
                return ("CiliumNodeCRDMissing", f"podCIDRSync is cilium but the CRD {CILIUM_CRD} is not installed")
            if not informer.wait_synced(0):
                return ("Syncing", "waiting for the CiliumNode informer to sync")
            return {name: cilium_pod_cidrs(obj) for name, obj in informer.cache.items()}
        return {}

    def _report_refusals(self, refused: tuple[Refusal, ...], snap: Snapshot) -> None:
        current = set(refused)
        for r in sorted(current - self._reported_refusals, key=str):
            self._log.bind(peer=r.peer).warning("pod CIDR {} of {} refused: {}", r.cidr, r.peer, r.reason)
            self._writer.event(
                snap.peer_objs.get(r.peer) or {"metadata": {"name": r.peer}}, "WireKubePeer", "PodCIDRRefused",
                f"pod CIDR {r.cidr} of node {r.peer} is not added to its AllowedIPs: {r.reason}",
                type_="Warning", action="SyncPodCIDRs",
            )
        self._reported_refusals = current
