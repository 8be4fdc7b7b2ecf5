"""--authorize-peers end to end: the relay process watching WireKubePeer objects on a REAL API server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import RelayCli, raw_public, run
from wirekube import errors, k8s
from wirekube.lab.cluster import ControlPlane
from wirekube.relay.client import RelayClient, RelayRejected

pytestmark = pytest.mark.apiserver


def peer_body(name: str, key: X25519PrivateKey) -> dict[str, Any]:
    return {
        "apiVersion": "wirekube.io/v1alpha1",
        "kind": "WireKubePeer",
        "metadata": {"name": name},
        "spec": {"publicKey": base64.b64encode(raw_public(key)).decode(), "allowedIPs": ["10.255.0.77/32"]},
    }


async def connect_when_admitted(address: tuple[str, int], key: X25519PrivateKey, timeout: float = 20.0) -> RelayClient:
    """The informer needs a moment to see a new peer: retry refused registrations until a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await RelayClient.connect(*address, key)
        except RelayRejected:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_only_peers_in_the_cluster_register_and_removal_disconnects(
    control_plane: ControlPlane, kube: k8s.Kube, unique: str
) -> None:
    member, stranger = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    name = f"relay-authz-{unique}"
    kube.create(k8s.PEERS, peer_body(name, member))
    relay = RelayCli("--authorize-peers", "--kubeconfig", str(control_plane.kubeconfig))
    try:
        address = relay.address("tcp")

        async def scenario() -> str:
            client = await connect_when_admitted(address, member)
            with pytest.raises(RelayRejected, match="relay refused: key is not authorized") as refused:
                await RelayClient.connect(*address, stranger)
            assert "not authorized" in refused.value.reason
            await asyncio.to_thread(kube.delete, k8s.PEERS, name)
            return await asyncio.wait_for(client.wait_closed(), 30)

        reason = run(scenario(), timeout=90)
        assert "no longer authorized" in reason
    finally:
        relay.stop()
        with contextlib.suppress(errors.NotFound):  # normally deleted by the test already
            kube.delete(k8s.PEERS, name)
