"""The gateway controller against the REAL kube-apiserver + etcd.

The gateway peers' agents are played by :class:`FakeGatewayAgents`, which follows
:mod:`wirekube.gateway.contract` exactly (health reports as heartbeats, forwarding
acknowledgements with the handover epoch), so these tests exercise the same status handshake a
real agent will.  Every wait has a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fixtures.wait import wait_for
from tests.integration.gateway_support import (
    HC,
    FakeGatewayAgents,
    Objects,
    condition,
    events_about,
    settings,
    status,
)
from wirekube import errors, ipam, k8s, models
from wirekube.gateway.controller import GatewayController
from wirekube.gateway.podcidr import ANNOTATION_POD_CIDRS
from wirekube.lab.cluster import ControlPlane

pytestmark = pytest.mark.apiserver

# ---- objects ---------------------------------------------------------------------------------------


@pytest.fixture
def objects(kube: k8s.Kube, unique: str) -> Iterator[Objects]:
    made = Objects(kube, unique)
    yield made
    made.cleanup()


# ---- the agents of gateway peers, by the contract ---------------------------------------------------


@pytest.fixture
def controllers(control_plane: ControlPlane) -> Iterator[Callable[..., GatewayController]]:
    """Starts controllers, each with its own API client as in production; stops them afterwards."""
    started: list[GatewayController] = []

    def start(namespace: str, **kw: Any) -> GatewayController:
        c = GatewayController(k8s.Kube.from_kubeconfig(control_plane.kubeconfig), settings(namespace, **kw)).start()
        started.append(c)
        assert c.wait_synced(20)
        return c

    yield start
    for c in started:
        c.stop()
        c.kube.close()


def gateway_setup(objects: Objects, u: str) -> tuple[str, str, str, str]:
    a, b, h = f"gwa-{u}", f"gwb-{u}", f"hyb-{u}"
    for name in (a, b, h):
        objects.peer(name)
    route = f"172.31.{int(u[:2], 16)}.0/24"
    objects.gateway(f"gw-{u}", [a, b], [route], healthCheck=HC)
    return a, b, h, route


def test_elects_then_fails_over_when_the_active_peer_turns_unhealthy(
    kube: k8s.Kube, control_plane: ControlPlane, objects: Objects, controllers: Callable[..., GatewayController],
    unique: str,
) -> None:
    a, b, h, route = gateway_setup(objects, unique)
    gw = f"gw-{unique}"
    with FakeGatewayAgents(control_plane.kubeconfig, gw, [a, b]) as agents:
        controllers(objects.namespace())
        # Ready needs only the active peer healthy; wait until both fake agents have reported too.
        st = wait_for(lambda: (s := status(kube, k8s.GATEWAYS, gw)).get("ready")
                      and s.get("peerHealth") == {a: "healthy", b: "healthy"} and s, what="gateway ready, both healthy")
        assert st["activePeer"] == a and st["pendingPeer"] == ""
        assert st["routes"] == [route] and st["routesInjected"] == 1 and h in st["clients"]
        assert a not in st["clients"] and b not in st["clients"]
        assert condition(st, "Ready")["status"] == "True" and st["peerHealth"] == {a: "healthy", b: "healthy"}
        wait_for(lambda: events_about(kube, gw, "GatewayActivated"), what="GatewayActivated event")

        agents.failures[a] = 2  # reaches failureThreshold
        st = wait_for(lambda: (s := status(kube, k8s.GATEWAYS, gw))["activePeer"] == b and s.get("ready") and s,
                      what="failover to b")
        assert st["peerHealth"][a] == "unhealthy"
        # clients moved only after b acknowledged this very handover
        assert st["forwarding"][b]["epoch"] == st["handoverEpoch"] and st["forwarding"][b]["routes"] == [route]
        (event,) = wait_for(lambda: events_about(kube, gw, "Failover"), what="Failover event")
        assert event["type"] == "Warning" and f"from {a} to {b}" in event["note"]
        assert "HealthCheckFailing" in event["note"]
        # the old gateway withdrew its acknowledgement (its agent removed its rules)
        wait_for(lambda: a not in (status(kube, k8s.GATEWAYS, gw).get("forwarding") or {}), what="a withdraws")


def test_killed_gateway_agent_fails_over_within_the_staleness_window(
    kube: k8s.Kube, control_plane: ControlPlane, objects: Objects, controllers: Callable[..., GatewayController],
    unique: str,
) -> None:
    a, b, _, _ = gateway_setup(objects, unique)
    gw = f"gw-{unique}"
    with FakeGatewayAgents(control_plane.kubeconfig, gw, [a, b]) as agents:
        controllers(objects.namespace())
        wait_for(lambda: status(kube, k8s.GATEWAYS, gw).get("ready"), what="gateway ready")
        killed = time.monotonic()
        agents.dead.add(a)  # no more reports, no more acknowledgements
        st = wait_for(lambda: (s := status(kube, k8s.GATEWAYS, gw))["activePeer"] == b and s, timeout=15,
                      what="failover after a's agent died")
        gap = time.monotonic() - killed
        print(f"\ngateway failover after agent death: {gap * 1000:.0f} ms "
              f"(interval 1 s, threshold 2, timeout 1 s -> stale after 3 s)")
        assert 2.0 < gap < 5.0  # not before the reports can be stale, within the 5 s goal
        assert st["peerHealth"][a] == "unknown"
        (event,) = wait_for(lambda: events_about(kube, gw, "Failover"), what="Failover event")
        assert "HealthReportStale" in event["note"]


def _get(kube: k8s.Kube, res: k8s.Resource, name: str) -> dict[str, Any] | None:
    try:
        return kube.get(res, name)
    except errors.NotFound:
        return None


def test_pod_cidr_sync_from_node_spec(
    kube: k8s.Kube, objects: Objects, controllers: Callable[..., GatewayController], unique: str
) -> None:
    n1, n2 = f"pn1-{unique}", f"pn2-{unique}"
    second = int(unique[:2], 16) % 200 + 20
    pod1, user = f"10.{second}.1.0/24", "192.168.77.0/24"
    objects.peer(n1, user)
    objects.peer(n2)
    objects.node(n1, [pod1])
    bad = str(ipam.mesh_ip(n2, objects.mesh_cidr)).rsplit(".", 1)[0] + ".0/24"  # inside the mesh CIDR
    objects.node(n2, [bad])
    objects.set_mesh(podCIDRSync="node")
    try:
        controllers(objects.namespace())
        peer = wait_for(lambda: (p := kube.get(k8s.PEERS, n1))["spec"]["allowedIPs"][-1] == pod1 and p,
                        what="pod CIDR synced into the peer")
        assert peer["spec"]["allowedIPs"][1] == user  # the user's entry survives, in place
        assert peer["metadata"]["annotations"][ANNOTATION_POD_CIDRS] == pod1
        (event,) = wait_for(lambda: events_about(kube, n2, "PodCIDRRefused"), what="refusal event")
        assert "mesh CIDR" in event["note"] and event["type"] == "Warning"
        assert kube.get(k8s.PEERS, n2)["spec"]["allowedIPs"] == [f"{ipam.mesh_ip(n2, objects.mesh_cidr)}/32"]
        mesh_cond = wait_for(lambda: condition(status(kube, k8s.MESHES, "default"), "PodCIDRSync").get("reason")
                             == "Refused" and condition(status(kube, k8s.MESHES, "default"), "PodCIDRSync"))
        assert n2 in mesh_cond["message"]
        # What the Node says is granted to that node (and only that): the agents' authority.
        grant = wait_for(lambda: _get(kube, k8s.ROUTE_GRANTS, f"node.{n1}"), what="route grant of n1")
        assert grant["spec"] == {"nodes": [n1], "cidrs": [pod1],
                                 "description": f"kept by the gateway controller from Node {n1}"}
        assert grant["metadata"]["labels"][models.LABEL_MANAGED_BY] == models.GRANT_MANAGER
        assert _get(kube, k8s.ROUTE_GRANTS, f"node.{n2}") is None  # its pod CIDR was refused: nothing granted

        objects.set_mesh(podCIDRSync="none")  # turning it off removes only what was synced
        peer = wait_for(lambda: (p := kube.get(k8s.PEERS, n1))["spec"]["allowedIPs"][-1] == user and p,
                        what="synced pod CIDR removed")
        assert ANNOTATION_POD_CIDRS not in (peer["metadata"].get("annotations") or {})
        wait_for(lambda: _get(kube, k8s.ROUTE_GRANTS, f"node.{n1}") is None, what="grant removed with the sync")
    finally:
        objects.set_mesh(podCIDRSync="none")


def test_cilium_sync_without_the_crd_says_so_and_touches_nothing(
    kube: k8s.Kube, objects: Objects, controllers: Callable[..., GatewayController], unique: str
) -> None:
    try:
        kube.get(k8s.CRDS, "ciliumnodes.cilium.io")
        pytest.skip("the CiliumNode CRD is already installed in this cluster")
    except errors.NotFound:
        pass
    name = f"nocil-{unique}"
    objects.peer(name, "192.168.78.0/24")
    objects.set_mesh(podCIDRSync="cilium")
    try:
        controllers(objects.namespace())
        cond = wait_for(lambda: (c := condition(status(kube, k8s.MESHES, "default"), "PodCIDRSync"))
                        .get("reason") == "CiliumNodeCRDMissing" and c, what="missing CRD reported")
        assert cond["status"] == "False" and "ciliumnodes.cilium.io" in cond["message"]
        assert kube.get(k8s.PEERS, name)["spec"]["allowedIPs"][1:] == ["192.168.78.0/24"]
    finally:
        objects.set_mesh(podCIDRSync="none")


CILIUM_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "ciliumnodes.cilium.io"},
    "spec": {
        "group": "cilium.io",
        "scope": "Cluster",
        "names": {"kind": "CiliumNode", "listKind": "CiliumNodeList", "plural": "ciliumnodes",
                  "singular": "ciliumnode", "shortNames": ["cn"]},
        "versions": [{
            "name": "v2", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "properties": {"ipam": {"type": "object", "properties": {
                    "podCIDRs": {"type": "array", "items": {"type": "string"}}}}}}}}},
        }],
    },
}


@pytest.fixture(scope="module")
def cilium_crd(kube: k8s.Kube) -> None:
    try:
        kube.create(k8s.CRDS, CILIUM_CRD)
    except errors.AlreadyExists:
        pass

    def established() -> bool:
        conds = (kube.get(k8s.CRDS, "ciliumnodes.cilium.io").get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    wait_for(established, what="CiliumNode CRD established")
    wait_for(lambda: kube.list(k8s.CILIUMNODES) is not None, what="CiliumNode API served")


def test_pod_cidr_sync_from_ciliumnodes(
    kube: k8s.Kube, objects: Objects, controllers: Callable[..., GatewayController], unique: str, cilium_crd: None
) -> None:
    name = f"cil-{unique}"
    second = int(unique[:2], 16) % 200 + 20
    first_cidr, second_cidr = f"10.{second}.128.0/25", f"10.{second}.129.0/25"
    objects.peer(name)
    objects.create(k8s.CILIUMNODES, {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name},
                                     "spec": {"ipam": {"podCIDRs": [first_cidr]}}})
    objects.set_mesh(podCIDRSync="cilium")
    try:
        controllers(objects.namespace())
        wait_for(lambda: kube.get(k8s.PEERS, name)["spec"]["allowedIPs"][1:] == [first_cidr], what="cilium sync")
        kube.patch_merge(k8s.CILIUMNODES, name, {"spec": {"ipam": {"podCIDRs": [second_cidr]}}})
        peer = wait_for(lambda: (p := kube.get(k8s.PEERS, name))["spec"]["allowedIPs"][1:] == [second_cidr] and p,
                        what="changed CiliumNode pod CIDR replaces the old one")
        assert peer["metadata"]["annotations"][ANNOTATION_POD_CIDRS] == second_cidr
        st = wait_for(lambda: condition(status(kube, k8s.MESHES, "default"), "PodCIDRSync").get("reason") == "Synced")
        assert st
    finally:
        objects.set_mesh(podCIDRSync="none")


def relay_service(name: str, kind: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": kind, "selector": {"app": "relay"},
                     "ports": [{"name": "relay", "port": 3478, "targetPort": 3478, "protocol": "TCP"}]}}


def test_relay_endpoints_from_a_load_balancer_service(
    kube: k8s.Kube, objects: Objects, controllers: Callable[..., GatewayController]
) -> None:
    ns = objects.namespace()
    objects.set_mesh(relay={"provider": "managed"})
    objects.create(k8s.SERVICES, relay_service("wirekube-relay", "LoadBalancer"), ns)
    controllers(ns)
    pending = wait_for(lambda: (c := condition(status(kube, k8s.MESHES, "default"), "RelayEndpointsReady"))
                       .get("reason") == "LoadBalancerPending" and c, what="pending LB reported")
    assert pending["status"] == "False"
    hostname = "relay-0123.elb.us-west-2.amazonaws.com"
    kube.patch_status(k8s.SERVICES, "wirekube-relay",
                      {"status": {"loadBalancer": {"ingress": [{"hostname": hostname}, {"ip": "52.8.9.10"}]}}}, ns)
    relay = wait_for(lambda: (status(kube, k8s.MESHES, "default").get("relay") or {}).get("endpoints")
                     and status(kube, k8s.MESHES, "default")["relay"], what="relay endpoints published")
    assert relay["endpoints"] == [f"{hostname}:3478", "52.8.9.10:3478"]
    assert relay["source"] == f"LoadBalancer {ns}/wirekube-relay"
    assert models.mesh_from_cr(kube.get(k8s.MESHES, "default")).status.relay_endpoints[1].host == "52.8.9.10"


def test_relay_endpoints_from_a_node_port_service(
    kube: k8s.Kube, objects: Objects, controllers: Callable[..., GatewayController], unique: str
) -> None:
    ns = objects.namespace()
    objects.set_mesh(relay={"provider": "managed"})
    objects.node(f"np-{unique}", addresses={"InternalIP": "10.1.2.3", "ExternalIP": "198.51.100.77"})
    svc = objects.create(k8s.SERVICES, relay_service("wirekube-relay", "NodePort"), ns)
    node_port = svc["spec"]["ports"][0]["nodePort"]  # allocated by the API server
    controllers(ns)
    relay = wait_for(lambda: (r := status(kube, k8s.MESHES, "default").get("relay") or {}).get("source")
                     == f"NodePort {ns}/wirekube-relay" and r, what="NodePort endpoints published")
    assert f"198.51.100.77:{node_port}" in relay["endpoints"]
    assert f"10.1.2.3:{node_port}" not in relay["endpoints"]  # the node's ExternalIP is preferred


def test_two_controllers_only_the_leader_acts(
    kube: k8s.Kube, control_plane: ControlPlane, objects: Objects, controllers: Callable[..., GatewayController],
    unique: str,
) -> None:
    ns = objects.namespace()
    lease = f"lease-{unique}"
    first = controllers(ns, leader_elect=True, lease_name=lease, identity="one")
    second = controllers(ns, leader_elect=True, lease_name=lease, identity="two")
    leader, standby = wait_for(
        lambda: (first, second) if first.is_leader else (second, first) if second.is_leader else None,
        what="a leader")
    a, _, _, _ = gateway_setup(objects, unique)
    gw = f"gw-{unique}"
    with FakeGatewayAgents(control_plane.kubeconfig, gw, [a]):
        wait_for(lambda: status(kube, k8s.GATEWAYS, gw).get("activePeer") == a, what="leader elects")
        assert leader.writes > 0 and standby.writes == 0 and not standby.is_leader
        holder = kube.get(k8s.LEASES, lease, ns)["spec"]["holderIdentity"]
        assert holder == leader.settings.identity
        leader.stop()  # releases the Lease
        wait_for(lambda: standby.is_leader, timeout=10, what="standby takes over")
        kube.patch_merge(k8s.GATEWAYS, gw, {"spec": {"routes": [{"cidr": "172.30.0.0/24"}]}})
        wait_for(lambda: status(kube, k8s.GATEWAYS, gw).get("routes") == ["172.30.0.0/24"], what="new leader acts")
        wait_for(lambda: standby.writes > 0, what="the new leader counted its writes")


def test_command_runs_leads_serves_metrics_and_releases_its_lease_on_sigterm(
    kube: k8s.Kube, control_plane: ControlPlane, objects: Objects, unique: str
) -> None:
    import signal
    import subprocess
    import sys
    import urllib.request

    from wirekube.lab.cluster import free_port

    ns = objects.namespace()
    port = free_port("127.0.0.1")
    lease = f"cli-{unique}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wirekube.gateway.main", "--kubeconfig", str(control_plane.kubeconfig),
         "--namespace", ns, "--metrics-listen", f"127.0.0.1:{port}", "--leader-elect", "--lease-name", lease,
         "--retry-period", "0.2", "--lease-duration", "3", "--renew-deadline", "2", "--log-format", "text"],
        stderr=subprocess.PIPE, text=True,
    )

    def scrape(path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    try:
        wait_for(lambda: scrape("/readyz") == "ok\n", what="controller ready")
        wait_for(lambda: "wirekube_gateway_leader 1.0" in scrape("/metrics"), what="controller leads")
        assert kube.get(k8s.LEASES, lease, ns)["spec"]["holderIdentity"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert kube.get(k8s.LEASES, lease, ns)["spec"]["holderIdentity"] == ""  # handed over at once
    assert "gateway controller started" in (proc.stderr.read() if proc.stderr else "")
