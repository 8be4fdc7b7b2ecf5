"""spec.awsVPCRoutes: parsing, where routes point, the idempotent route plan, and one sync against a
fake EC2 (the real EC2 API emulator is in tests/integration/test_gateway_awsroutes.py)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from wirekube import errors
from wirekube.gateway import awsroutes as ar
from wirekube.gateway.awsfollower import AWSCallError, AWSSettings, RouteFollower, problem_of, sync
from wirekube.models import ForwardingAck, IPNetwork

RTB_A, RTB_B = "rtb-0123456789abcdef0", "rtb-0fedcba9876543210"
ENI_A, ENI_B = "eni-0aaaaaaaaaaaaaaaa", "eni-0bbbbbbbbbbbbbbbb"
I_A, I_B = "i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb"
HYBRID = [ipaddress.ip_network("172.20.0.0/16"), ipaddress.ip_network("10.200.0.0/16")]
ROUTES = (ipaddress.ip_network("10.100.0.0/24"),)


def gw(field: Any, name: str = "vpc") -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"peerRefs": ["ec2-a"], "routes": [{"cidr": "10.100.0.0/24"}],
                                                 "awsVPCRoutes": field}}


def spec(**kw: Any) -> dict[str, Any]:
    return {"routeTableIDs": [RTB_A], "destinationCIDRs": ["172.20.0.0/16"], **kw}


def node(name: str, provider_id: str | None) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"providerID": provider_id} if provider_id else {}}


# ---- parsing -----------------------------------------------------------------------------------------


def test_absent_field_is_none_and_a_full_one_parses_with_defaults() -> None:
    assert ar.vpc_routes_from_cr({"metadata": {"name": "x"}, "spec": {"peerRefs": ["a"]}}) is None
    parsed = ar.vpc_routes_from_cr(gw(spec(routeTableIDs=[RTB_A, RTB_B], destinationCIDRs=["172.20.0.0/16",
                                                                                           "fd00:1::/64"])))
    assert parsed == ar.VPCRoutes((RTB_A, RTB_B), (ipaddress.ip_network("172.20.0.0/16"),
                                                  ipaddress.ip_network("fd00:1::/64")), True, "")
    off = ar.vpc_routes_from_cr(gw(spec(disableSourceDestCheck=False, region="us-gov-west-1")))
    assert off is not None and off.disable_source_dest_check is False and off.region == "us-gov-west-1"
    assert ar.vpc_routes_from_cr(gw(spec(routeTableIDs=["rtb-0123abcd"]))) is not None  # old 8-digit IDs


@pytest.mark.parametrize(("field", "path", "words"), [
    (spec(routeTableIDs=[RTB_A, "rtb-XYZ"]), "spec.awsVPCRoutes.routeTableIDs[1]", "not a route table ID"),
    (spec(routeTableIDs=[RTB_A, RTB_A]), "spec.awsVPCRoutes.routeTableIDs[1]", "listed twice"),
    (spec(routeTableIDs=[]), "spec.awsVPCRoutes.routeTableIDs", "needs 1 to 50"),
    (spec(routeTableIDs=[f"rtb-{i:017x}" for i in range(51)]), "spec.awsVPCRoutes.routeTableIDs", "got 51"),
    (spec(routeTableIDs="rtb-0123456789abcdef0"), "spec.awsVPCRoutes.routeTableIDs", "must be a list"),
    ({"destinationCIDRs": ["172.20.0.0/16"]}, "spec.awsVPCRoutes.routeTableIDs", "got 0"),
    (spec(destinationCIDRs=["172.20.0.1/16"]), "spec.awsVPCRoutes.destinationCIDRs[0]", "canonical"),
    (spec(destinationCIDRs=["10.0.0.0/8", "0.0.0.0/0"]), "spec.awsVPCRoutes.destinationCIDRs[1]", "every destination"),
    (spec(destinationCIDRs=["10.0.0.0/8", "10.0.0.0/8"]), "spec.awsVPCRoutes.destinationCIDRs[1]", "listed twice"),
    (spec(destinationCIDRs=[]), "spec.awsVPCRoutes.destinationCIDRs", "needs 1 to 50"),
    (spec(region="US-West-2"), "spec.awsVPCRoutes.region", "not an AWS region"),
    (spec(disableSourceDestCheck="yes"), "spec.awsVPCRoutes.disableSourceDestCheck", "true or false"),
    (spec(routeTables=[RTB_A]), "spec.awsVPCRoutes.routeTables", "unknown field"),
    ("rtb-0123456789abcdef0", "spec.awsVPCRoutes", "must be an object"),
])
def test_invalid_fields_are_named_by_path(field: Any, path: str, words: str) -> None:
    with pytest.raises(errors.InvalidObject, match=f"{re.escape(path)}: .*{re.escape(words)}") as info:
        ar.vpc_routes_from_cr(gw(field))
    assert info.value.field == path and words in info.value.reason
    assert str(info.value).startswith(f"WireKubeGateway/vpc: {path}: ")


def test_provider_ids_and_regions() -> None:
    assert ar.instance_of("n", node("n", f"aws:///us-west-2a/{I_A}")) == ar.Instance("n", I_A, "us-west-2a")
    assert ar.instance_of("n", node("n", f"aws:////{I_A}")) is None  # an empty zone segment is malformed
    assert ar.instance_of("n", node("n", "eks-hybrid:///us-west-2/my-cluster/mi-0123")) is None
    assert ar.instance_of("n", node("n", None)) is None and ar.instance_of("n", None) is None
    assert ar.region_of_zone("us-west-2a") == "us-west-2"
    assert ar.region_of_zone("us-gov-west-1b") == "us-gov-west-1"
    assert ar.region_of_zone("us-west-2-lax-1a") == "us-west-2"  # a Local Zone
    assert ar.region_of_zone("ap-southeast-2c") == "ap-southeast-2" and ar.region_of_zone("") == ""


# ---- where the routes point ----------------------------------------------------------------------------


NODES = {"ec2-a": node("ec2-a", f"aws:///us-west-2a/{I_A}"), "ec2-b": node("ec2-b", f"aws:///us-west-2b/{I_B}"),
         "onprem": node("onprem", None)}
ACKED = {"ec2-a": ForwardingAck(True, ROUTES, 1), "ec2-b": ForwardingAck(True, ROUTES, 2)}
VPC = ar.VPCRoutes((RTB_A,), tuple(HYBRID))


def target(active: str, forwarding: dict[str, ForwardingAck] | None = None, **kw: Any) -> ar.Target | ar.Waiting:
    refs = kw.pop("refs", ("ec2-a", "ec2-b"))
    return ar.target_for("vpc", kw.pop("spec", VPC), refs, active, ACKED if forwarding is None else forwarding,
                         ROUTES, kw.pop("nodes", NODES), **kw)


def test_routes_move_only_to_an_active_peer_that_confirmed_forwarding() -> None:
    assert target("") == ar.Waiting(ar.NO_ACTIVE_PEER, target("").message)  # type: ignore[union-attr]
    waiting = target("ec2-b", {"ec2-a": ACKED["ec2-a"]})
    assert isinstance(waiting, ar.Waiting) and waiting.reason == ar.FORWARDING_NOT_CONFIRMED
    assert "ec2-b" in waiting.message
    stale = target("ec2-b", {"ec2-b": ForwardingAck(True, (ipaddress.ip_network("10.9.0.0/24"),), 2)})
    assert isinstance(stale, ar.Waiting)  # an acknowledgement for other routes does not count
    # ... but routes already following ec2-b stay while it re-confirms a route change
    kept = target("ec2-b", {}, followed_peer="ec2-b")
    assert isinstance(kept, ar.Target) and kept.active.instance_id == I_B

    t = target("ec2-b")
    assert isinstance(t, ar.Target)
    assert t.active == ar.Instance("ec2-b", I_B, "us-west-2b") and t.region == "us-west-2"
    assert [p.instance_id for p in t.peers] == [I_A, I_B] and t.skipped == ()


def test_region_precedence_and_nodes_that_are_not_ec2() -> None:
    t = target("ec2-a", default_region="eu-west-1")
    assert isinstance(t, ar.Target) and t.region == "eu-west-1"
    t = target("ec2-a", default_region="eu-west-1", spec=ar.VPCRoutes((RTB_A,), tuple(HYBRID), region="ap-south-1"))
    assert isinstance(t, ar.Target) and t.region == "ap-south-1"
    t = target("ec2-a", refs=("ec2-a", "onprem", "ghost"))
    assert isinstance(t, ar.Target) and t.skipped == ("onprem", "ghost") and len(t.peers) == 1
    w = target("onprem", {"onprem": ForwardingAck(True, ROUTES, 1)}, refs=("onprem",))
    assert isinstance(w, ar.Waiting) and w.reason == ar.NO_AWS_PROVIDER_ID and "aws:///" in w.message
    w = target("ghost", {"ghost": ForwardingAck(True, ROUTES, 1)}, refs=("ghost",))
    assert isinstance(w, ar.Waiting) and w.reason == ar.NODE_NOT_FOUND
    zoneless = {"ec2-a": node("ec2-a", f"aws://x/{I_A}")}
    w = target("ec2-a", nodes=zoneless, refs=("ec2-a",))
    assert isinstance(w, ar.Waiting) and w.reason == ar.NO_REGION


def test_two_gateways_claiming_one_route_the_older_wins() -> None:
    first = ar.VPCRoutes((RTB_A, RTB_B), (HYBRID[0],))
    other_cidr = ar.VPCRoutes((RTB_A,), (HYBRID[1],))
    clash = ar.VPCRoutes((RTB_B,), tuple(HYBRID))
    out = ar.conflicts([("old", first), ("fine", other_cidr), ("new", clash)])
    assert set(out) == {"new"}
    assert "172.20.0.0/16 in " + RTB_B in out["new"] and "WireKubeGateway old" in out["new"]


# ---- the idempotent plan ------------------------------------------------------------------------------


def route(cidr: str, **target: str) -> dict[str, Any]:
    key = "DestinationIpv6CidrBlock" if ":" in cidr else "DestinationCidrBlock"
    return {key: cidr, "Origin": "CreateRoute", "State": "active", **target}


LOCAL = {"DestinationCidrBlock": "10.100.0.0/16", "GatewayId": "local", "Origin": "CreateRouteTable", "State": "active"}


def apply(tables: dict[str, list[dict[str, Any]]], actions: tuple[ar.RouteAction, ...]) -> None:
    """What AWS does with the plan's calls (to show a second plan is empty)."""
    for a in actions:
        routes = tables[a.route_table_id]
        if a.op == ar.REPLACE:
            routes[:] = [r for r in routes if not (ar.route_destination(r) == a.cidr and r["Origin"] == "CreateRoute")]
        routes.append(route(str(a.cidr), NetworkInterfaceId=a.eni))


