"""The CRDs and the Kubernetes adapter against the REAL kube-apiserver + etcd."""

from __future__ import annotations

import copy
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.keys import public_key
from tests.fixtures.wait import wait_for
from wirekube import errors, k8s, models
from wirekube.lab.cluster import ControlPlane

pytestmark = pytest.mark.apiserver


def peer_body(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"publicKey": public_key(), "allowedIPs": ["10.255.0.9/32"], "endpoint": "192.0.2.10:51820"}
    body.update(spec)
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer", "metadata": {"name": name}, "spec": body}


def test_crds_established(kube: k8s.Kube) -> None:
    items, _ = kube.list(k8s.CRDS)
    names = {i["metadata"]["name"] for i in items}
    assert {"wirekubepeers.wirekube.io", "wirekubemeshes.wirekube.io", "wirekubegateways.wirekube.io"} <= names


def test_valid_objects_are_admitted_with_defaults(kube: k8s.Kube, unique: str) -> None:
    created = kube.create(k8s.PEERS, peer_body(f"ok-{unique}", endpoint="[2001:db8::1]:51820"))
    assert created["spec"]["persistentKeepalive"] == 25  # default applied by the API server
    p = models.peer_from_cr(created)
    assert p.spec.endpoint is not None and p.spec.endpoint.port == 51820

    gw = kube.create(
        k8s.GATEWAYS,
        {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeGateway", "metadata": {"name": f"gw-{unique}"},
         "spec": {"peerRefs": ["a"], "routes": [{"cidr": "10.100.0.0/16"}], "healthCheck": {"enabled": False}}},
    )
    assert gw["spec"]["snat"] if "snat" in gw["spec"] else True
    g = models.gateway_from_cr(gw)
    assert g.spec.health_check.interval_seconds == 30 and g.spec.health_check.failure_threshold == 3
    # The cluster is shared with the gateway tests: a leftover 10.100.0.0/16 route would win every
    # later gateway's overlapping route (the controller rejects the newer one, correctly).
    kube.delete(k8s.GATEWAYS, f"gw-{unique}")


def test_mesh_singleton_and_defaults(kube: k8s.Kube) -> None:
    try:
        kube.delete(k8s.MESHES, "default")
    except errors.NotFound:
        pass
    mesh = kube.create(k8s.MESHES, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeMesh",
                                    "metadata": {"name": "default"}, "spec": {}})
    m = models.mesh_from_cr(mesh)
    assert m.spec == models.MeshSpec()
    with pytest.raises(errors.Invalid, match="singleton"):
        kube.create(k8s.MESHES, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeMesh",
                                 "metadata": {"name": "other"}, "spec": {}})
    with pytest.raises(errors.Invalid, match="immutable"):
        kube.patch_merge(k8s.MESHES, "default", {"spec": {"meshCIDR": "10.254.0.0/16"}})


BAD_PEERS: list[tuple[str, dict[str, Any], str]] = [
    ("bad-key", {"publicKey": "notakey"}, "spec.publicKey"),
    ("bad-key-charset", {"publicKey": "!" * 43 + "="}, "spec.publicKey"),
    ("bad-cidr", {"allowedIPs": ["10.255.0.9/33"]}, "spec.allowedIPs[0]"),
    ("host-bits", {"allowedIPs": ["10.255.0.9/32", "10.0.0.1/24"]}, "spec.allowedIPs[1]"),
    ("default-route", {"allowedIPs": ["0.0.0.0/0"]}, "spec.allowedIPs[0]"),
    ("bad-port", {"endpoint": "192.0.2.1:65536"}, "spec.endpoint"),
    ("bad-endpoint", {"endpoint": "example.com:51820"}, "spec.endpoint"),
    ("bad-v6", {"endpoint": "[zz::1]:51820"}, "spec.endpoint"),
    ("keepalive", {"persistentKeepalive": 70000}, "spec.persistentKeepalive"),
    ("unknown-field", {"bogus": 1}, "spec.bogus"),
]


