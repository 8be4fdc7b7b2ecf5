"""The relay replicas find each other through a Service's EndpointSlices on a REAL API server.

The API server refuses loopback addresses in an EndpointSlice and test traffic may only go to
loopback, so the mesh here records the addresses it is told to dial instead of dialing them
(the seam is :meth:`RelayMesh.set_peers`; dialing is covered by tests/integration/test_relay_mesh.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.test_relay_support import relay_settings, run, wait_until
from wirekube import k8s
from wirekube.lab.cluster import ControlPlane
from wirekube.relay.cli import watch_mesh_peers
from wirekube.relay.mesh import MeshSettings, RelayMesh
from wirekube.relay.server import RelayServer

pytestmark = pytest.mark.apiserver


def slice_body(name: str, service: str, addresses: list[str], port: int, terminating: bool = False) -> dict[str, Any]:
    """What the EndpointSlice controller writes for relay pods (no controller-manager runs here)."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": False, "terminating": terminating}}
                      for a in addresses],
        "ports": [{"name": "mesh", "port": port, "protocol": "TCP"}],
    }


def test_the_mesh_dials_every_replica_in_the_services_endpoint_slices(
    control_plane: ControlPlane, kube: k8s.Kube, unique: str
) -> None:
    service = f"relay-mesh-{unique}"
    kube.create(k8s.ENDPOINTSLICES, slice_body(f"{service}-a", service, ["192.0.2.10", "192.0.2.11"], 3480), "default")
    kube.create(k8s.ENDPOINTSLICES, slice_body(f"{service}-b", service, ["192.0.2.12"], 3490), "default")
    kube.create(k8s.ENDPOINTSLICES, slice_body(f"other-{unique}", f"other-{unique}", ["192.0.2.99"], 3480), "default")
    told: list[list[tuple[str, int]]] = []

    async def scenario() -> None:
        relay = RelayServer(relay_settings())
        mesh = RelayMesh(relay, MeshSettings(secret=b"x" * 32, listen_host="127.0.0.1", listen_port=0))
        mesh.set_peers = lambda peers: told.append(sorted(peers))  # type: ignore[method-assign]
        stop = watch_mesh_peers(mesh, service, "default", str(control_plane.kubeconfig))
        try:
            want = [("192.0.2.10", 3480), ("192.0.2.11", 3480), ("192.0.2.12", 3490)]
            await wait_until(lambda: bool(told) and told[-1] == want, 30, "the slices' addresses")
            await asyncio.to_thread(kube.replace, k8s.ENDPOINTSLICES, {
                **kube.get(k8s.ENDPOINTSLICES, f"{service}-b", "default"),
                "endpoints": [{"addresses": ["192.0.2.12"], "conditions": {"terminating": True}}]}, "default")
            await wait_until(lambda: told[-1] == want[:2], 30, "a terminating replica to be dropped")
        finally:
            await asyncio.to_thread(stop)

    try:
        run(scenario(), timeout=90)
    finally:
        for name in (f"{service}-a", f"{service}-b", f"other-{unique}"):
            kube.delete(k8s.ENDPOINTSLICES, name, "default")
