from __future__ import annotations

import datetime as dt
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.fixtures.root import require_root
from wirekube.cli import doctor, nodestate, wirekubectl
from wirekube.cli.nodestate import AgentProbe, NftState, NodeState, RuleInfo
from wirekube.metrics import serve

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
        peer("a", {"connected": True, "peerTransports": {"b": "direct", "c": "relay"},
                   "engine": "userspace (no module)"}),
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
    assert by[("engine", "a")].verdict == doctor.WARN  # userspace for a reason that is not a choice
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


# ---- the engine and why ----------------------------------------------------------------------------


@pytest.mark.parametrize(("engine", "verdict"), [
    ("kernel", doctor.OK),
    ("kernel (spec.engine=kernel)", doctor.OK),
    ("userspace (spec.engine=userspace)", doctor.INFO),
    ("userspace (--engine=userspace)", doctor.INFO),
    ("userspace (adopted the running wireguard-go interface wire_kube)", doctor.INFO),
    ("userspace", doctor.INFO),
    ("userspace (no wireguard kernel module: modprobe: FATAL: Module wireguard not found)", doctor.WARN),
    ("userspace (kernel WireGuard unavailable: Operation not permitted)", doctor.WARN),
    ("quantum", doctor.WARN),
])
def test_engine_verdicts(engine: str, verdict: str) -> None:
    f = doctor.check_engine("n1", engine)
    assert f.verdict == verdict, f
    if verdict == doctor.WARN and engine.startswith("userspace"):
        assert "modprobe wireguard" in f.fix and engine.split(" (", 1)[1].rstrip(")") in f.detail
    assert doctor.exit_code([f]) == 0, "the engine alone never fails the doctor"


def test_info_renders() -> None:
    text = doctor.render([doctor.check_engine("n1", "userspace (spec.engine=userspace)")], colour=False)
    assert text.startswith("[INFO] engine: n1: userspace (wireguard-go): spec.engine=userspace")


# ---- doctor --local ------------------------------------------------------------------------------

UP = AgentProbe("http://127.0.0.1:9090", True, True, "http://127.0.0.1:9090/healthz answers")
DOWN = AgentProbe("http://127.0.0.1:9090", False, None, "nothing answers on http://127.0.0.1:9090/healthz")
RULES = (RuleInfo("ipv4 pref 100 fwmark 0x574b lookup 254", 100, True),
         RuleInfo("ipv4 pref 200 lookup 22347", 200, True))
ROUTES = ("10.255.1.2/32 dev wire_kube table 22347",)
FULL = NodeState("wire_kube", "tun", True, 4242, RULES, ROUTES, NftState(True, "table inet wirekube with 2 chains"),
                 NftState(True, "table inet wirekube_mss with 1 chains and 1 rules"))
EMPTY = NodeState("wire_kube", None)


def by_subject(findings: list[doctor.Finding]) -> dict[str, doctor.Finding]:
    return {f.subject: f for f in findings}


def test_state_without_an_agent_is_stale() -> None:
    findings = doctor.check_local(replace(FULL, agent=DOWN))
    stale = [f for f in findings if f.check == "stale-state"]
    assert [(f.subject, f.verdict) for f in stale] == [
        ("link wire_kube", doctor.FAIL), ("ip rules", doctor.FAIL), ("table 22347", doctor.FAIL),
        ("nft inet wirekube", doctor.FAIL), ("nft inet wirekube_mss", doctor.FAIL)]  # the MSS clamp is stale too
    assert all("wirekubectl cleanup" in f.fix and "restart" in f.fix for f in stale)
    assert "daemon pid 4242" in stale[0].detail and "wireguard-go" in stale[0].detail
    assert by_subject(findings)[DOWN.url].verdict == doctor.FAIL
    assert doctor.exit_code(findings) == 1


def test_one_leftover_is_enough() -> None:
    only_rules = NodeState("wire_kube", None, rules=RULES[1:], agent=DOWN)
    findings = doctor.check_local(only_rules)
    assert [f.subject for f in findings if f.verdict == doctor.FAIL] == [DOWN.url, "ip rules"]
    assert "1 WireKube rule:" in by_subject(findings)["ip rules"].detail


def test_the_same_state_with_a_running_agent_is_its_dataplane() -> None:
    findings = doctor.check_local(replace(FULL, agent=UP))
    assert {f.verdict for f in findings} == {doctor.OK}
    assert doctor.exit_code(findings) == 0
    assert "1 route:" in by_subject(findings)["table 22347"].detail


def test_a_running_agent_without_its_link_or_rules_is_a_warning() -> None:
    findings = doctor.check_local(NodeState("wire_kube", None, agent=AgentProbe(UP.url, True, False, "answers")))
    by = by_subject(findings)
    assert by[UP.url].verdict == doctor.WARN and "NOT ready" in by[UP.url].detail
    assert by["link wire_kube"].verdict == doctor.WARN and by["ip rules"].verdict == doctor.WARN
    assert by["table 22347"].verdict == doctor.OK and by["nft inet wirekube"].verdict == doctor.OK
    assert doctor.exit_code(findings) == 0


def test_no_agent_and_nothing_left_is_clean() -> None:
    findings = doctor.check_local(EMPTY)
    assert [(f.check, f.verdict) for f in findings] == [("agent-running", doctor.OK), ("stale-state", doctor.OK)]
    unknown_nft = doctor.check_local(NodeState("wire_kube", None, nft=NftState(None, "nft is not installed")))
    assert [f.verdict for f in unknown_nft if f.subject == "nft inet wirekube"] == [doctor.WARN]
    assert doctor.exit_code(unknown_nft) == 0


