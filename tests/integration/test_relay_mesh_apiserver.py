"""The relay replicas find each other through a Service's EndpointSlices on a REAL API server.

The API server refuses loopback addresses in an EndpointSlice and test traffic may only go to
loopback, so the mesh here records the addresses it is told to dial instead of dialing them
(the seam is :meth:`RelayMesh.set_peers`; dialing is covered by tests/integration/test_relay_mesh.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.integration.relay_support import relay_settings, run, wait_until
from wirekube import errors, k8s
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


def test_wirekubectl_status_lists_each_replica_and_its_keys_from_their_leases(
    control_plane: ControlPlane, kube: k8s.Kube, unique: str
) -> None:
    """Two meshed replicas keep a Lease each on the real API server; `wirekubectl status` lists them
    with their key counts.  Traffic writes nothing; a replica that stops removes its Lease, and one
    that dies silently shows as stale once its lease duration has passed."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from tests.integration.relay_support import free_port
    from wirekube.cli import status
    from wirekube.relay.client import RelayClient
    from wirekube.relay.replicastatus import LeasePublisher, LeaseSettings

    names = [f"relay-a-{unique}", f"relay-b-{unique}"]

    async def scenario() -> None:
        ports = [free_port(), free_port()]
        peers = tuple(("127.0.0.1", p) for p in ports)
        relays, meshes, publishers = [], [], []
        for name, port in zip(names, ports, strict=True):
            relay = RelayServer(relay_settings())
            mesh = RelayMesh(relay, MeshSettings(secret=b"s" * 32, listen_host="127.0.0.1", listen_port=port,
                                                 peers=peers))
            await relay.start()
            await mesh.start()
            publisher = LeasePublisher(
                kube, LeaseSettings(name, "default", duration=3, renew_interval=1.0, min_interval=0.2),
                mesh.id.hex()[:8],
                lambda r=relay, m=mesh: (len(r.routes), len(m.links)))  # type: ignore[misc]
            publisher.start()
            relays.append(relay)
            meshes.append(mesh)
            publishers.append(publisher)
        clients: list[RelayClient] = []
        try:
            keys = [X25519PrivateKey.generate() for _ in range(3)]
            for key, relay in zip(keys, [relays[0], relays[0], relays[1]], strict=True):
                clients.append(await RelayClient.connect(*relay.address, key))

            def shown() -> dict[str, tuple[int, int | None, bool]]:
                report = status.fetch_report(kube)
                return {r.name: (r.keys, r.links, r.stale) for r in report.relay_replicas if r.name in names}

            async def shows(want: dict[str, tuple[int, int | None, bool]], what: str) -> None:
                seen: dict[str, tuple[int, int | None, bool]] = {}
                deadline = asyncio.get_running_loop().time() + 30
                while asyncio.get_running_loop().time() < deadline:
                    seen = await asyncio.to_thread(shown)
                    if seen == want:
                        return
                    await asyncio.sleep(0.2)
                raise AssertionError(f"wirekubectl status: {what}: want {want}, saw {seen}")

            await shows({names[0]: (2, 1, False), names[1]: (1, 1, False)}, "two keys on A, one on B")
            text = status.render_table(await asyncio.to_thread(status.fetch_report, kube))
            row = next(line for line in text.splitlines() if line.startswith(names[0]))
            assert row.split()[3] == "2", text

            # Steady traffic between A's clients: no write beyond the renewals (1 s here).
            before = [p.writes for p in publishers]
            got: list[bytes] = []
            receiver = await RelayClient.connect(*relays[1].address, X25519PrivateKey.generate(),
                                                 on_data=lambda _src, d: got.append(d))
            clients.append(receiver)
            sender = clients[0]
            t0 = asyncio.get_running_loop().time()
            for i in range(2000):
                sender.send(receiver.public_key, b"x" * 100)
                if i % 100 == 0:
                    await asyncio.sleep(0.05)
            await wait_until(lambda: len(got) >= 1000, 20, "the frames across the mesh")
            elapsed = asyncio.get_running_loop().time() - t0
            extra = [p.writes - b for p, b in zip(publishers, before, strict=True)]
            # B's key count changed once (the receiver); otherwise only renewals.
            assert extra[0] <= elapsed / 1.0 + 2 and extra[1] <= elapsed / 1.0 + 3, (extra, elapsed, len(got))

            await clients.pop().close()
            await shows({names[0]: (2, 1, False), names[1]: (1, 1, False)}, "the receiver gone from B")
            # A stops cleanly: its Lease goes.  B dies silently (no more writes, Lease left): stale.
            await publishers[0].close(delete=True)
            await publishers[1].close(delete=False)
            await shows({names[1]: (1, 1, True)}, "A removed, B stale after its 3 s lease")
        finally:
            for c in clients:
                await c.close()
            for p in publishers:
                await p.close(delete=False)
            for m in meshes:
                await m.close()
            for r in relays:
                await r.close(timeout=1.0)

    try:
        run(scenario(), timeout=120)
    finally:
        for name in names:
            with contextlib.suppress(errors.NotFound):
                kube.delete(k8s.LEASES, name, "default")


def test_the_relay_process_keeps_its_lease_and_removes_it_on_sigterm(
    control_plane: ControlPlane, kube: k8s.Kube, unique: str
) -> None:
    """`wirekube-relay --status-lease` itself: the Lease appears (0 keys, not in a mesh) and goes
    when the relay stops."""
    import signal
    import subprocess
    import sys

    from tests.fixtures.wait import wait_for
    from wirekube.relay.replicastatus import replica_rows

    name = f"relay-cli-{unique}"
    proc = subprocess.Popen([sys.executable, "-m", "wirekube.relay.cli", "--listen", "127.0.0.1:0",
                             "--stun-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                             "--status-lease", name, "--status-namespace", "default",
                             "--kubeconfig", str(control_plane.kubeconfig), "--log-format", "text"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def lease() -> dict[str, Any] | None:
            try:
                return kube.get(k8s.LEASES, name, "default")
            except errors.NotFound:
                return None

        found = wait_for(lambda: lease() or proc.poll() is not None, 90, f"Lease {name}")  # slow under load
        assert proc.poll() is None, f"the relay exited: {proc.communicate()[1][-2000:]}"
        [row] = replica_rows([found], __import__("time").time())
        assert (row.keys, row.links, row.stale) == (0, None, False)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert lease() is None, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(errors.NotFound):
            kube.delete(k8s.LEASES, name, "default")
