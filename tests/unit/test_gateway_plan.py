"""Route-injection planning for one gateway: status, make-before-break, Events, idempotence.

The agent is simulated with the contract's own patch builders, and patches are applied with
JSON merge patch semantics, as the API server does.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.unit.gateway_fixtures import HC, gateway_obj, mesh, net, peer, view
from wirekube import models
from wirekube.gateway import contract
from wirekube.gateway.cidrs import OwnedCIDR
from wirekube.gateway.conditions import find, merge_patch
from wirekube.gateway.plan import GatewayMemory, GatewayPlan, PlanSettings, invalid_gateway_patch, plan_gateway

SETTINGS = PlanSettings(handover_timeout=5.0, failback_after=20.0)
ROUTES = ["10.100.0.0/16", "10.101.0.0/16"]


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


class Sim:
    """A gateway object, its status as the API server would hold it, and the controller's memory."""

    def __init__(self, peer_refs: list[str], *, health: dict[str, Any] | None = HC, **kw: Any) -> None:
        self.obj = gateway_obj(peer_refs, ROUTES, health=health, **kw)
        self.memory = GatewayMemory()
        self.peers = {n: peer(n) for n in ["a", "b", "c", "h1", "h2"]}
        self.beats = 0

    def agent(self, name: str, failures: int = 0) -> None:
        self.beats += 1
        report = models.HealthReport(contract.rfc3339(1_700_000_000 + self.beats / 1e3), failures)
        self.obj = merge(self.obj, contract.health_report_patch(name, report))

    def ack(self, name: str, routes: list[str] | None = None) -> None:
        nets = None if routes is None else [net(r) for r in routes]
        epoch = self.obj["status"].get("handoverEpoch", 0)
        self.obj = merge(self.obj, contract.forwarding_ack_patch(name, nets, epoch))

    def follow(self, name: str) -> None:
        """What a compliant agent does: forward (and acknowledge) exactly while it has a duty."""
        duty = contract.forwarding_duty(models.gateway_from_cr(self.obj), name)
        ack = None if duty is None else duty.routes
        self.obj = merge(self.obj, contract.forwarding_ack_patch(name, ack, duty.epoch if duty else 0))

    def step(self, now: float, **kw: Any) -> GatewayPlan:
        gw = models.gateway_from_cr(self.obj)
        plan = plan_gateway(gw, self.obj["status"], view(*self.peers.values(), **kw), [], self.memory, now, SETTINGS)
        self.obj = merge(self.obj, {"status": dict(plan.patch)})
        self.memory = plan.memory
        return plan

    @property
    def status(self) -> dict[str, Any]:
        return self.obj["status"]  # type: ignore[no-any-return]

    def ready_reason(self) -> str:
        return str(find(self.status["conditions"], "Ready")["reason"])


def reasons(plan: GatewayPlan) -> list[str]:
    return [e.reason for e in plan.events]


def test_first_election_waits_for_forwarding_then_activates() -> None:
    sim = Sim(["a", "b"])
    sim.agent("a")
    sim.agent("b")
    plan = sim.step(100.0)
    assert (sim.status["activePeer"], sim.status["pendingPeer"], sim.status["ready"]) == ("", "a", False)
    assert sim.ready_reason() == "HandoverPending" and reasons(plan) == ["HandoverStarted"]
    assert sim.status["routes"] == ROUTES and sim.status["routesInjected"] == 0
    sim.ack("a", ROUTES)
    plan = sim.step(100.2)
    assert (sim.status["activePeer"], sim.status["pendingPeer"], sim.status["ready"]) == ("a", "", True)
    assert sim.status["routesInjected"] == 2 and reasons(plan) == ["GatewayActivated"]
    assert sim.status["clients"] == ["c", "h1", "h2"]
    assert sim.status["peerHealth"] == {"a": "healthy", "b": "healthy"}


def test_second_pass_writes_nothing() -> None:
    sim = Sim(["a", "b"])
    sim.agent("a")
    sim.agent("b")
    sim.step(100.0)
    sim.ack("a", ROUTES)
    sim.step(100.1)
    again = sim.step(100.2)
    assert again.patch == {} and again.events == ()


def active_on_a(sim: Sim) -> None:
    sim.agent("a")
    sim.agent("b")
    sim.step(100.0)
    sim.ack("a", ROUTES)
    sim.step(100.1)
    assert sim.status["activePeer"] == "a"