def test_a_foreign_rule_into_the_table_is_named_with_a_manual_fix() -> None:
    foreign = NodeState("wire_kube", None, rules=(RuleInfo("ipv4 pref 300 iif lo lookup 22347", 300, False),),
                        agent=DOWN)
    findings = doctor.check_local(foreign)
    rule = by_subject(findings)["pref 300"]
    assert rule.check == "foreign-rule" and rule.verdict == doctor.FAIL and "ip rule del pref 300" in rule.fix
    assert "ip rules" not in by_subject(findings), "no WireKube rule is left, only the foreign one"
    assert doctor.exit_code(findings) == 1


def test_probe_agent_against_a_real_health_endpoint() -> None:
    ready = [False]
    server = serve("127.0.0.1", 0, CollectorRegistry(), lambda: ready[0])
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        probe = nodestate.probe_agent(url, timeout=2)
        assert probe.healthy and probe.ready is False
        ready[0] = True
        assert nodestate.probe_agent(url, timeout=2).ready is True
    finally:
        server.shutdown()
        server.server_close()
    gone = nodestate.probe_agent(url, timeout=2)
    assert not gone.healthy and "nothing answers" in gone.detail
    assert not nodestate.probe_agent("127.0.0.1:9090").healthy


def _fake_nft(tmp_path: Path, stdout: str, stderr: str, code: int) -> str:
    (tmp_path / "out").write_text(stdout)
    (tmp_path / "err").write_text(stderr)
    script = tmp_path / "nft"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" > {tmp_path}/args\ncat {tmp_path}/out\n'
                      f'cat {tmp_path}/err >&2\nexit {code}\n')
    script.chmod(0o755)
    return str(script)


def test_nft_table_states(tmp_path: Path) -> None:
    listing = ('{"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "wirekube"}},'
               ' {"chain": {"name": "forward"}}, {"rule": {}}, {"rule": {}}]}')
    present = nodestate.nft_table(_fake_nft(tmp_path, listing, "", 0))
    assert present == NftState(True, "table inet wirekube with 1 chains and 2 rules")
    assert (tmp_path / "args").read_text().split() == ["-j", "list", "table", "inet", "wirekube"]
    absent = nodestate.nft_table(_fake_nft(tmp_path, "", "Error: No such file or directory\nlist table inet wirekube",
                                           1))
    assert absent.present is False
    mss = nodestate.nft_table(_fake_nft(tmp_path, listing.replace('"wirekube"', '"wirekube_mss"'), "", 0),
                              nodestate.NFT_MSS_TABLE)
    assert mss.present and (tmp_path / "args").read_text().split()[-1] == "wirekube_mss"
    from wirekube.agent.pmtu import MSS_TABLE
    assert nodestate.NFT_MSS_TABLE == MSS_TABLE  # doctor looks for the table the agent writes
    denied = nodestate.nft_table(_fake_nft(tmp_path, "", "Error: Operation not permitted", 1))
    assert denied.present is None and "Operation not permitted" in denied.detail


def test_local_doctor_rejects_a_node_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert wirekubectl.main(["doctor", "n1", "--local"]) == 2
    assert "--local" in capsys.readouterr().err


def test_local_doctor_reports_a_missing_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    assert wirekubectl.main(["doctor", "--local", "--netns", "/nonexistent/wkt-netns"]) == 1
    assert "network namespace /nonexistent/wkt-netns" in capsys.readouterr().err


def test_in_netns_hands_back_results_and_errors() -> None:
    with pytest.raises(Exception, match="network namespace"):
        nodestate.in_netns("/nonexistent/ns", lambda: 1)
    require_root("setns (CAP_SYS_ADMIN)")
    # The current namespace by path: the thread enters it and the result comes back.
    assert nodestate.in_netns("/proc/self/ns/net", socket.gethostname) == socket.gethostname()


def test_route_claims_list_each_ungranted_entry_with_the_grant_that_fixes_it() -> None:
    mesh = {"metadata": {"name": "default"}, "spec": {"meshCIDR": "10.255.0.0/16",
                                                     "relay": {"provider": "external",
                                                               "external": {"endpoint": "203.0.113.9:3478"}}}}
    key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="

    def peer(name: str, *ips: str) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"publicKey": key, "allowedIPs": list(ips)}}

    peers = [peer("a", "10.255.0.1/32", "10.50.0.0/24", "10.60.0.0/24"), peer("gw", "10.255.0.2/32", "10.100.0.0/24"),
             peer("evil", "10.255.0.3/32", "203.0.113.9/32")]
    grants = [{"metadata": {"name": "a-sub"}, "spec": {"nodes": ["a"], "cidrs": ["10.50.0.0/16"]}},
              {"metadata": {"name": "evil"}, "spec": {"nodes": ["evil"], "cidrs": ["203.0.113.0/24"]}}]
    gateways = [{"metadata": {"name": "vpc"}, "spec": {"peerRefs": ["gw"], "routes": [{"cidr": "10.100.0.0/24"}]},
                 "status": {"activePeer": "gw"}}]
    findings = doctor.check_route_claims(mesh, peers, gateways, grants)
    by_subject = {f.subject: f for f in findings}
    assert set(by_subject) == {"a 10.60.0.0/24", "evil 203.0.113.9/32"}
    assert all(f.verdict == doctor.WARN for f in findings)
    assert "spec.nodes [a] and spec.cidrs [10.60.0.0/24]" in by_subject["a 10.60.0.0/24"].fix
    assert "the relay 203.0.113.9:3478" in by_subject["evil 203.0.113.9/32"].detail
    clean = doctor.check_route_claims(mesh, [peer("a", "10.255.0.1/32", "10.50.0.0/24"), peers[1]], gateways, grants)
    assert [(f.verdict, f.subject) for f in clean] == [(doctor.OK, "cluster")]