@pytest.mark.parametrize(("case", "change", "field"), BAD_PEERS, ids=[c[0] for c in BAD_PEERS])
def test_bad_peer_rejected_by_api_server(kube: k8s.Kube, unique: str, case: str, change: dict[str, Any],
                                         field: str) -> None:
    with pytest.raises(errors.Invalid, match=re.escape(field)) as err:
        kube.create(k8s.PEERS, peer_body(f"{case}-{unique}", **change))
    assert field in str(err.value)
    with pytest.raises(errors.NotFound, match=f"\"{case}-{unique}\" not found"):
        kube.get(k8s.PEERS, f"{case}-{unique}")


def test_bad_status_enum_rejected(kube: k8s.Kube, unique: str) -> None:
    kube.create(k8s.PEERS, peer_body(f"st-{unique}"))
    with pytest.raises(errors.Invalid, match=r"status.natType"):
        kube.patch_status(k8s.PEERS, f"st-{unique}", {"status": {"natType": "weird"}})


BAD_MESH_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"meshCIDR": "10.0.0.0/31"}, "spec.meshCIDR"),
    ({"meshCIDR": "10.0.0.1/16"}, "spec.meshCIDR"),
    ({"listenPort": 0}, "spec.listenPort"),
    ({"mtu": 9001}, "spec.mtu"),
    ({"mtu": "big"}, "spec.mtu"),
    ({"relay": {"mode": "sometimes"}}, "spec.relay.mode"),
    ({"relay": {"provider": "external"}}, "spec.relay"),
    ({"stunServers": ["one:3478"]}, "spec.stunServers"),
]


