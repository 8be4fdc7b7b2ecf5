"""A lab site behind a corporate proxy (issue 19), end to end with real parts.

A small lab of its own (unique name ``px<hex>``): an open site, a port-restricted-cone site, and a
``proxy-only`` site whose router lets out nothing but TCP to a real squid on the internet segment
(CONNECT to 443 only, Basic auth); two relay replicas behind the load balancer, each also serving
WSS on 443 with a certificate from the lab's CA.  The proxy site's agents get ``HTTPS_PROXY``, the
credentials file and the CA, as the chart would give them.

1. Every pair comes up, the proxy site's pairs through the relay, and their relay reasons say
   "relay over wss via proxy"; squid's access log shows the tunnel (logged when it closes: the
   test restarts one agent).
2. That node restarted with a wrong password gets ``RelayUnreachable`` / ``ProxyAuthenticationFailed``
   in its status and one error line in its log (no password in it), and every pair that does not
   involve it keeps passing traffic.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.lab import running_lab
from tests.fixtures.root import require_root
from tests.fixtures.wait import wait_for
from wirekube import k8s, reports
from wirekube.lab import orchestrate
from wirekube.lab.net import Lab

pytestmark = [pytest.mark.netns, pytest.mark.apiserver]

TOPOLOGY = """
internet:
  relay: {address: 198.18.0.2:3478, replicas: 2}
  stun: [198.18.0.2:3478, 198.18.0.3:3478]
  proxy: 198.18.0.9:3128
sites:
  - {name: open, nat: none, nodes: [{name: open-1}]}
  - {name: home, nat: port-restricted-cone, nodes: [{name: home-1}]}
  - {name: corp, nat: proxy-only, nodes: [{name: corp-1}, {name: corp-2}]}
"""
CORP = ("corp-1", "corp-2")
VIA = "relay over wss via proxy 198.18.0.9:3128"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, k8s.Kube, orchestrate.LabHandle]]:
    require_root()
    with running_lab(TOPOLOGY, f"px{uuid.uuid4().hex[:5]}", tmp_path_factory.mktemp("proxy-lab-logs"), wait=150,
                     logs="*.log") as running:
        yield running


def status(kube: k8s.Kube, node: str) -> dict[str, Any]:
    """The node's peer status with its WireKubeNodeReport folded in (relay reasons live there
    since issue 20's layout)."""
    return reports.get_peer(kube, node).get("status") or {}


def mesh_ip(kube: k8s.Kube, node: str) -> str:
    return str(kube.get(k8s.PEERS, node)["spec"]["allowedIPs"][0].split("/")[0])


def pairs_pass(lab_: Lab, kube: k8s.Kube, nodes: list[str]) -> list[tuple[str, str]]:
    """The ordered pairs among ``nodes`` whose ping does not come back (empty: all pass)."""
    ips = {n: mesh_ip(kube, n) for n in nodes}
    return [(a, b) for a in nodes for b in nodes
            if a != b and orchestrate.ping(lab_, a, ips[b], count=2, timeout=2.0) is None]


def test_every_pair_up_with_the_proxy_site_over_wss_through_squid(lab: Any) -> None:
    lab_, kube, _ = lab
    nodes = sorted(lab_.nodes)
    wait_for(lambda: not pairs_pass(lab_, kube, nodes), timeout=120, interval=2,
             what="every ordered pair to pass traffic")
    for node in CORP:
        wait_for(lambda n=node: (r := status(kube, n).get("relayReasons", {}))
                 and len(r) == len(nodes) - 1 and all(VIA in why for why in r.values()),
                 timeout=60, what=f"{node}: every peer relayed over wss via the proxy")
        assert status(kube, node).get("udpBlocked") is True
    # the other sites see the proxy site's nodes through the relay too
    assert set(status(kube, "open-1").get("relayReasons", {})) == set(CORP)


def test_a_wrong_proxy_password_is_reported_and_nothing_else_breaks(lab: Any, tmp_path: Path) -> None:
    lab_, kube, handle = lab
    victim = "corp-2"
    for record in orchestrate.running_agents(lab_, victim):
        lab_.stop(record.pid)
    # The victim's tunnel outlives its agent (the relay path process holds it, issue 16): the
    # agent restarted with other credentials replaces it, and squid logs a tunnel when it ends.
    wrong = tmp_path / "wrong-credentials"  # not in the lab's workdir: down leaves files it did not make
    wrong.write_text("wirekube-lab:definitely-not-the-password\n")
    orchestrate.start_agent(lab_, handle, victim, credentials=str(wrong))

    def refused() -> dict[str, Any] | None:
        found = [c for c in status(kube, victim).get("conditions", []) if c.get("type") == "RelayUnreachable"]
        return found[0] if found and found[0].get("status") == "True" else None

    condition = wait_for(refused, timeout=90, interval=1, what=f"{victim}: RelayUnreachable in its status")
    wait_for(lambda: any("CONNECT 198.18.0.2:443 wirekube-lab" in line and "TCP_TUNNEL/200" in line
                         for line in orchestrate.squid_access_log(lab_)),
             timeout=30, what="squid's access log to show the replaced CONNECT tunnel to the relay's 443")
    assert condition["reason"] == "ProxyAuthenticationFailed"
    assert "refused the proxy credentials" in condition["message"] and "407" in condition["message"]
    log = (lab_.log_dir / f"agent-{victim}.log").read_text(errors="replace")
    assert "relay unreachable (ProxyAuthenticationFailed)" in log
    assert "definitely-not-the-password" not in log + condition["message"]
    assert any("TCP_DENIED/407" in line for line in orchestrate.squid_access_log(lab_))
    others = sorted(n for n in lab_.nodes if n != victim)
    wait_for(lambda: not pairs_pass(lab_, kube, others), timeout=60, interval=2,
             what="every pair without the victim to keep passing traffic")