def test_plan_creates_missing_replaces_wrong_and_leaves_right_routes() -> None:
    tables = {
        RTB_A: [LOCAL, route("172.20.0.0/16", NetworkInterfaceId=ENI_A)],
        RTB_B: [LOCAL, route("172.20.0.0/16", NetworkInterfaceId=ENI_B),
                {"DestinationCidrBlock": "10.200.0.0/16", "GatewayId": "vgw-1", "Origin": "EnableVgwRoutePropagation",
                 "State": "active"}],
    }
    actions, problems = ar.plan_routes(tables, [RTB_A, RTB_B], HYBRID, ENI_B)
    assert problems == ()
    assert [(a.op, a.route_table_id, str(a.cidr), a.previous) for a in actions] == [
        (ar.REPLACE, RTB_A, "172.20.0.0/16", ENI_A),
        (ar.CREATE, RTB_A, "10.200.0.0/16", ""),
        (ar.CREATE, RTB_B, "10.200.0.0/16", ""),  # a static route overrides the propagated one
    ]
    assert str(actions[0]) == f"{RTB_A}: 172.20.0.0/16 -> {ENI_B} (was {ENI_A})"
    apply(tables, actions)
    assert ar.plan_routes(tables, [RTB_A, RTB_B], HYBRID, ENI_B) == ((), ())  # idempotent


