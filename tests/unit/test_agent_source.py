"""Parsing WireKubePeer objects for the planner: unchanged objects keep their parsed Peer."""

from __future__ import annotations

import base64
from typing import Any

from wirekube.agent.plan import Skipped
from wirekube.agent.source import parse_peers
from wirekube.models import Peer


def obj(name: str, rv: str, key: str = base64.b64encode(b"\x02" * 32).decode(),
        ip: str = "10.255.0.2/32") -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": rv}, "spec": {"publicKey": key, "allowedIPs": [ip]}}


def test_memo_keeps_parsed_peers_while_the_resource_version_stays() -> None:
    memo: dict[str, tuple[str, Peer | Skipped]] = {}
    first, _ = parse_peers([obj("a", "1"), obj("b", "1", ip="10.255.0.3/32")], memo)
    again, _ = parse_peers([obj("a", "1"), obj("b", "2", ip="10.255.0.4/32")], memo)
    assert again[0] is first[0]  # same version: the very same object, not a re-parse
    assert again[1] is not first[1] and str(again[1].spec.allowed_ips[0]) == "10.255.0.4/32"
    parse_peers([obj("b", "2", ip="10.255.0.4/32")], memo)
    assert set(memo) == {"b"}  # deleted objects leave the memo


def test_invalid_objects_are_rejected_with_or_without_a_memo() -> None:
    memo: dict[str, tuple[str, Peer | Skipped]] = {}
    bad = obj("bad", "7", key="short")
    for m in (memo, None, memo):
        peers, rejected = parse_peers([bad, obj("a", "1")], m)
        assert [p.name for p in peers] == ["a"]
        assert [s.peer for s in rejected] == ["bad"] and "spec.publicKey" in rejected[0].reason
    assert parse_peers([{"spec": {}}], memo)[1][0].peer == "?"  # no metadata at all: still reported