@pytest.mark.parametrize(("spec", "field"), BAD_MESH_SPECS)
def test_bad_mesh_rejected_by_api_server(kube: k8s.Kube, spec: dict[str, Any], field: str) -> None:
    body = {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeMesh", "metadata": {"name": "default"}, "spec": spec}
    with pytest.raises(errors.Invalid, match=re.escape(field)) as err:
        kube.create(k8s.MESHES, body)
    assert field in str(err.value)


def test_bad_gateway_rejected_by_api_server(kube: k8s.Kube, unique: str) -> None:
    base = {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeGateway", "metadata": {"name": f"g-{unique}"},
            "spec": {"peerRefs": ["a"], "routes": [{"cidr": "10.100.0.0/16"}]}}
    cases = [
        (("healthCheck",), {"enabled": True, "target": "10.0.0.1:443", "intervalSeconds": 1, "timeoutSeconds": 5},
         "intervalSeconds must be greater than or equal to timeoutSeconds"),
        (("healthCheck",), {"enabled": True}, "target is required"),
        (("routes",), [{"cidr": "10.100.0.1/16"}], "spec.routes[0].cidr"),
        (("peerRefs",), [], "spec.peerRefs"),
        (("snat",), {"sourceIP": "nope"}, "spec.snat.sourceIP"),
    ]
    for path, value, expected in cases:
        body = copy.deepcopy(base)
        body["spec"][path[0]] = value
        with pytest.raises(errors.Invalid, match=re.escape(expected)) as err:
            kube.create(k8s.GATEWAYS, body)
        assert expected in str(err.value), (path, str(err.value))


def test_errors_are_mapped(kube: k8s.Kube, unique: str) -> None:
    with pytest.raises(errors.NotFound, match=f"\"missing-{unique}\" not found"):
        kube.get(k8s.PEERS, f"missing-{unique}")
    kube.create(k8s.PEERS, peer_body(f"dup-{unique}"))
    with pytest.raises(errors.AlreadyExists, match=f"\"dup-{unique}\" already exists"):
        kube.create(k8s.PEERS, peer_body(f"dup-{unique}"))
    stale = kube.get(k8s.PEERS, f"dup-{unique}")
    kube.patch_merge(k8s.PEERS, f"dup-{unique}", {"spec": {"persistentKeepalive": 10}})
    with pytest.raises(errors.Conflict, match="the object has been modified"):
        kube.replace(k8s.PEERS, stale)


def test_json_patch_appends_allowed_ip(kube: k8s.Kube, unique: str) -> None:
    kube.create(k8s.PEERS, peer_body(f"jp-{unique}"))
    out = kube.patch_json(k8s.PEERS, f"jp-{unique}",
                          [{"op": "add", "path": "/spec/allowedIPs/-", "value": "10.200.0.0/25"}])
    assert out["spec"]["allowedIPs"] == ["10.255.0.9/32", "10.200.0.0/25"]


def test_concurrent_status_writers_never_lose_updates(kube: k8s.Kube, unique: str) -> None:
    name = f"conc-{unique}"
    kube.create(k8s.PEERS, peer_body(name))
    writers = [f"w{i}" for i in range(6)]
    failures: list[BaseException] = []

    def write(key: str) -> None:
        for round_ in range(3):
            def mutate(obj: dict[str, Any]) -> dict[str, Any]:
                status = copy.deepcopy(obj.get("status", {}))
                transports = status.setdefault("peerTransports", {})
                transports[f"{key}-{round_}"] = "relay"
                return status
            try:
                kube.update_status(k8s.PEERS, name, mutate, attempts=50)
            except BaseException as e:  # noqa: BLE001 - surfaced below
                failures.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    final = kube.get(k8s.PEERS, name)["status"]["peerTransports"]
    assert set(final) == {f"{w}-{r}" for w in writers for r in range(3)}


def test_events_are_recorded(kube: k8s.Kube, unique: str) -> None:
    obj = kube.create(k8s.PEERS, peer_body(f"ev-{unique}"))
    kube.emit_event(obj, "RejectedInput", "spec.allowedIPs[1] overlaps node b's mesh IP", type_="Warning",
                    component="agent")
    items, _ = kube.list(k8s.EVENTS, "default")
    mine = [e for e in items if e["regarding"]["name"] == f"ev-{unique}"]
    assert mine and mine[0]["reason"] == "RejectedInput" and mine[0]["type"] == "Warning"


def test_informer_sees_adds_updates_deletes(kube: k8s.Kube, unique: str) -> None:
    seen: list[tuple[str, str]] = []
    inf = k8s.Informer(kube, k8s.PEERS, lambda t, o: seen.append((t, o["metadata"]["name"]))).start()
    try:
        assert inf.wait_synced(30)
        name = f"inf-{unique}"
        kube.create(k8s.PEERS, peer_body(name))
        wait_for(lambda: ("ADDED", name) in seen, 30, "ADDED")
        kube.patch_merge(k8s.PEERS, name, {"spec": {"persistentKeepalive": 7}})
        wait_for(lambda: inf.cache.get(name, {}).get("spec", {}).get("persistentKeepalive") == 7, 30, "MODIFIED")
        kube.delete(k8s.PEERS, name)
        wait_for(lambda: ("DELETED", name) in seen and name not in inf.cache, 30, "DELETED")
    finally:
        inf.stop()


def test_informer_stop_ends_an_open_watch_instead_of_waiting_it_out(kube: k8s.Kube) -> None:
    """A watch blocks reading for up to its timeout (60 s here); stop() must end it at once, or an
    agent's shutdown (DaemonSet rollout, SIGTERM) waits for every open watch."""
    inf = k8s.Informer(kube, k8s.PEERS, lambda t, o: None, watch_timeout_seconds=60).start()
    assert inf.wait_synced(30)
    wait_for(lambda: inf._response is not None, 10, "the watch is open")
    inf.stop(timeout=5)
    assert inf._thread is not None and not inf._thread.is_alive()


def test_leader_election_single_leader_and_handover(kube: k8s.Kube, unique: str) -> None:
    try:
        kube.create(k8s.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "wirekube-system"}})
    except errors.AlreadyExists:
        pass
    a = k8s.LeaderElector(kube, f"lease-{unique}", "wirekube-system", identity="a", lease_duration=2,
                          renew_deadline=1.5)
    b = k8s.LeaderElector(kube, f"lease-{unique}", "wirekube-system", identity="b", lease_duration=2,
                          renew_deadline=1.5)
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    assert a.try_acquire_or_renew() is True  # renew
    a.release()
    wait_for(lambda: b.try_acquire_or_renew(), timeout=10, what="b takes over after release")
    assert a.try_acquire_or_renew() is False


