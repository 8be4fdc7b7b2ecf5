"""The kubelet lab's pure parts: the topology field, the built-in `chart`, and the per-node configs."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from wirekube.lab import kubelet
from wirekube.lab.topology import TopologyError, builtin_topology, parse_topology


def test_the_chart_topology_runs_kubelets_with_direct_and_relayed_pairs() -> None:
    t = builtin_topology("chart")
    assert t.kubernetes == "kubelet"
    assert {s.nat.value for s in t.sites} == {"none", "port-restricted-cone", "symmetric"}
    assert parse_topology(t.to_dict()) == t
    assert builtin_topology("default").kubernetes == "processes"
    assert "kubernetes" not in builtin_topology("default").to_dict()


@pytest.mark.parametrize(("doc", "message"), [
    ({"kubernetes": "k3s"}, "must be one of processes, kubelet, not 'k3s'"),
    ({"kubernetes": "kubelet", "pods": 1}, "no `pods:`"),
])
def test_a_bad_kubernetes_mode_is_one_clear_problem(doc: dict[str, object], message: str) -> None:
    node: dict[str, object] = {"name": "a"}
    if "pods" in doc:
        node.update(pods=1, podCIDR="10.9.0.0/24")
    with pytest.raises(TopologyError, match=re.escape(message)) as e:
        parse_topology({"kubernetes": doc["kubernetes"], "sites": [{"name": "s", "nat": "none", "nodes": [node]}]})
    assert [p for p, _ in e.value.problems] == ["kubernetes"]
    assert message in e.value.problems[0][1]


def test_node_configs_carry_this_hosts_fixes(tmp_path: Path) -> None:
    cfg = kubelet.kubelet_config(tmp_path, "192.168.2.10", tmp_path / "ca.crt")
    assert cfg["failCgroupV1"] is False and cfg["cgroupDriver"] == "cgroupfs" and cfg["failSwapOn"] is False
    assert cfg["address"] == "192.168.2.10" and cfg["containerRuntimeEndpoint"].startswith(f"unix://{tmp_path}")
    assert str(cfg["volumePluginDir"]).startswith(str(tmp_path))
    assert cfg["imageGCHighThresholdPercent"] == 100  # the images exist only locally
    toml = kubelet.containerd_config(tmp_path, "localhost/wirekube-pause:1")
    assert "restrict_oom_score_adj = true" in toml and 'sandbox_image = "localhost/wirekube-pause:1"' in toml
    subnets = {kubelet.cni_config(i)["plugins"][0]["ipam"]["ranges"][0][0]["subnet"] for i in (1, 2, 3)}
    assert len(subnets) == 3 and all(ipaddress.ip_network(s).subnet_of(ipaddress.ip_network(kubelet.POD_NET))
                                     for s in subnets)
    rules = kubelet.svc_nft_rules("10.254.0.1", 6443)
    assert "ip daddr 10.96.0.1 tcp dport 443 dnat to 10.254.0.1:6443" in rules


def test_missing_images_say_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIREKUBE_CACHE", str(tmp_path))
    with pytest.raises(kubelet.KubeletLabError, match="make images"):
        kubelet.images_env()
