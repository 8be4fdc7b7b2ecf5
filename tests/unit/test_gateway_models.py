"""The gateway status fields added for the controller/agent contract parse and are checked."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from tests.unit.gateway_fixtures import gateway_obj
from wirekube import models
from wirekube.errors import InvalidObject


def test_new_status_fields_parse() -> None:
    obj = gateway_obj(["a", "b"], ["10.100.0.0/16"], status={
        "activePeer": "a",
        "pendingPeer": "b",
        "routes": ["10.100.0.0/16"],
        "clients": ["h1", "h2"],
        "peerHealth": {"a": "healthy"},
        "peerHealthDetail": {"a": {"lastCheck": "2026-01-01T00:00:00.5Z", "consecutiveFailures": 1, "message": "x"}},
        "forwarding": {"b": {"ready": True, "routes": ["10.100.0.0/16"], "epoch": 3}},
        "handoverEpoch": 3,
        "observedGeneration": 4,
    })
    s = models.gateway_from_cr(obj).status
    assert (s.active_peer, s.pending_peer, s.clients, s.observed_generation) == ("a", "b", ("h1", "h2"), 4)
    assert s.routes == (ipaddress.ip_network("10.100.0.0/16"),)
    assert s.peer_health_detail["a"] == models.HealthReport("2026-01-01T00:00:00.5Z", 1, "x")
    assert s.forwarding["b"] == models.ForwardingAck(True, (ipaddress.ip_network("10.100.0.0/16"),), 3)
    assert s.handover_epoch == 3


def test_old_status_without_new_fields_still_parses() -> None:
    s = models.gateway_from_cr(gateway_obj(["a"], ["10.0.0.0/8"], status={"activePeer": "a", "ready": True})).status
    assert s.pending_peer == "" and s.routes == () and s.peer_health_detail == {} and s.forwarding == {}


@pytest.mark.parametrize(("status", "field"), [
    ({"routes": ["10.0.0.1/8"]}, "status.routes[0]"),
    ({"peerHealthDetail": {"a": {"consecutiveFailures": -1}}}, "status.peerHealthDetail.a.consecutiveFailures"),
    ({"forwarding": {"a": {"ready": "yes"}}}, "status.forwarding.a.ready"),
    ({"forwarding": {"a": {"routes": ["x"]}}}, "status.forwarding.a.routes[0]"),
    ({"clients": "h1"}, "status.clients"),
])
def test_bad_status_field_is_named(status: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject, match=re.escape(f"{field}: ")) as err:
        models.gateway_from_cr(gateway_obj(["a"], ["10.0.0.0/8"], status=status))
    assert err.value.field == field


def test_virtual_ip_parses_with_its_prefix() -> None:
    obj = gateway_obj(["gw-a"], ["10.100.0.0/24"])
    obj["spec"]["virtualIP"] = "10.100.0.10/24"
    vip = models.gateway_from_cr(obj).spec.virtual_ip
    assert vip == ipaddress.IPv4Interface("10.100.0.10/24")
    assert models.gateway_from_cr(gateway_obj(["gw-a"], ["10.100.0.0/24"])).spec.virtual_ip is None


@pytest.mark.parametrize("bad", ["10.100.0.10", "10.100.0.0/24", "10.100.0.255/24", "10.100.0.10/32", "fd00::1/64",
                                 "not-an-ip/24"])
def test_bad_virtual_ip_is_named(bad: str) -> None:
    obj = gateway_obj(["gw-a"], ["10.100.0.0/24"])
    obj["spec"]["virtualIP"] = bad
    with pytest.raises(InvalidObject, match=re.escape(f"spec.virtualIP: '{bad}' ")) as err:
        models.gateway_from_cr(obj)
    assert err.value.field == "spec.virtualIP"
