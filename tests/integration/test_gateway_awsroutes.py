"""spec.awsVPCRoutes end to end: the gateway controller against the REAL kube-apiserver + etcd and
moto's EC2 API emulator in server mode on 127.0.0.1 (real AWS is out of reach here; moto speaks the
same EC2 query API, so botocore, the requests and the answers are the real ones).

The gateway peers' agents are :class:`FakeGatewayAgents` (the contract's health reports and
forwarding acknowledgements), as in test_gateway_controller.py.  Every wait has a deadline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fixtures.wait import wait_for
from tests.integration.gateway_support import (
    HC,
    FakeGatewayAgents,
    Objects,
    condition,
    events_about,
    settings,
    status,
)
from wirekube import errors, k8s
from wirekube.gateway.awsfollower import AWSSettings
from wirekube.gateway.controller import VPC_ROUTES_SYNCED, GatewayController
from wirekube.lab.cluster import ControlPlane

pytestmark = pytest.mark.apiserver

REGION = "us-west-2"
UNKNOWN_RTB = "rtb-0000000000000dead"
# Gateways with one peer never fail over here: a lenient health check (a report counts for 16 s)
# keeps them Ready on a loaded machine, where 1 s / threshold 2 goes stale between two writes.
HC_STEADY = {**HC, "intervalSeconds": 5, "failureThreshold": 3}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's default chain finds these first; nothing may reach for a real profile or IMDS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_EC2", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)


class VPC:
    """A VPC in moto: a subnet, a route table and two instances (the gateway peers' EC2 nodes)."""

    def __init__(self, url: str) -> None:
        import botocore.session

        self.ec2 = botocore.session.get_session().create_client("ec2", region_name=REGION, endpoint_url=url)
        vpc = self.ec2.create_vpc(CidrBlock="10.100.0.0/16")["Vpc"]["VpcId"]
        subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock="10.100.0.0/24",
                                        AvailabilityZone=f"{REGION}a")["Subnet"]["SubnetId"]
        self.rtb = self.ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        image = self.ec2.describe_images()["Images"][0]["ImageId"]
        made = self.ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, SubnetId=subnet,
                                      InstanceType="t3.micro")["Instances"]
        self.instances = [i["InstanceId"] for i in made]
        self.enis = [next(n["NetworkInterfaceId"] for n in i["NetworkInterfaces"]
                          if n["Attachment"]["DeviceIndex"] == 0) for i in made]

    def routes(self, rtb: str | None = None) -> dict[str, str]:
        table = self.ec2.describe_route_tables(RouteTableIds=[rtb or self.rtb])["RouteTables"][0]
        return {r["DestinationCidrBlock"]: r.get("NetworkInterfaceId", r.get("GatewayId", ""))
                for r in table["Routes"] if "DestinationCidrBlock" in r}

    def source_dest_check(self, eni: str) -> bool:
        return bool(self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
                    ["SourceDestCheck"])


@pytest.fixture
def objects(kube: k8s.Kube, unique: str) -> Iterator[Objects]:
    made = Objects(kube, unique)
    yield made
    made.cleanup()


@pytest.fixture
def controllers(control_plane: ControlPlane, moto_url: str) -> Iterator[Callable[..., GatewayController]]:
    started: list[GatewayController] = []

    def start(namespace: str, **kw: Any) -> GatewayController:
        aws = AWSSettings(endpoint_url=moto_url, verify_period=1.0, error_backoff=0.3, max_backoff=2.0,
                          connect_timeout=2, read_timeout=5, max_attempts=1)
        c = GatewayController(k8s.Kube.from_kubeconfig(control_plane.kubeconfig),
                              settings(namespace, aws=aws, **kw)).start()
        started.append(c)
        assert c.wait_synced(20)
        return c

    yield start
    for c in started:
        c.stop()
        c.kube.close()


def ec2_node(objects: Objects, name: str, instance: str) -> None:
    objects.create(k8s.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                               "spec": {"providerID": f"aws:///{REGION}a/{instance}"}})


def hybrid_cidrs(unique: str) -> list[str]:
    second = int(unique[:2], 16)
    return [f"172.20.{second}.0/24", f"10.{second % 200 + 20}.0.0/16"]


def vpc_condition(kube: k8s.Kube, gw: str) -> dict[str, Any]:
    return condition(status(kube, k8s.GATEWAYS, gw), VPC_ROUTES_SYNCED)


