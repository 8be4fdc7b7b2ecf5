"""The agent's side of WireKubeGateway: pure decisions and rule text, and the agent with fakes."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from typing import Any

import pytest

from tests.unit.gateway_fixtures import gateway, gateway_obj, peer
from wirekube.agent.gateway import GatewayAgent, ack_needed, augment_peers, duties, nft_ruleset
from wirekube.gateway.contract import forwarding_duty

ROUTE = "10.100.0.0/24"


def active(peer_name: str = "ec2-a", *, pending: str = "", epoch: int = 3, clients: list[str] | None = None,
           forwarding: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"activePeer": peer_name, "pendingPeer": pending, "handoverEpoch": epoch, "routes": [ROUTE],
            "clients": clients if clients is not None else ["hybrid-a1"], "forwarding": forwarding or {}}


def test_client_gets_routes_on_the_active_gateway_peer_only() -> None:
    peers = [peer("ec2-a"), peer("ec2-b"), peer("hybrid-a1")]
    gw = gateway(["ec2-a", "ec2-b"], [ROUTE], status=active())
    out = {p.name: p for p in augment_peers(peers, [gw], "hybrid-a1")}
    assert ipaddress.ip_network(ROUTE) in out["ec2-a"].spec.allowed_ips
    assert out["ec2-a"].spec.allowed_ips[0] == peers[0].spec.allowed_ips[0]  # mesh IP stays first
    assert ipaddress.ip_network(ROUTE) not in out["ec2-b"].spec.allowed_ips


def test_non_clients_and_gateways_get_nothing() -> None:
    peers = [peer("ec2-a"), peer("ec2-b"), peer("other")]
    gw = gateway(["ec2-a", "ec2-b"], [ROUTE], status=active())
    assert augment_peers(peers, [gw], "other") == tuple(peers)
    assert augment_peers(peers, [gw], "ec2-b") == tuple(peers)
    no_active = gateway(["ec2-a"], [ROUTE], status={**active(), "activePeer": ""})
    assert augment_peers(peers, [no_active], "hybrid-a1") == tuple(peers)


def test_routes_move_with_the_active_peer() -> None:
    peers = [peer("ec2-a"), peer("ec2-b")]
    gw = gateway(["ec2-a", "ec2-b"], [ROUTE], status=active("ec2-b"))
    out = {p.name: p for p in augment_peers(peers, [gw], "hybrid-a1")}
    assert ipaddress.ip_network(ROUTE) in out["ec2-b"].spec.allowed_ips
    assert ipaddress.ip_network(ROUTE) not in out["ec2-a"].spec.allowed_ips


def test_duty_while_active_or_pending() -> None:
    gw = gateway(["ec2-a", "ec2-b"], [ROUTE], status=active(pending="ec2-b"))
    assert [d.phase for d in duties([gw], "ec2-a")] == ["active"]
    assert [d.phase for d in duties([gw], "ec2-b")] == ["pending"]
    assert duties([gw], "hybrid-a1") == []


def test_ack_written_once_and_rewritten_on_new_epoch() -> None:
    gw = gateway(["ec2-a", "ec2-b"], [ROUTE], status=active())
    duty = forwarding_duty(gw, "ec2-a")
    assert ack_needed(gw, "ec2-a", duty) == {
        "status": {"forwarding": {"ec2-a": {"ready": True, "routes": [ROUTE], "epoch": 3}}}}
    acked = gateway(["ec2-a", "ec2-b"], [ROUTE],
                    status=active(forwarding={"ec2-a": {"ready": True, "routes": [ROUTE], "epoch": 3}}))
    assert ack_needed(acked, "ec2-a", forwarding_duty(acked, "ec2-a")) is None
    bumped = gateway(["ec2-a", "ec2-b"], [ROUTE],
                     status=active(epoch=4, forwarding={"ec2-a": {"ready": True, "routes": [ROUTE], "epoch": 3}}))
    assert ack_needed(bumped, "ec2-a", forwarding_duty(bumped, "ec2-a")) is not None


def test_ack_withdrawn_when_duty_is_lost() -> None:
    gw = gateway(["ec2-a", "ec2-b"], [ROUTE],
                 status=active("ec2-b", forwarding={"ec2-a": {"ready": True, "routes": [ROUTE], "epoch": 3}}))
    assert forwarding_duty(gw, "ec2-a") is None
    assert ack_needed(gw, "ec2-a", None) == {"status": {"forwarding": {"ec2-a": None}}}
    clean = gateway(["ec2-a", "ec2-b"], [ROUTE], status=active("ec2-b"))
    assert ack_needed(clean, "ec2-a", None) is None


def test_ruleset_text() -> None:
    gw = gateway(["ec2-a"], [ROUTE, "10.101.0.0/16"], status={**active(), "routes": [ROUTE, "10.101.0.0/16"]})
    text = nft_ruleset("wire_kube", duties([gw], "ec2-a"))
    assert text.startswith("table inet wirekube {}\ndelete table inet wirekube\n")
    assert 'iifname "wire_kube" ip daddr { 10.100.0.0/24, 10.101.0.0/16 } accept' in text
    assert 'oifname "wire_kube" ip saddr { 10.100.0.0/24, 10.101.0.0/16 } accept' in text
    assert "masquerade" in text and "hook postrouting priority srcnat" in text
    assert "chain fwd" not in text  # `fwd` is a keyword in nft 1.0.6


def test_ruleset_snat_source_and_disabled() -> None:
    obj = gateway_obj(["ec2-a"], [ROUTE], status=active())
    obj["spec"]["snat"] = {"enabled": True, "sourceIP": "10.100.0.9"}
    from wirekube.models import gateway_from_cr

    text = nft_ruleset("wire_kube", duties([gateway_from_cr(obj)], "ec2-a"))
    assert "snat ip to 10.100.0.9" in text
    obj["spec"]["snat"] = {"enabled": False}
    text = nft_ruleset("wire_kube", duties([gateway_from_cr(obj)], "ec2-a"))
    assert "postrouting" not in text and "forward" in text


def test_no_duty_deletes_the_table() -> None:
    assert nft_ruleset("wire_kube", []) == "table inet wirekube {}\ndelete table inet wirekube\n"


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_ruleset_parses_with_nft() -> None:
    gw = gateway(["ec2-a"], [ROUTE], status=active())
    text = nft_ruleset("wire_kube", duties([gw], "ec2-a"))
    done = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True, check=False)
    if "Operation not permitted" in done.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN")
    assert done.returncode == 0, done.stderr


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []

    def patch_status(self, res: Any, name: str, patch: dict[str, Any]) -> None:
        self.patches.append((name, patch))


def test_agent_withdraws_at_start_then_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    import wirekube.agent.gateway as mod

    monkeypatch.setattr(mod, "_write_sysctl", lambda *a, **k: None)
    objs = [gateway_obj(["ec2-a", "ec2-b"], [ROUTE],
                        status=active(forwarding={"ec2-a": {"ready": True, "routes": [ROUTE], "epoch": 3}}))]
    kube, scripts = FakeKube(), []
    present = [True]
    agent = GatewayAgent(kube, "ec2-a", lambda: objs, lambda: "wire_kube", nft=scripts.append,
                         table_present=lambda: present[0])
    agent.withdraw_all()
    assert kube.patches == [("gw", {"status": {"forwarding": {"ec2-a": None}}})]
    assert "masquerade" not in scripts[-1]
    objs[0]["status"]["forwarding"] = {}
    agent.sync_forwarding()
    assert "masquerade" in scripts[-1]
    assert kube.patches[-1] == ("gw", {"status": {"forwarding": {"ec2-a": {"ready": True, "routes": [ROUTE],
                                                                            "epoch": 3}}}})
    n = len(scripts)
    agent.sync_forwarding()
    assert len(scripts) == n  # unchanged and present: nothing rewritten
    present[0] = False
    agent.sync_forwarding()
    assert len(scripts) == n + 1 and "masquerade" in scripts[-1]  # deleted behind our back: put back


def test_health_reports_count_consecutive_failures() -> None:
    objs = [gateway_obj(["ec2-a"], [ROUTE], health={"enabled": True, "target": "10.100.0.100:22",
                                                      "intervalSeconds": 1, "timeoutSeconds": 1})]
    results = iter([(False, "down"), (False, "down"), (True, "up")])
    clock = iter([1.0, 2.0, 3.0])
    agent = GatewayAgent(FakeKube(), "ec2-a", lambda: objs, lambda: "wire_kube", check=lambda hc: next(results),
                         clock=lambda: next(clock))
    gw = agent.gateways()[0]
    reports = [agent.check_once(gw)["status"] for _ in range(3)]
    assert [r["peerHealthDetail"]["ec2-a"]["consecutiveFailures"] for r in reports] == [1, 2, 0]
    assert len({r["lastHealthCheck"] for r in reports}) == 3
    assert reports[0]["peerHealthDetail"]["ec2-a"]["message"] == "down"