def test_failover_is_make_before_break_and_records_why() -> None:
    sim = Sim(["a", "b"])
    active_on_a(sim)
    sim.agent("a", failures=2)  # threshold 2 reached
    sim.agent("b")
    plan = sim.step(101.0)
    # phase 1: clients still on a, b prepares
    assert (sim.status["activePeer"], sim.status["pendingPeer"]) == ("a", "b")
    assert sim.status["peerHealth"]["a"] == "unhealthy" and sim.ready_reason() == "HandoverPending"
    assert reasons(plan) == ["HandoverStarted"]
    assert contract.forwarding_duty(models.gateway_from_cr(sim.obj), "b").phase == "pending"
    assert contract.forwarding_duty(models.gateway_from_cr(sim.obj), "a").phase == "active"
    # phase 2: b confirms, clients move
    sim.ack("b", ROUTES)
    plan = sim.step(101.3)
    assert (sim.status["activePeer"], sim.status["pendingPeer"], sim.status["ready"]) == ("b", "", True)
    (event,) = plan.events
    assert (event.reason, event.type) == ("Failover", "Warning")
    assert "from a to b" in event.message and "HealthCheckFailing" in event.message
    assert contract.forwarding_duty(models.gateway_from_cr(sim.obj), "a") is None  # a must remove its rules


def test_killed_agent_goes_stale_and_fails_over_without_any_object_changing() -> None:
    sim = Sim(["a", "b"])
    active_on_a(sim)  # a's last report was seen at 100.0
    plan = sim.step(101.0)
    assert plan.recheck_at == 103.0  # 100.0 + 2 x 1 s + 1 s: the controller must wake then
    sim.agent("b")
    sim.step(103.0)
    assert sim.status["pendingPeer"] == "b" and sim.status["peerHealth"]["a"] == "unknown"
    sim.follow("b")
    plan = sim.step(103.1)
    assert sim.status["activePeer"] == "b"
    assert "HealthReportStale" in plan.events[0].message


def test_handover_forced_when_the_new_peer_never_confirms_and_the_old_is_dead() -> None:
    sim = Sim(["a", "b"])
    active_on_a(sim)
    sim.agent("a", failures=5)
    sim.agent("b")
    plan = sim.step(101.0)
    assert plan.recheck_at == 104.0  # b's report turns stale before the handover times out (106.0)
    sim.agent("b")
    plan = sim.step(106.0)
    assert sim.status["activePeer"] == "b" and reasons(plan) == ["Failover", "HandoverForced"]
    assert sim.ready_reason() == "ForwardingNotConfirmed" and sim.status["ready"] is False


def test_no_healthy_peer_keeps_the_routes_on_the_last_active_peer() -> None:
    sim = Sim(["a", "b"])
    active_on_a(sim)
    sim.agent("a", failures=3)
    sim.agent("b", failures=3)
    plan = sim.step(101.0)
    assert sim.status["activePeer"] == "a" and sim.status["routesInjected"] == 2
    assert sim.ready_reason() == "NoHealthyPeer" and "NoHealthyPeer" in reasons(plan)
    assert sim.step(101.1).events == ()  # said once


def test_failback_after_the_preferred_peer_is_healthy_long_enough() -> None:
    sim = Sim(["a", "b"])
    active_on_a(sim)
    sim.agent("a", failures=2)
    sim.agent("b")
    sim.step(101.0)
    sim.ack("b", ROUTES)
    sim.step(101.1)
    assert sim.status["activePeer"] == "b"
    sim.follow("a")  # a is neither active nor pending: its agent removes its rules
    sim.agent("a")  # recovered
    sim.agent("b")
    plan = sim.step(102.0)
    assert sim.status["activePeer"] == "b" and sim.status["ready"] is True and plan.recheck_at == 105.0  # reports stale
    for t in (103.0, 110.0, 122.0):
        sim.agent("a")
        sim.agent("b")
        plan = sim.step(t)
    assert sim.status["pendingPeer"] == "a" and sim.status["ready"] is True  # b still serves meanwhile
    sim.ack("a", ROUTES)
    plan = sim.step(122.5)
    assert sim.status["activePeer"] == "a" and reasons(plan) == ["Failback"]


def test_route_change_needs_a_new_acknowledgement() -> None:
    sim = Sim(["a"])
    sim.agent("a")
    sim.step(100.0)
    sim.ack("a", ROUTES)
    sim.step(100.1)
    assert sim.status["ready"] is True
    sim.obj["spec"]["routes"].append({"cidr": "10.102.0.0/16"})
    sim.step(100.2)
    assert sim.status["routes"] == [*ROUTES, "10.102.0.0/16"] and sim.ready_reason() == "ForwardingNotConfirmed"
    sim.ack("a", [*ROUTES, "10.102.0.0/16"])
    sim.step(100.3)
    assert sim.status["ready"] is True


def test_health_check_disabled_elects_on_connectivity() -> None:
    sim = Sim(["a", "b"], health=None)
    sim.peers["a"] = peer("a", connected=False)
    sim.step(100.0)
    assert sim.status["pendingPeer"] == "b"
    assert sim.status["peerHealth"] == {"a": "unhealthy", "b": "healthy"}


