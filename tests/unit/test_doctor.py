from __future__ import annotations

import datetime as dt
from typing import Any

from wirekube.cli import doctor

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
MESH = {"metadata": {"name": "default"}, "spec": {"meshCIDR": "10.255.0.0/16", "serviceCIDRs": ["172.16.0.0/16"]}}
GATEWAY = {"metadata": {"name": "vpc"}, "spec": {"routes": [{"cidr": "10.100.0.0/16"}]}}


def node(name: str, pod: str | None = None, ip: str = "172.20.0.5") -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"podCIDRs": [pod] if pod else []},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def test_cilium_pool_on_the_vpc_cidr_is_flagged() -> None:
    ranges = doctor.collect_ranges(MESH, [], [GATEWAY], [node("h1", "10.100.3.0/24"), node("h2", "10.200.1.0/24")])
    findings = doctor.check_cidr_overlaps(ranges)
    fails = [f for f in findings if f.verdict == doctor.FAIL]
    assert len(fails) == 1 and "10.100.3.0/24" in fails[0].subject and "RFC 1918" in fails[0].fix
    assert doctor.exit_code(findings) == 1


def test_clean_cluster_has_no_overlap() -> None:
    ranges = doctor.collect_ranges(MESH, [], [GATEWAY], [node("h1", "10.200.0.0/24"), node("h2", "10.200.1.0/24")])
    findings = doctor.check_cidr_overlaps(ranges)
    assert [f.verdict for f in findings] == [doctor.OK] and doctor.exit_code(findings) == 0


def test_mesh_vs_service_and_node_address() -> None:
    mesh = {"spec": {"meshCIDR": "172.16.0.0/12", "serviceCIDRs": ["172.16.0.0/16"]}}
    findings = doctor.check_cidr_overlaps(doctor.collect_ranges(mesh, [], [], [node("n", ip="172.20.0.5")]))
    kinds = {f.detail.split(" ")[0] + "/" + f.detail.split(" overlaps ")[1].split(" ")[0] for f in findings}
    assert kinds == {"mesh/service", "mesh/node"}


def peer(name: str, status: dict[str, Any] | None) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {}, "status": status}


def test_peer_findings() -> None:
    peers = [
        peer("a", {"connected": True, "peerTransports": {"b": "direct", "c": "relay"}, "engine": "userspace (no module)"}),
        peer("b", {"connected": False, "relayReasons": {"a": "udp blocked"}}),
        peer("c", None),
        peer("d", {"connected": True, "peerTransports": {"a": "direct"},
                   "conditions": [{"type": "RelayProxyEPERM", "status": "True", "message": "EPERM on port 51822"}]}),
    ]
    findings = doctor.check_peers(peers)
    by = {(f.check, f.subject): f for f in findings}
    assert by[("peer-connected", "a")].verdict == doctor.WARN  # no transport to d
    assert by[("peer-connected", "b")].verdict == doctor.FAIL and "udp blocked" in by[("peer-connected", "b")].detail
    assert by[("peer-connected", "c")].verdict == doctor.FAIL and "never reported" in by[("peer-connected", "c")].detail
    assert by[("relay-proxy-eperm", "d")].verdict == doctor.FAIL and "reboot" in by[("relay-proxy-eperm", "d")].fix
    assert by[("engine", "a")].detail.startswith("userspace")
    assert doctor.check_peers(peers, "a") == [f for f in findings if f.subject == "a"]


def test_clock_skew() -> None:
    future = (NOW + dt.timedelta(minutes=10)).isoformat()
    findings = doctor.check_clock_skew([peer("a", {"lastHandshake": future}),
                                        peer("b", {"lastHandshake": NOW.isoformat()})], NOW)
    assert [(f.subject, f.verdict) for f in findings] == [("a", doctor.FAIL)]


def test_reachability_uses_injected_probe() -> None:
    findings = doctor.check_reachability("relay", ["r1:3478", "r2:3478"],
                                         lambda t: None if t == "r1:3478" else "connection refused", "fix it")
    assert [(f.subject, f.verdict) for f in findings] == [("r1:3478", doctor.OK), ("r2:3478", doctor.FAIL)]
    text = doctor.render(findings, colour=False)
    assert "FAIL" in text and "fix: fix it" in text