def test_vpc_routes_follow_the_active_peer_through_a_failover(
    kube: k8s.Kube, control_plane: ControlPlane, objects: Objects, controllers: Callable[..., GatewayController],
    unique: str, moto_url: str,
) -> None:
    vpc = VPC(moto_url)
    a, b, h, gw = f"ec2a-{unique}", f"ec2b-{unique}", f"hyb-{unique}", f"gw-{unique}"
    eni_a, eni_b = vpc.enis
    for name, instance in ((a, vpc.instances[0]), (b, vpc.instances[1])):
        ec2_node(objects, name, instance)
    for name in (a, b, h):
        objects.peer(name)
    cidrs = hybrid_cidrs(unique)
    assert vpc.source_dest_check(eni_a) and vpc.source_dest_check(eni_b)
    # No region anywhere: it comes from the Nodes' providerID zone (us-west-2a -> us-west-2).
    objects.gateway(gw, [a, b], [f"10.100.{int(unique[:2], 16)}.0/24"], healthCheck=HC,
                    awsVPCRoutes={"routeTableIDs": [vpc.rtb], "destinationCIDRs": cidrs})
    with FakeGatewayAgents(control_plane.kubeconfig, gw, [a, b]) as agents:
        controllers(objects.namespace())
        synced = wait_for(lambda: (c := vpc_condition(kube, gw)).get("status") == "True" and c,
                          what="VPCRoutesSynced True")
        assert status(kube, k8s.GATEWAYS, gw)["activePeer"] == a
        assert synced["reason"] == "Synced" and eni_a in synced["message"] and vpc.instances[0] in synced["message"]
        assert {c: vpc.routes()[c] for c in cidrs} == {c: eni_a for c in cidrs}
        assert not vpc.source_dest_check(eni_a) and not vpc.source_dest_check(eni_b)  # every gateway peer
        (created,) = wait_for(lambda: events_about(kube, gw, "VPCRoutesCreated"), what="VPCRoutesCreated event")
        assert eni_a in created["note"] and vpc.rtb in created["note"]

        agents.failures[a] = 2  # a's health check fails: failover to b
        wait_for(lambda: status(kube, k8s.GATEWAYS, gw)["activePeer"] == b, what="failover to b")
        wait_for(lambda: all(vpc.routes().get(c) == eni_b for c in cidrs), what="VPC routes moved to b's ENI")
        moved = wait_for(lambda: (c := vpc_condition(kube, gw)).get("status") == "True" and eni_b in c["message"]
                         and c, what="VPCRoutesSynced True for b")
        assert vpc.instances[1] in moved["message"] and b in moved["message"]
        (event,) = wait_for(lambda: events_about(kube, gw, "VPCRoutesMoved"), what="VPCRoutesMoved event")
        assert f"-> {eni_b} (was {eni_a})" in event["note"] and event["type"] == "Normal"

        # Someone points a route back by hand: the periodic verification puts it right.
        vpc.ec2.replace_route(RouteTableId=vpc.rtb, DestinationCidrBlock=cidrs[0], NetworkInterfaceId=eni_a)
        assert vpc.routes()[cidrs[0]] == eni_a
        wait_for(lambda: vpc.routes()[cidrs[0]] == eni_b, timeout=10, what="drifted route repaired")


def test_unknown_route_table_is_reported_and_nothing_else_breaks(
    kube: k8s.Kube, control_plane: ControlPlane, objects: Objects, controllers: Callable[..., GatewayController],
    unique: str, moto_url: str,
) -> None:
    vpc = VPC(moto_url)
    a, h, gw, plain = f"ec2a-{unique}", f"hyb-{unique}", f"gw-{unique}", f"plain-{unique}"
    ec2_node(objects, a, vpc.instances[0])
    for name in (a, h):
        objects.peer(name)
    cidrs = hybrid_cidrs(unique)
    second = int(unique[:2], 16)
    objects.gateway(gw, [a], [f"10.100.{second}.0/24"], healthCheck=HC_STEADY,
                    awsVPCRoutes={"routeTableIDs": [UNKNOWN_RTB, vpc.rtb], "destinationCIDRs": cidrs,
                                  "region": REGION, "disableSourceDestCheck": False})
    objects.gateway(plain, [a], [f"10.101.{second}.0/24"], healthCheck=HC_STEADY)
    with FakeGatewayAgents(control_plane.kubeconfig, gw, [a]), FakeGatewayAgents(control_plane.kubeconfig, plain, [a]):
        controllers(objects.namespace())
        failed = wait_for(lambda: (c := vpc_condition(kube, gw)).get("reason") == "RouteTableNotFound" and c,
                          what="unknown route table reported")
        assert failed["status"] == "False" and UNKNOWN_RTB in failed["message"]
        assert "routeTableIDs[0]" in failed["message"]
        st = wait_for(lambda: (s := status(kube, k8s.GATEWAYS, gw)).get("ready") and s, 60, "gateway still Ready")
        assert st["activePeer"] == a and condition(st, "Ready")["status"] == "True"
        # the table that exists is synced all the same; source/dest check was left alone as asked
        wait_for(lambda: all(vpc.routes().get(c) == vpc.enis[0] for c in cidrs), what="the known table synced")
        assert vpc.source_dest_check(vpc.enis[0])
        (warning,) = wait_for(lambda: events_about(kube, gw, "VPCRoutesNotSynced"), what="warning event")
        assert warning["type"] == "Warning" and UNKNOWN_RTB in warning["note"]
        # a gateway without the field is untouched by all this
        other = wait_for(lambda: (s := status(kube, k8s.GATEWAYS, plain)).get("ready") and s, 60, "plain ready")
        assert condition(other, VPC_ROUTES_SYNCED) == {}

        # fixing the spec turns the condition True; removing the field removes the condition
        kube.patch_merge(k8s.GATEWAYS, gw, {"spec": {"awsVPCRoutes": {"routeTableIDs": [vpc.rtb]}}})
        wait_for(lambda: vpc_condition(kube, gw).get("status") == "True", what="condition True after the fix")
        kube.patch_merge(k8s.GATEWAYS, gw, {"spec": {"awsVPCRoutes": None}})
        wait_for(lambda: vpc_condition(kube, gw) == {}, what="condition removed with the field")
        assert all(vpc.routes().get(c) == vpc.enis[0] for c in cidrs)  # routes are never deleted


