"""What the gateway controller watches: its informers, and the snapshot one pass plans from."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wirekube import errors, k8s
from wirekube.gateway.clients import own_addresses
from wirekube.gateway.plan import ClusterView
from wirekube.gateway.writes import Writer
from wirekube.models import GRANT_MANAGER, LABEL_MANAGED_BY, MESH_SINGLETON, Mesh, Peer, mesh_from_cr, peer_from_cr

if TYPE_CHECKING:
    from loguru import Logger

    from wirekube.gateway.controller import ControllerSettings

JSON = dict[str, Any]
CILIUM_CRD = "ciliumnodes.cilium.io"


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

    def view(self) -> ClusterView:
        addresses = {name: own_addresses(obj, self.nodes.get(name)) for name, obj in self.peer_objs.items()}
        return ClusterView(self.mesh, self.peers, self.invalid_peers, addresses)


class Caches:
    """Owns the informers on WireKubeGateways, WireKubePeers, the WireKubeMesh, Nodes, the relay's
    namespace's Services and the controller's WireKubeRouteGrants, plus the CiliumNode informer,
    started only once pod CIDR sync asks for it and its CRD exists.  Every change calls
    ``on_change``.  :meth:`snapshot` reads them through the writer's overlay.
    """

    def __init__(
        self,
        kube: k8s.Kube,
        settings: ControllerSettings,
        on_change: Callable[[str, JSON], None],
        writer: Writer,
        clock: Callable[[], float],
        log: Logger,
    ) -> None:
        self._kube = kube
        self._settings = settings
        self._on_change = on_change
        self._writer = writer
        self._clock = clock
        self._log = log
        self.informers = {
            "gateways": self._informer(k8s.GATEWAYS),
            "peers": self._informer(k8s.PEERS),
            "meshes": self._informer(k8s.MESHES),
            "nodes": self._informer(k8s.NODES),
            "services": self._informer(k8s.SERVICES, settings.namespace),
            "grants": k8s.Informer(kube, k8s.ROUTE_GRANTS, on_change,
                                   label_selector=f"{LABEL_MANAGED_BY}={GRANT_MANAGER}",
                                   watch_timeout_seconds=settings.watch_timeout),
        }
        self._cilium: k8s.Informer | None = None
        self._cilium_checked_at = float("-inf")

    def _informer(self, res: k8s.Resource, namespace: str | None = None) -> k8s.Informer:
        return k8s.Informer(self._kube, res, self._on_change, namespace=namespace,
                            watch_timeout_seconds=self._settings.watch_timeout)

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    def stop(self) -> None:
        for informer in [*self.informers.values(), *([self._cilium] if self._cilium else [])]:
            informer.stop(0)

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for informer in self.informers.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not informer.wait_synced(left):
                return False
        return True

    @property
    def synced(self) -> bool:
        return all(i.wait_synced(0) for i in self.informers.values())

    def cilium(self) -> k8s.Informer | None:
        """The CiliumNode informer; None while its CRD is absent (checked every ``crd_poll_period``)."""
        if self._cilium is not None:
            return self._cilium
        now = self._clock()
        if now - self._cilium_checked_at < self._settings.crd_poll_period:
            return None
        self._cilium_checked_at = now
        try:
            # Listing (which the controller may do) answers 404 while the CRD is absent; reading
            # the CRD itself would need a permission the controller has no other use for.
            self._kube.list(k8s.CILIUMNODES)
        except errors.NotFound:
            return None
        except errors.ApiError as e:
            self._log.warning("cannot list CiliumNodes: {}", e)
            self._cilium_checked_at = float("-inf")
            return None
        self._cilium = self._informer(k8s.CILIUMNODES).start()
        self._cilium.wait_synced(10)
        return self._cilium

    def snapshot(self) -> Snapshot:
        fresh = self._writer.fresh
        mesh_obj = fresh("meshes", self.informers["meshes"].cache.get(MESH_SINGLETON))
        mesh: Mesh | None = None
        if mesh_obj is not None:
            try:
                mesh = mesh_from_cr(mesh_obj)
            except errors.InvalidObject as e:
                self._log.error("{}; mesh-dependent checks are off", e)
        peer_objs: dict[str, JSON] = {}
        peers: dict[str, Peer] = {}
        invalid: dict[str, str] = {}
        for name, raw in self.informers["peers"].cache.items():
            obj = fresh("peers", raw)
            assert obj is not None
            peer_objs[name] = obj
            try:
                peers[name] = peer_from_cr(obj)
            except errors.InvalidObject as e:
                invalid[name] = str(e)
        gateways = sorted(
            (g for g in (fresh("gateways", o) for o in self.informers["gateways"].cache.values()) if g),
            key=lambda o: (o["metadata"].get("creationTimestamp") or "~", o["metadata"]["name"]),
        )
        services = self.informers["services"].cache
        return Snapshot(
            mesh_obj=mesh_obj,
            mesh=mesh,
            peer_objs=peer_objs,
            peers=peers,
            invalid_peers=invalid,
            nodes=self.informers["nodes"].cache,
            gateways=tuple(gateways),
            service=services.get(f"{self._settings.namespace}/{self._settings.relay_service}"),
        )
