"""A peer's path MTU on its routes in table 22347 (issue 18)."""

from __future__ import annotations

from tests.unit.plan_fixtures import FACTS, ME, NOW, converged, desired, mesh, net, peer
from wirekube.agent import plan as P
from wirekube.agent.plan import PeerPath, Route
from wirekube.agent.plandiff import _route_key

A = peer("a", 2, "10.200.0.0/24", "fd00::/64")
B = peer("b", 3)


def mtus(d: P.Desired) -> dict[str, int]:
    return {str(r.dst): r.mtu for r in d.routes}


def test_a_smaller_path_sets_the_mtu_on_every_route_of_that_peer_only() -> None:
    d = desired(A, B, paths={"a": PeerPath(mtu=1220), "b": PeerPath(mtu=1420)})
    got = mtus(d)
    assert got["10.200.0.0/24"] == 1220
    assert got["fd00::/64"] == 1280  # IPv6 routes never below IPv6's minimum
    assert all(v == 0 for k, v in got.items() if k.startswith("10.255.") and k != str(A.spec.allowed_ips[0]))
    assert got[str(A.spec.allowed_ips[0])] == 1220
    assert got[str(B.spec.allowed_ips[0])] == 0  # the interface's 1420 already fits
    assert "mtu 1220" in str(Route(net("10.0.0.0/8"), "wire_kube", mtu=1220))


def test_the_incremental_planner_agrees_and_an_mtu_change_is_one_replace_without_a_delete() -> None:
    inc = P.IncrementalPlanner()
    m = mesh()
    before = inc.plan(m, [ME, A, B], FACTS, {})
    assert before == P.plan(m, [ME, A, B], FACTS, {})
    after = inc.plan(m, [ME, A, B], FACTS, {"a": PeerPath(mtu=1300)})
    assert after == P.plan(m, [ME, A, B], FACTS, {"a": PeerPath(mtu=1300)})
    ops = P.diff_since(before, after, converged(before).link, converged(before).wg, tuple(before.rules), NOW)
    adds = [op.route for op in ops if isinstance(op, P.AddRoute)]
    assert {str(r.dst): r.mtu for r in adds} == {str(A.spec.allowed_ips[0]): 1300, "10.200.0.0/24": 1300,
                                                  "fd00::/64": 1300}
    assert not [op for op in ops if isinstance(op, P.DelRoute)]  # a delete by destination would undo the replace
    full = P.diff(after, converged(before), NOW)
    assert [op for op in full if isinstance(op, P.AddRoute)] == [P.AddRoute(r) for r in sorted(adds, key=_route_key)]
    assert not [op for op in full if isinstance(op, P.DelRoute)]
    assert P.diff(after, converged(after), NOW) == ()


def test_spec_mtu_is_auto_by_default_or_a_fixed_number() -> None:
    import pytest

    from wirekube.errors import WireKubeError
    from wirekube.models import PeerStatus, mesh_from_cr, peer_status_to_cr

    def spec(**kw: object) -> dict[str, object]:
        return {"metadata": {"name": "default"}, "spec": kw}
    auto = mesh_from_cr(spec()).spec
    assert (auto.mtu, auto.path_mtu) == (1420, True)
    assert mesh_from_cr(spec(mtu="auto")).spec == auto
    fixed = mesh_from_cr(spec(mtu=1420)).spec
    assert (fixed.mtu, fixed.path_mtu) == (1420, False)
    for bad in ("1420", "Auto", 1279, True):
        with pytest.raises(WireKubeError, match=r"spec.mtu: must be 'auto' or an integer"):
            mesh_from_cr(spec(mtu=bad))
    assert "pathMTU" not in peer_status_to_cr(PeerStatus())
    assert peer_status_to_cr(PeerStatus(path_mtu={"b": 1300, "a": 1220}))["pathMTU"] == {"a": 1220, "b": 1300}
