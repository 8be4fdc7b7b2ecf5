from __future__ import annotations

import json
from typing import Any

import yaml

from wirekube.cli.status import build_report, render_json, render_table, render_yaml


def peer(name: str, ip: str, *, connected: bool = True, nat: str = "cone", transports: dict[str, str] | None = None,
         reasons: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"publicKey": "k", "allowedIPs": [f"{ip}/32"], "endpoint": f"198.51.100.{ip[-1]}:51820"},
            "status": {"connected": connected, "natType": nat, "peerTransports": transports or {},
                       "relayReasons": reasons or {}, "transportMode": "mixed"}}


PEERS = [
    peer("b", "10.255.0.2", nat="symmetric", transports={"a": "direct", "c": "relay"},
         reasons={"c": "peer symmetric and local symmetric"}),
    peer("a", "10.255.0.1", transports={"b": "direct"}),
    peer("c", "10.255.0.3", connected=False, transports={"b": "relay"}),
]
GATEWAY = {"metadata": {"name": "vpc"}, "status": {"activePeer": "a", "ready": True, "routesInjected": 2,
                                                   "peerHealth": {"a": "healthy"}}}
MESH = {"metadata": {"name": "default"}, "status": {"relay": {"endpoints": ["203.0.113.7:3478"]}}}


def test_pairs_cover_every_ordered_pair_with_reasons() -> None:
    r = build_report(PEERS, [GATEWAY], MESH)
    assert [n.name for n in r.nodes] == ["a", "b", "c"]
    pairs = {(p.source, p.target): p for p in r.pairs}
    assert len(pairs) == 6
    assert pairs[("a", "b")].transport == "direct"
    assert pairs[("a", "c")].transport == "down"  # a never listed c
    assert pairs[("b", "c")].transport == "relay" and pairs[("b", "c")].reason == "peer symmetric and local symmetric"
    assert pairs[("c", "b")].transport == "down"  # c is not connected at all
    assert not r.all_connected


def test_renderings() -> None:
    r = build_report(PEERS, [GATEWAY], MESH)
    table = render_table(r)
    assert "NODE" in table and "FROM \\ TO" in table and "relay b -> c: peer symmetric" in table
    assert "vpc" in table and "a=healthy" in table and "203.0.113.7:3478" in table
    assert "\033[" not in table and "\033[32m" in render_table(r, colour=True)
    data = json.loads(render_json(r))
    assert {"from": "b", "to": "c", "transport": "relay",
            "reason": "peer symmetric and local symmetric"} in data["pairs"]
    assert yaml.safe_load(render_yaml(r)) == data


def test_empty_mesh_is_not_connected() -> None:
    r = build_report([])
    assert r.pairs == () and not r.all_connected
    assert render_table(r).startswith("NODE")
