"""Path MTU in `wirekubectl status` and `wirekubectl doctor` (issue 18)."""

from __future__ import annotations

from typing import Any

from wirekube.cli import doctor
from wirekube.cli.status import build_report, render_table


def peer(name: str, mtus: dict[str, int], transports: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"allowedIPs": ["10.255.0.1/32"]},
            "status": {"connected": True, "peerTransports": transports, "pathMTU": mtus}}


PEERS = [
    peer("a", {"c": 1216}, {"b": "direct", "c": "direct"}),
    peer("b", {"c": 1200}, {"a": "direct", "c": "relay"}),  # relayed: the full size, whatever it said
    peer("c", {"a": 1216, "b": 1088}, {"a": "direct", "b": "direct"}),
]


def test_status_shows_the_pairs_with_a_smaller_path() -> None:
    report = build_report(PEERS)
    got = {(p.source, p.target): p.path_mtu for p in report.pairs if p.path_mtu}
    assert got == {("a", "c"): 1216, ("c", "a"): 1216, ("c", "b"): 1088}
    table = render_table(report)
    assert "path MTU a -> c: 1216" in table and "path MTU b -> c" not in table
    pairs = report.to_dict()["pairs"]
    assert {"from": "a", "to": "c", "transport": "direct", "reason": "", "pathMTU": 1216} in pairs
    assert {"from": "a", "to": "b", "transport": "direct", "reason": ""} in pairs


def test_doctor_warns_only_on_paths_below_1280() -> None:
    findings = [f for f in doctor.check_peers(PEERS) if f.check == "path-mtu"]
    assert [(f.subject, f.verdict) for f in findings] == [("b -> c", doctor.WARN), ("c -> b", doctor.WARN)]
    assert "below 1280" in findings[0].detail
    assert doctor.check_path_mtu("a", {"c": 1216}) == []  # a 1280-byte path is fine