@pytest.mark.parametrize("routes", [
    [], [route("172.20.0.0/16", NetworkInterfaceId=ENI_A)], [route("172.20.0.0/16", GatewayId="igw-1")],
    [route("172.20.0.0/16", TransitGatewayId="tgw-1"), route("10.200.0.0/16", NetworkInterfaceId=ENI_B)],
    [{**route("172.20.0.0/16", NetworkInterfaceId=ENI_A), "State": "blackhole"}],
    [route("fd00:1::/64", NetworkInterfaceId=ENI_A)],
])
def test_plan_converges_in_one_step_from_any_table(routes: list[dict[str, Any]]) -> None:
    cidrs: list[IPNetwork] = [*HYBRID, ipaddress.ip_network("fd00:1::/64")]
    tables = {RTB_A: [LOCAL, *routes]}
    actions, problems = ar.plan_routes(tables, [RTB_A], cidrs, ENI_B)
    assert problems == () and all(a.eni == ENI_B for a in actions)
    assert len(actions) == len(cidrs) - sum(1 for r in routes if r.get("NetworkInterfaceId") == ENI_B)
    apply(tables, actions)
    assert ar.plan_routes(tables, [RTB_A], cidrs, ENI_B) == ((), ())


def test_plan_reports_missing_tables_and_local_route_clashes() -> None:
    tables = {RTB_A: [LOCAL]}
    actions, problems = ar.plan_routes(tables, [RTB_B, RTB_A], [ipaddress.ip_network("10.100.0.0/16")], ENI_A)
    assert actions == ()
    assert [p.reason for p in problems] == ["RouteTableNotFound", "LocalRouteConflict"]
    assert RTB_B in problems[0].message and "routeTableIDs[0]" in problems[0].message
    blackholed = ar.route_target({**route("1.0.0.0/8", NetworkInterfaceId=ENI_A), "State": "blackhole"})
    assert blackholed == f"blackhole ({ENI_A})"


