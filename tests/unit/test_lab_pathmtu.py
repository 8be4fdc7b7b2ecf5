"""The lab's small paths (issue 18): ``wanMTU``, ``dropFragments`` and ``blockICMP`` on a site."""

from __future__ import annotations

import re

import pytest

from wirekube.lab import nat
from wirekube.lab.plan import IF_WAN, plan_lab
from wirekube.lab.topology import TopologyError, parse_topology_yaml

DOC = """
internet: {relay: 198.18.0.2:3478, stun: [198.18.0.2:3478, 198.18.0.3:3478]}
sites:
  - {name: big, nat: none, nodes: [{name: big-1}]}
  - {name: small, nat: port-restricted-cone, wanMTU: 1280, dropFragments: true, blockICMP: true,
     nodes: [{name: small-1}]}
  - {name: honest, nat: none, wanMTU: 1400, nodes: [{name: honest-1}]}
"""


def test_site_options_parse_and_round_trip() -> None:
    topo = parse_topology_yaml(DOC)
    big, small, _honest = topo.sites
    assert (big.wan_mtu, big.drop_fragments, big.block_icmp) == (1500, False, False)
    assert (small.wan_mtu, small.drop_fragments, small.block_icmp) == (1280, True, True)
    assert parse_topology_yaml(topo.to_yaml()) == topo
    assert "wanMTU" not in topo.to_dict()["sites"][0]


@pytest.mark.parametrize("bad, field", [
    ("wanMTU: 575", "sites[0].wanMTU"), ("wanMTU: 1501", "sites[0].wanMTU"), ("wanMTU: true", "sites[0].wanMTU"),
    ("dropFragments: 1", "sites[0].dropFragments"), ("blockICMP: yes please", "sites[0].blockICMP"),
])
def test_bad_site_options_name_the_field(bad: str, field: str) -> None:
    doc = f"""
internet: {{relay: 198.18.0.2:3478, stun: [198.18.0.2:3478, 198.18.0.3:3478]}}
sites:
  - {{name: s, nat: none, {bad}, nodes: [{{name: s-1}}]}}
"""
    with pytest.raises(TopologyError, match=re.escape(f"{field}: must be ")) as e:
        parse_topology_yaml(doc)
    assert field in str(e.value)


def test_plan_sets_the_wan_mtu_on_both_ends_unless_icmp_is_blocked() -> None:
    plan = plan_lab(parse_topology_yaml(DOC), "t18")
    ns = {n.key: n for n in plan.namespaces}
    assert f"link set dev {IF_WAN} mtu 1280" in ns["small-router"].links
    assert f"link set dev {IF_WAN} mtu 1400" in ns["honest-router"].links
    assert not any("mtu" in line for line in ns["big-router"].links)
    inet = [line for line in ns["internet"].links if " mtu " in line]
    assert inet == ["link set dev r3-honest mtu 1400"]  # blockICMP: the internet's end keeps 1500


def test_path_ruleset() -> None:
    assert nat.path_ruleset(drop_fragments=False, block_icmp=False) == ""
    both = nat.path_ruleset(drop_fragments=True, block_icmp=True)
    assert "priority -450" in both and 'egress device "wan"' in both
    assert both.count("icmp code frag-needed") == 2  # output and forward
    icmp_only = nat.path_ruleset(drop_fragments=False, block_icmp=True)
    assert "frag-off" not in icmp_only and "netdev" not in icmp_only
    plan = plan_lab(parse_topology_yaml(DOC), "t18")
    router = {n.key: n for n in plan.namespaces}["small-router"]
    assert router.nft is not None and router.nft.endswith(both)
