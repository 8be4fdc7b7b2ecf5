"""The lab scenario's pure parts: built-in topology lookup, the VPC gateway it derives, the plane table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import pytest

from wirekube.lab import scenario
from wirekube.lab.topology import (
    BUILTIN_DESCRIPTIONS,
    BUILTIN_TOPOLOGIES,
    TopologyError,
    UnknownTopology,
    builtin_topology,
    parse_topology,
    resolve_topology,
)


def test_every_built_in_has_a_one_line_description() -> None:
    assert list(BUILTIN_DESCRIPTIONS) == list(BUILTIN_TOPOLOGIES)
    assert all(d and "\n" not in d for d in BUILTIN_DESCRIPTIONS.values())


def test_resolve_topology_takes_a_built_in_name_or_a_path(tmp_path: Path) -> None:
    assert resolve_topology("eks-hybrid") == builtin_topology("eks-hybrid")
    path = tmp_path / "t.yaml"
    path.write_text(builtin_topology("default").to_yaml())
    assert resolve_topology(str(path)) == builtin_topology("default")


@pytest.mark.parametrize("ref", ["no-such", "/nonexistent/t.yaml"])
def test_an_unknown_name_names_the_built_ins(ref: str) -> None:
    with pytest.raises(UnknownTopology, match=f"^no topology '{re.escape(ref)}': built-in topologies: ") as e:
        resolve_topology(ref)
    assert ref in str(e.value) and "default, eks-hybrid" in str(e.value) and "\n" not in str(e.value)


def test_a_directory_or_a_bad_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UnknownTopology, match="not a file"):
        resolve_topology(str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(UnknownTopology, match="not UTF-8"):
        resolve_topology(str(bad))
    bad.write_text("sites: 3\n")
    with pytest.raises(TopologyError, match="sites"):
        resolve_topology(str(bad))


@pytest.mark.parametrize("name", [n for n in BUILTIN_TOPOLOGIES if builtin_topology(n).kubernetes == "processes"])
def test_every_built_in_gets_the_vpc_gateway_with_a_health_check_and_pods(name: str) -> None:
    topology = builtin_topology(name)
    gw = scenario.gateway_object(topology)
    assert gw is not None
    spec = gw["spec"]
    assert gw["metadata"]["name"] == "vpc"
    assert spec["peerRefs"] == ["ec2-a", "ec2-b"]  # the network's gateway node first
    assert spec["routes"] == [{"cidr": "10.100.0.0/24", "description": "vpc subnet"}]
    assert spec["virtualIP"] == "10.100.0.250/24"
    assert spec["healthCheck"]["target"] == "10.100.0.100" and spec["healthCheck"]["enabled"] is True
    assert all(node.pods >= 1 and node.pod_cidr is not None for _, node in topology.nodes())


def test_no_private_network_means_no_gateway() -> None:
    topology = parse_topology({"sites": [{"name": "cloud", "nat": "none", "nodes": [{"name": "a"}]}]})
    assert scenario.gateway_object(topology) is None


def test_the_virtual_ip_avoids_addresses_already_taken() -> None:
    doc = builtin_topology("default").to_dict()
    doc["networks"][0]["hosts"].append({"name": "taken", "address": "10.100.0.250"})
    assert scenario.virtual_ip(parse_topology(doc).networks[0]) == "10.100.0.249/24"


def test_plane_table_lists_failures_under_their_row() -> None:
    ok = scenario._plane("node -> node", "every pair", [("a -> b", 1.0), ("b -> a", 3.0)])
    bad = scenario._plane("VPC host -> hybrid kubelet", "TCP 10250", [("vpc -> h1", 2.0), ("vpc -> h2", None)])
    empty = scenario.Plane("EC2 pod -> hybrid pod", "no pods", 0, 0)
    assert ok.ok and not bad.ok and not empty.ok
    assert bad.failures == ["vpc -> h2"] and ok.to_json()["medianMs"] == 2.0 and ok.to_json()["maxMs"] == 3.0
    assert (ok.to_json()["result"], bad.to_json()["result"], empty.to_json()["result"]) == ("pass", "fail", "n/a")
    lines = scenario.render_planes([ok, bad, empty]).splitlines()
    assert lines[1].split()[:5] == ["node", "->", "node", "pass", "2/2"]
    assert "fail 1/2" in lines[2] and lines[3].strip() == "failed: vpc -> h2"
    assert "n/a" in lines[4]


class _Events:
    """The one Kube call :func:`scenario._why_not_routed` makes (a unit-test seam)."""

    def __init__(self, events: list[dict[str, object]]) -> None:
        self.events = events

    def list(self, resource: object, namespace: str) -> tuple[list[dict[str, object]], str]:
        return self.events, "1"


class _Lab:
    nodes: ClassVar[dict[str, Any]] = {"udpblock-1": type("Info", (), {"lan_ip": "192.168.6.10"})()}


def test_a_failed_kubelet_probe_says_why_the_gateway_does_not_route_it() -> None:
    note = ("node ec2-a does not route 192.168.6.10/32 of peer udpblock-1: spec.allowedIPs[1] 192.168.6.10/32 "
            "contains 192.168.6.10, the endpoint of peer udpblock-1, which is never routed into the mesh")
    events = [{"reason": "RouteNotGranted", "regarding": {"name": "udpblock-1"}, "note": note},
              {"reason": "RouteNotGranted", "regarding": {"name": "udpblock-1"},
               "note": note.replace("node ec2-a", "node prc-1")}]
    why = scenario._why_not_routed(_Events(events), _Lab(), "ec2-a", "udpblock-1")  # type: ignore[arg-type]
    assert why == f": {note}"
    assert scenario._why_not_routed(_Events([]), _Lab(), "ec2-a", "udpblock-1") == ""  # type: ignore[arg-type]
    assert "no active peer" in scenario._why_not_routed(_Events([]), _Lab(), "", "udpblock-1")  # type: ignore[arg-type]