def test_primary_enis_are_device_index_zero() -> None:
    inst = {"InstanceId": I_A, "NetworkInterfaces": [
        {"NetworkInterfaceId": "eni-second", "Attachment": {"DeviceIndex": 1}, "SourceDestCheck": True},
        {"NetworkInterfaceId": ENI_A, "Attachment": {"DeviceIndex": 0}, "SourceDestCheck": False},
    ]}
    assert ar.primary_enis([inst, {"InstanceId": I_B, "NetworkInterfaces": []}]) == {I_A: (ENI_A, False)}


# ---- one sync against a fake EC2 ----------------------------------------------------------------------


class FakeEC2:
    """The EC2 calls the follower makes, over in-memory state; ``deny`` makes an operation fail."""

    def __init__(self) -> None:
        self.instances = {I_A: [ENI_A, True], I_B: [ENI_B, True]}
        self.tables: dict[str, list[dict[str, Any]]] = {RTB_A: [LOCAL], RTB_B: [LOCAL]}
        self.calls: list[str] = []
        self.deny: dict[str, str] = {}

    def _call(self, op: str) -> None:
        self.calls.append(op)
        if op in self.deny:
            raise AWSCallError(op, self.deny[op], "You are not authorized to perform this operation. "
                                                  "Encoded authorization failure message: AAAA")

    def describe_instances(self, ids: list[str]) -> list[dict[str, Any]]:
        self._call("DescribeInstances")
        return [{"InstanceId": i, "NetworkInterfaces": [{"NetworkInterfaceId": self.instances[i][0], "SourceDestCheck":
                 self.instances[i][1], "Attachment": {"DeviceIndex": 0}}]} for i in ids if i in self.instances]

    def describe_route_tables(self, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        self._call("DescribeRouteTables")
        return {i: list(self.tables[i]) for i in ids if i in self.tables}

    def create_route(self, rtb: str, cidr: IPNetwork, eni: str) -> None:
        self._call("CreateRoute")
        self.tables[rtb].append(route(str(cidr), NetworkInterfaceId=eni))

    def replace_route(self, rtb: str, cidr: IPNetwork, eni: str) -> None:
        self._call("ReplaceRoute")
        self.tables[rtb] = [r for r in self.tables[rtb] if ar.route_destination(r) != cidr]
        self.tables[rtb].append(route(str(cidr), NetworkInterfaceId=eni))

    def disable_source_dest_check(self, eni: str) -> None:
        self._call("ModifyNetworkInterfaceAttribute")
        next(v for v in self.instances.values() if v[0] == eni)[1] = False


def two_table_target(active: str = "ec2-a") -> ar.Target:
    t = target(active, spec=ar.VPCRoutes((RTB_A, RTB_B), tuple(HYBRID)))
    assert isinstance(t, ar.Target)
    return t


def test_sync_does_what_is_missing_then_nothing() -> None:
    ec2 = FakeEC2()
    first = sync(ec2, two_table_target())
    assert first.ok and first.reason == "Synced" and first.eni == ENI_A
    assert len(first.applied) == 4 and first.source_dest_check_disabled == (ENI_A, ENI_B)
    assert ec2.calls.count("ModifyNetworkInterfaceAttribute") == 2 and ec2.calls.count("CreateRoute") == 4
    assert f"point at {ENI_A}" in first.message and "ec2-a" in first.message

    ec2.calls.clear()
    again = sync(ec2, two_table_target())  # the periodic verification: reads only
    assert again.ok and again.applied == () and ec2.calls == ["DescribeInstances", "DescribeRouteTables"]

    moved = sync(ec2, two_table_target("ec2-b"))
    assert moved.ok and {a.op for a in moved.applied} == {ar.REPLACE} and len(moved.applied) == 4
    assert all(a.previous == ENI_A and a.eni == ENI_B for a in moved.applied)


def test_access_denied_names_the_iam_action_and_the_route_table() -> None:
    ec2 = FakeEC2()
    ec2.deny["CreateRoute"] = "UnauthorizedOperation"
    result = sync(ec2, two_table_target())
    assert not result.ok and result.reason == "AccessDenied"
    assert "ec2:CreateRoute" in result.message and RTB_A in result.message
    assert "Encoded authorization" not in result.message  # AWS's opaque blob is left out
    assert result.source_dest_check_disabled == (ENI_A, ENI_B)  # what was allowed still happened

    ec2 = FakeEC2()
    ec2.deny["ModifyNetworkInterfaceAttribute"] = "UnauthorizedOperation"
    result = sync(ec2, two_table_target())
    assert result.reason == "AccessDenied" and "ec2:ModifyNetworkInterfaceAttribute" in result.message
    assert ENI_A in result.message and len(result.applied) == 4  # the routes still moved


def test_missing_table_or_instance_fails_but_the_rest_is_synced() -> None:
    ec2 = FakeEC2()
    del ec2.tables[RTB_B]
    result = sync(ec2, two_table_target())
    assert not result.ok and result.reason == "RouteTableNotFound" and RTB_B in result.message
    assert {a.route_table_id for a in result.applied} == {RTB_A}

    ec2 = FakeEC2()
    del ec2.instances[I_A]
    result = sync(ec2, two_table_target())
    assert result.reason == "InstanceNotFound" and I_A in result.message and result.applied == ()
    assert "DescribeRouteTables" not in ec2.calls  # nothing to point the routes at


@pytest.mark.parametrize(("code", "reason"), [
    ("UnauthorizedOperation", "AccessDenied"), ("AuthFailure", "CredentialsRejected"),
    ("NoCredentialsError", "NoCredentials"), ("RequestLimitExceeded", "Throttled"),
    ("EndpointConnectionError", "AWSUnreachable"), ("InvalidRouteTableID.NotFound", "RouteTableNotFound"),
    ("InternalError", "AWSError"),
])
def test_error_codes_become_condition_reasons(code: str, reason: str) -> None:
    assert problem_of(AWSCallError("ReplaceRoute", code, "x"), RTB_A).reason == reason


# ---- the follower's schedule ----------------------------------------------------------------------------


def test_follower_syncs_on_change_verifies_slowly_and_backs_off_on_errors() -> None:
    now = [1000.0]
    ec2 = FakeEC2()
    changes: list[int] = []
    follower = RouteFollower(AWSSettings(verify_period=60, error_backoff=5, max_backoff=20),
                             on_change=lambda: changes.append(1), ec2=lambda region: ec2, clock=lambda: now[0])
    assert follower.run_once() is None and ec2.calls == []  # nothing to follow: no AWS call at all
    follower.set_targets({"vpc": two_table_target()})
    assert follower.run_once() == 1060.0
    result = follower.result("vpc")
    assert result is not None and result.ok and changes == [1]
    ec2.calls.clear()
    now[0] = 1059.0
    assert follower.run_once() == 1060.0 and ec2.calls == []  # not due: no call
    now[0] = 1060.0
    follower.run_once()
    assert ec2.calls == ["DescribeInstances", "DescribeRouteTables"] and changes == [1]  # same outcome: quiet

    ec2.deny["DescribeRouteTables"] = "RequestLimitExceeded"
    follower.set_targets({"vpc": two_table_target("ec2-b")})  # a failover: synced at once
    assert follower.run_once() == 1065.0
    now[0] = 1065.0
    assert follower.run_once() == 1075.0  # 5, 10, 20, 20 s
    now[0] = 1075.0
    assert follower.run_once() == 1095.0
    now[0] = 1095.0
    assert follower.run_once() == 1115.0
    failed = follower.result("vpc")
    assert failed is not None and failed.reason == "Throttled" and not failed.ok

    del ec2.deny["DescribeRouteTables"]
    now[0] = 1115.0
    follower.run_once()
    ok = follower.result("vpc")
    assert ok is not None and ok.ok and ok.eni == ENI_B and ok.seq > failed.seq
    follower.set_targets({})
    assert follower.result("vpc") is None and follower.run_once() is None


# ---- the command line -----------------------------------------------------------------------------------


def test_aws_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from wirekube.gateway.main import build_parser, settings_from_args

    for var in ("WIREKUBE_AWS_VPC_ROUTES", "WIREKUBE_AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    aws = settings_from_args(build_parser().parse_args([])).controller.aws
    assert aws.enabled and aws.endpoint_url == "" and aws.default_region == "" and aws.verify_period == 60.0

    monkeypatch.setenv("WIREKUBE_AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    aws = settings_from_args(build_parser().parse_args(["--aws-verify-period", "30"])).controller.aws
    assert (aws.endpoint_url, aws.default_region, aws.verify_period) == ("http://127.0.0.1:5000", "eu-central-1", 30)
    monkeypatch.setenv("AWS_REGION", "us-east-2")  # what IRSA injects wins
    monkeypatch.setenv("WIREKUBE_AWS_VPC_ROUTES", "off")
    aws = settings_from_args(build_parser().parse_args(["--aws-endpoint-url", "http://x:1"])).controller.aws
    assert not aws.enabled and aws.endpoint_url == "http://x:1" and aws.default_region == "us-east-2"
    with pytest.raises(SystemExit, match="aws-verify-period"):
        settings_from_args(build_parser().parse_args(["--aws-verify-period", "1"]))