def test_no_module_but_the_adapter_imports_kubernetes() -> None:
    root = Path(__file__).resolve().parents[2] / "python" / "wirekube"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "k8s.py" and path.parent == root:
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import kubernetes", "from kubernetes")):
                offenders.append(f"{path.relative_to(root)}: {stripped}")
    assert offenders == []


# ---- a private control plane: restart and outage behaviour ------------------------------------


@pytest.fixture(scope="module")
def private_cp(lab_tmp: Path) -> Any:
    cp = ControlPlane(lab_tmp / "private-cluster").up()
    yield cp
    cp.down()


def test_watch_resumes_after_api_server_restart(private_cp: ControlPlane) -> None:
    kube = k8s.Kube.from_kubeconfig(private_cp.kubeconfig)
    events: list[tuple[str, str]] = []
    inf = k8s.Informer(kube, k8s.PEERS, lambda t, o: events.append((t, o["metadata"]["name"])),
                       backoff_initial=0.2, backoff_max=1.0).start()
    try:
        assert inf.wait_synced(30)
        kube.create(k8s.PEERS, peer_body("before"))
        wait_for(lambda: ("ADDED", "before") in events, 30, "event before restart")
        relists = inf.relists
        private_cp.restart_apiserver()
        kube.create(k8s.PEERS, peer_body("after"))
        wait_for(lambda: ("ADDED", "after") in events, timeout=60, what="event after restart")
        assert inf.reconnects >= 1 or inf.relists > relists
        # "before" is delivered once: resuming from the last resourceVersion replays nothing.
        assert events.count(("ADDED", "before")) == 1
        assert set(inf.cache) >= {"before", "after"}
    finally:
        inf.stop()
        kube.close()


def test_cluster_down_leaves_no_process(lab_tmp: Path) -> None:
    cp = ControlPlane(lab_tmp / "short-lived").up(install_crds=False)
    pids = dict(cp.processes())
    assert set(pids) == {"etcd", "kube-apiserver"}
    port = cp.state.apiserver_port if cp.state else 0
    cp.down()
    from wirekube.lab.cluster import _pid_alive

    assert not any(_pid_alive(p) for p in pids.values())
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not (lab_tmp / "short-lived").exists()


def test_many_open_watches_and_writes_share_one_pool_without_discarding(kube: k8s.Kube, unique: str) -> None:
    """Twelve informers (twice what an agent runs) plus writes: no connection is opened and thrown
    away because the pool is full (urllib3 logs that as a warning on the urllib3 logger)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("urllib3.connectionpool")
    log.addHandler(handler)
    informers = [k8s.Informer(kube, k8s.PEERS, lambda t, o: None, watch_timeout_seconds=60).start() for _ in range(12)]
    try:
        assert all(i.wait_synced(30) for i in informers)
        wait_for(lambda: all(i._response is not None for i in informers), 10, "every watch open")
        for n in range(6):
            kube.create(k8s.PEERS, peer_body(f"pool-{unique}-{n}"))
        for n in range(6):
            kube.delete(k8s.PEERS, f"pool-{unique}-{n}")
    finally:
        for i in informers:
            i.stop()
        log.removeHandler(handler)
    assert not [r for r in records if "pool is full" in r.getMessage()], [r.getMessage() for r in records]