def test_with_aws_off_the_controller_says_so_and_calls_nothing(
    kube: k8s.Kube, control_plane: ControlPlane, objects: Objects, unique: str, moto_url: str,
) -> None:
    vpc = VPC(moto_url)
    a, gw = f"ec2a-{unique}", f"gw-{unique}"
    ec2_node(objects, a, vpc.instances[0])
    objects.peer(a)
    objects.gateway(gw, [a], [f"10.100.{int(unique[:2], 16)}.0/24"], healthCheck=HC_STEADY,
                    awsVPCRoutes={"routeTableIDs": [vpc.rtb], "destinationCIDRs": hybrid_cidrs(unique)})
    controller = GatewayController(k8s.Kube.from_kubeconfig(control_plane.kubeconfig),
                                   settings(objects.namespace(), aws=AWSSettings(enabled=False))).start()
    try:
        with FakeGatewayAgents(control_plane.kubeconfig, gw, [a]):
            off = wait_for(lambda: (c := vpc_condition(kube, gw)).get("reason") == "Disabled" and c,
                           what="Disabled reported")
            assert off["status"] == "False" and "--aws-vpc-routes=off" in off["message"]
            wait_for(lambda: status(kube, k8s.GATEWAYS, gw).get("ready"), 60, "gateway ready without AWS")
            assert controller.aws is None
            assert not any(c in vpc.routes() for c in hybrid_cidrs(unique)) and vpc.source_dest_check(vpc.enis[0])
    finally:
        controller.stop()
        controller.kube.close()


@pytest.mark.parametrize(("field", "words"), [
    ({"routeTableIDs": ["rtb-XYZ"], "destinationCIDRs": ["172.20.0.0/16"]}, "routeTableIDs[0]"),
    ({"routeTableIDs": ["rtb-0123456789abcdef0"], "destinationCIDRs": ["172.20.0.1/16"]}, "canonical"),
    ({"routeTableIDs": ["rtb-0123456789abcdef0"], "destinationCIDRs": ["nope"]}, "must be a CIDR"),
    ({"routeTableIDs": ["rtb-0123456789abcdef0"], "destinationCIDRs": ["0.0.0.0/0"]}, "default route"),
    ({"routeTableIDs": ["rtb-0123456789abcdef0"]}, "destinationCIDRs"),
    ({"routeTableIDs": ["rtb-0123456789abcdef0"], "destinationCIDRs": ["10.0.0.0/8"], "region": "mars"}, "region"),
])
def test_the_api_server_rejects_a_malformed_field(kube: k8s.Kube, unique: str, field: dict[str, Any],
                                                  words: str) -> None:
    body = {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeGateway", "metadata": {"name": f"bad-{unique}"},
            "spec": {"peerRefs": ["x"], "routes": [{"cidr": "10.0.0.0/24"}], "awsVPCRoutes": field}}
    with pytest.raises(errors.Invalid, match=f"spec\\.awsVPCRoutes.*{re.escape(words)}") as info:
        kube.create(k8s.GATEWAYS, body)
    assert "awsVPCRoutes" in str(info.value) and words in str(info.value)
