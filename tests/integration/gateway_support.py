"""Shared by the gateway controller's API-server tests: the objects a test creates, agents that
follow wirekube.gateway.contract, and readers of status, conditions and Events."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.fixtures.keys import public_key
from wirekube import errors, ipam, k8s, models
from wirekube.gateway import contract
from wirekube.gateway.controller import ControllerSettings
from wirekube.gateway.plan import PlanSettings

HC = {"enabled": True, "target": "10.0.0.1:443", "intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}
API = "wirekube.io/v1alpha1"


class Objects:
    """Creates cluster objects for one test and deletes them afterwards (the cluster is shared)."""

    def __init__(self, kube: k8s.Kube, unique: str) -> None:
        self.kube = kube
        self.unique = unique
        self._made: list[tuple[k8s.Resource, str, str | None]] = []
        self.mesh_cidr = models.mesh_from_cr(self.mesh()).spec.mesh_cidr

    def mesh(self) -> dict[str, Any]:
        try:
            return self.kube.get(k8s.MESHES, "default")
        except errors.NotFound:
            body = {"apiVersion": API, "kind": "WireKubeMesh", "metadata": {"name": "default"}, "spec": {}}
            return self.kube.create(k8s.MESHES, body)

    def set_mesh(self, **spec: Any) -> None:
        self.mesh()
        self.kube.patch_merge(k8s.MESHES, "default", {"spec": spec})

    def create(self, res: k8s.Resource, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        obj = self.kube.create(res, body, namespace)
        self._made.append((res, body["metadata"]["name"], namespace))
        return obj

    def namespace(self) -> str:
        name = f"gw-{self.unique}"
        self.create(k8s.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        return name

    def peer(self, name: str, *extra: str, connected: bool = True) -> dict[str, Any]:
        mesh_ip = ipam.mesh_ip(name, self.mesh_cidr)
        body = {"apiVersion": API, "kind": "WireKubePeer", "metadata": {"name": name},
                "spec": {"publicKey": public_key(), "allowedIPs": [f"{mesh_ip}/32", *extra]}}
        self.create(k8s.PEERS, body)
        return self.kube.patch_status(k8s.PEERS, name, {"status": {"connected": connected}})

    def node(self, name: str, pod_cidrs: list[str] | None = None, addresses: dict[str, str] | None = None) -> None:
        spec = {"podCIDRs": pod_cidrs} if pod_cidrs else {}
        self.create(k8s.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec})
        status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Test",
                                                  "message": "", "lastHeartbeatTime": None}]}
        status["addresses"] = [{"type": t, "address": a} for t, a in (addresses or {}).items()]
        self.kube.patch_status(k8s.NODES, name, {"status": status})

    def gateway(self, name: str, peer_refs: list[str], routes: list[str], **spec: Any) -> None:
        body = {"apiVersion": API, "kind": "WireKubeGateway", "metadata": {"name": name},
                "spec": {"peerRefs": peer_refs, "routes": [{"cidr": r} for r in routes], **spec}}
        self.create(k8s.GATEWAYS, body)

    def cleanup(self) -> None:
        for res, name, ns in reversed(self._made):
            try:
                self.kube.delete(res, name, ns)
            except errors.ApiError:
                pass


class FakeGatewayAgents:
    """Health reports (every ``period``) and forwarding acknowledgements for some gateway peers."""

    def __init__(self, kubeconfig: str, gateway: str, peers: list[str], period: float = 0.25) -> None:
        self.kube = k8s.Kube.from_kubeconfig(kubeconfig)
        self.gateway = gateway
        self.peers = peers
        self.period = period
        self.failures: dict[str, int] = {p: 0 for p in peers}
        self.dead: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeGatewayAgents:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.kube.close()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for peer in self.peers:
                if peer not in self.dead:
                    try:
                        self._act(peer)
                    except errors.ApiError:
                        pass  # the gateway was deleted at the end of the test

    def _act(self, peer: str) -> None:
        report = models.HealthReport(contract.rfc3339(time.time()), self.failures[peer])
        self.kube.patch_status(k8s.GATEWAYS, self.gateway, contract.health_report_patch(peer, report))
        gw = models.gateway_from_cr(self.kube.get(k8s.GATEWAYS, self.gateway))
        duty = contract.forwarding_duty(gw, peer)
        ack = gw.status.forwarding.get(peer)
        if duty is not None and (ack is None or set(ack.routes) != set(duty.routes) or ack.epoch != duty.epoch):
            self.kube.patch_status(k8s.GATEWAYS, self.gateway,
                                   contract.forwarding_ack_patch(peer, duty.routes, duty.epoch))
        elif duty is None and ack is not None:
            self.kube.patch_status(k8s.GATEWAYS, self.gateway, contract.forwarding_ack_patch(peer, None))


# ---- controllers --------------------------------------------------------------------------------------


def settings(namespace: str, **kw: Any) -> ControllerSettings:
    base: dict[str, Any] = dict(
        namespace=namespace, relay_service="wirekube-relay", leader_elect=False, lease_name="wirekube-gateway",
        lease_duration=2.0, renew_deadline=1.5, retry_period=0.2, resync_period=5.0, error_backoff=0.3,
        crd_poll_period=0.5, watch_timeout=10, plan=PlanSettings(handover_timeout=3.0, failback_after=60.0),
    )
    base.update(kw)
    return ControllerSettings(**base)


def status(kube: k8s.Kube, res: k8s.Resource, name: str) -> dict[str, Any]:
    return kube.get(res, name).get("status") or {}


def events_about(kube: k8s.Kube, name: str, reason: str) -> list[dict[str, Any]]:
    items, _ = kube.list(k8s.EVENTS, "default")
    return [e for e in items if e["regarding"]["name"] == name and e["reason"] == reason]


def condition(obj_status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj_status.get("conditions") or [] if c["type"] == type_), {})


# ---- tests --------------------------------------------------------------------------------------------