def test_rejected_routes_are_reported_once_and_excluded() -> None:
    sim = Sim(["a"], health=None)
    sim.obj["spec"]["routes"].append({"cidr": "10.255.1.0/24"})
    plan = sim.step(100.0)
    assert "10.255.1.0/24" not in sim.status["routes"]
    cond = find(sim.status["conditions"], "RoutesAccepted")
    assert cond["status"] == "False" and "mesh CIDR" in cond["message"]
    assert "RouteRejected" in reasons(plan)
    assert "RouteRejected" not in reasons(sim.step(100.1))


def test_clients_exclude_nodes_inside_the_routes() -> None:
    sim = Sim(["a"], health=None)
    sim.step(100.0, addresses={"c": ["10.100.4.4"], "h1": ["172.20.0.5"]})
    assert sim.status["clients"] == ["b", "h1", "h2"]


def test_precedence_of_an_older_gateway() -> None:
    gw = models.gateway_from_cr(gateway_obj(["a"], ROUTES, name="young"))
    older = [OwnedCIDR(net("10.100.0.0/16"), "WireKubeGateway old")]
    plan = plan_gateway(gw, {}, view(peer("a"), m=mesh()), older, GatewayMemory(), 1.0, SETTINGS)
    assert plan.status["routes"] == ["10.101.0.0/16"]


def test_invalid_spec_sets_ready_false() -> None:
    patch = invalid_gateway_patch({"ready": True}, "WireKubeGateway/x: spec.routes[0].cidr: bad", 5.0, 3)
    assert patch["ready"] is False
    (c,) = patch["conditions"]
    assert (c["reason"], c["observedGeneration"]) == ("InvalidSpec", 3)


def test_condition_transition_time_only_moves_on_status_change() -> None:
    sim = Sim(["a"], health=None)
    sim.step(100.0)
    t0 = find(sim.status["conditions"], "Ready")["lastTransitionTime"]
    sim.obj["spec"]["routes"].append({"cidr": "10.102.0.0/16"})  # message changes, status stays False
    sim.step(200.0)
    assert find(sim.status["conditions"], "Ready")["lastTransitionTime"] == t0


# ---- the agent side of the contract -------------------------------------------------------------


def test_client_allowed_ips_across_gateways() -> None:
    gws = [
        models.gateway_from_cr(gateway_obj(["a"], ROUTES, name="vpc", status={
            "activePeer": "a", "routes": ROUTES, "clients": ["h1", "h2"]})),
        models.gateway_from_cr(gateway_obj(["h1"], ["192.168.0.0/16"], name="onprem", status={
            "activePeer": "h1", "routes": ["192.168.0.0/16"], "clients": ["a", "h2"]})),
        models.gateway_from_cr(gateway_obj(["b"], ["10.9.0.0/16"], name="idle", status={
            "activePeer": "", "routes": ["10.9.0.0/16"], "clients": ["h2"]})),
    ]
    assert contract.client_allowed_ips(gws, "h2") == {"a": (net("10.100.0.0/16"), net("10.101.0.0/16")),
                                                       "h1": (net("192.168.0.0/16"),)}
    assert contract.client_allowed_ips(gws, "h1") == {"a": (net("10.100.0.0/16"), net("10.101.0.0/16"))}
    assert contract.client_allowed_ips(gws, "c") == {}


def test_merge_patch_only_touches_owned_keys() -> None:
    current = {"peerHealth": {"a": "healthy", "gone": "unknown"}, "peerHealthDetail": {"a": {}}, "ready": False}
    desired = {"peerHealth": {"a": "healthy", "b": "unknown"}, "ready": True}
    assert merge_patch(current, desired) == {"peerHealth": {"b": "unknown", "gone": None}, "ready": True}


def test_an_acknowledgement_left_from_an_earlier_role_does_not_count() -> None:
    sim = Sim(["a", "b"])
    sim.agent("a")
    sim.agent("b")
    sim.step(100.0)
    sim.ack("a", ROUTES)
    sim.ack("b", ROUTES)  # b acknowledged for an old epoch and its agent died before withdrawing
    sim.step(100.1)
    assert sim.status["activePeer"] == "a"
    sim.agent("a", failures=2)
    sim.agent("b")
    sim.step(101.0)
    assert (sim.status["activePeer"], sim.status["pendingPeer"]) == ("a", "b")  # old ack ignored
    assert sim.status["handoverEpoch"] == 2
    sim.follow("b")
    sim.step(101.1)
    assert sim.status["activePeer"] == "b"


def test_status_does_not_churn_while_nothing_changes() -> None:
    sim = Sim(["a", "b"])
    active_on_a(sim)
    sim.step(104.0)  # both agents silent: both reports stale
    assert sim.ready_reason() == "NoHealthyPeer"
    assert sim.step(110.0).patch == {} and sim.step(500.0).patch == {}  # no ages in messages
