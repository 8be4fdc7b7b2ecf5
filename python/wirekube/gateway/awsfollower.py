"""The AWS route follower: the I/O half of ``spec.awsVPCRoutes`` (:mod:`~wirekube.gateway.awsroutes`).

One thread beside the controller's worker, so slow or failing AWS calls never delay an election.
The controller hands it a :class:`~wirekube.gateway.awsroutes.Target` per gateway after every
pass (:meth:`RouteFollower.set_targets`); the follower syncs a gateway

* at once when its target changed (a failover, a spec change),
* every ``verify_period`` seconds after a success (routes changed by hand are put back),
* after an error, with exponential backoff from ``error_backoff`` up to ``max_backoff``,

and nothing in between, so there is no call storm.  One sync is one DescribeInstances for the
gateway peers' instances, a ModifyNetworkInterfaceAttribute for each primary ENI whose
source/destination check is still on (with ``disableSourceDestCheck``), one DescribeRouteTables,
and a CreateRoute/ReplaceRoute only for each route that is missing or wrong.  The controller reads
the outcome (:meth:`RouteFollower.result`) into the VPCRoutesSynced condition and Events; the
follower wakes it when an outcome changes.

Credentials come from botocore's default chain (IRSA's web identity token in the chart, or the
environment, a profile, the instance role); nothing here reads, stores or logs them.  botocore
is imported only when a gateway asks for AWS routes (``pip install wirekube[aws]``; the gateway
image has it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from loguru import logger

from wirekube.gateway.awsroutes import (
    IAM_ACTIONS,
    PATH,
    RouteAction,
    RouteProblem,
    Target,
    plan_routes,
    primary_enis,
)
from wirekube.models import IPNetwork

SYNCED = "Synced"
SYNCING = "Syncing"
DISABLED = "Disabled"

_ACCESS_DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "Forbidden"}
_BAD_CREDENTIALS = {"AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
                    "ExpiredToken", "RequestExpired", "InvalidAccessKeyId"}
_THROTTLED = {"RequestLimitExceeded", "Throttling", "ThrottlingException"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"}


@dataclass(frozen=True)
class AWSSettings:
    enabled: bool = True
    """False: never call AWS; gateways with spec.awsVPCRoutes say so in VPCRoutesSynced."""
    endpoint_url: str = ""
    """EC2 endpoint override (tests against an emulator, VPC interface endpoints); empty = AWS's."""
    default_region: str = ""
    """Used when spec.awsVPCRoutes.region is empty ($AWS_REGION); else the active node's zone's."""
    verify_period: float = 60.0
    error_backoff: float = 5.0
    max_backoff: float = 300.0
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    max_attempts: int = 3
    """botocore's standard retry mode (throttling and transient errors), per call."""


class AWSCallError(Exception):
    """An EC2 call that failed: the operation, AWS's error code and message."""

    def __init__(self, op: str, code: str, message: str) -> None:
        self.op = op
        self.code = code
        self.message = message
        super().__init__(f"{op}: {code}: {message}")


class EC2Api(Protocol):
    def describe_instances(self, instance_ids: Sequence[str]) -> list[dict[str, Any]]: ...

    def describe_route_tables(self, route_table_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]: ...

    def create_route(self, route_table_id: str, cidr: IPNetwork, eni: str) -> None: ...

    def replace_route(self, route_table_id: str, cidr: IPNetwork, eni: str) -> None: ...

    def disable_source_dest_check(self, eni: str) -> None: ...


class BotocoreEC2:
    """:class:`EC2Api` over a botocore EC2 client; every failure becomes :class:`AWSCallError`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def _call(self, op: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return dict(getattr(self._client, _snake(op))(**params))
        except ClientError as e:
            err = e.response.get("Error") or {}
            raise AWSCallError(op, str(err.get("Code") or "Unknown"), str(err.get("Message") or "")) from None
        except BotoCoreError as e:
            raise AWSCallError(op, type(e).__name__, str(e)) from None

    def _pages(self, op: str, key: str, **params: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token = ""
        for _ in range(100):
            page = self._call(op, **params, **({"NextToken": token} if token else {}))
            out.extend(page.get(key) or [])
            token = str(page.get("NextToken") or "")
            if not token:
                break
        return out

    def describe_instances(self, instance_ids: Sequence[str]) -> list[dict[str, Any]]:
        # A filter, not InstanceIds: one unknown ID must not hide the others.
        reservations = self._pages("DescribeInstances", "Reservations",
                                   Filters=[{"Name": "instance-id", "Values": list(instance_ids)}])
        return [i for r in reservations for i in r.get("Instances") or []]

    def describe_route_tables(self, route_table_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        tables = self._pages("DescribeRouteTables", "RouteTables",
                             Filters=[{"Name": "route-table-id", "Values": list(route_table_ids)}])
        return {str(t["RouteTableId"]): list(t.get("Routes") or []) for t in tables}

    def create_route(self, route_table_id: str, cidr: IPNetwork, eni: str) -> None:
        self._call("CreateRoute", RouteTableId=route_table_id, NetworkInterfaceId=eni, **_destination(cidr))

    def replace_route(self, route_table_id: str, cidr: IPNetwork, eni: str) -> None:
        self._call("ReplaceRoute", RouteTableId=route_table_id, NetworkInterfaceId=eni, **_destination(cidr))

    def disable_source_dest_check(self, eni: str) -> None:
        self._call("ModifyNetworkInterfaceAttribute", NetworkInterfaceId=eni, SourceDestCheck={"Value": False})


def _destination(cidr: IPNetwork) -> dict[str, str]:
    return {"DestinationCidrBlock" if cidr.version == 4 else "DestinationIpv6CidrBlock": str(cidr)}


def _snake(op: str) -> str:
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in op).lstrip("_")


def botocore_factory(settings: AWSSettings) -> Callable[[str], EC2Api]:
    """region -> :class:`BotocoreEC2`, one botocore session for all (its credentials are cached)."""
    session: list[Any] = []

    def make(region: str) -> EC2Api:
        try:
            import botocore.session
            from botocore.config import Config
        except ImportError:
            raise AWSCallError("", "BotocoreMissing", "botocore is not installed (pip install 'wirekube[aws]'; "
                                                      "the gateway image has it)") from None
        if not session:
            session.append(botocore.session.get_session())
        config = Config(connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
                        retries={"mode": "standard", "max_attempts": settings.max_attempts},
                        user_agent_extra="wirekube-gateway")
        client = session[0].create_client("ec2", region_name=region, endpoint_url=settings.endpoint_url or None,
                                          config=config)
        return BotocoreEC2(client)

    return make


# ---------------------------------------------------------------------------------- one sync


@dataclass(frozen=True)
class SyncResult:
    target: Target
    ok: bool
    reason: str
    message: str
    applied: tuple[RouteAction, ...] = ()
    """Routes created or replaced by this sync (each an Event)."""
    source_dest_check_disabled: tuple[str, ...] = ()
    eni: str = ""
    seq: int = 0


def problem_of(error: AWSCallError, subject: str) -> RouteProblem:
    """A failed call as the condition's reason and a message naming what to fix."""
    code, op = error.code, error.op
    on = f" on {subject}" if subject else ""
    if code in _ACCESS_DENIED:
        return RouteProblem("AccessDenied", f"{op}{on} denied ({code}): the controller's IAM role needs ec2:{op} "
                                            f"(all it needs: {', '.join(IAM_ACTIONS)})")
    if code == "NoCredentialsError":
        return RouteProblem("NoCredentials", "no AWS credentials found (IRSA: annotate the controller's "
                                             "ServiceAccount with eks.amazonaws.com/role-arn)")
    if code in _BAD_CREDENTIALS:
        return RouteProblem("CredentialsRejected", f"{op}{on}: AWS rejected the credentials ({code})")
    if code in _THROTTLED:
        return RouteProblem("Throttled", f"{op}{on}: throttled by AWS ({code}); retrying with backoff")
    if code in _UNREACHABLE:
        return RouteProblem("AWSUnreachable", f"{op}{on}: {error.message[:300]}")
    if code.startswith("InvalidRouteTableID"):
        return RouteProblem("RouteTableNotFound", f"{op}{on}: {code}: {error.message[:300]}")
    if code.startswith("InvalidInstanceID"):
        return RouteProblem("InstanceNotFound", f"{op}{on}: {code}: {error.message[:300]}")
    if code == "BotocoreMissing":
        return RouteProblem("BotocoreMissing", error.message)
    return RouteProblem("AWSError", f"{op}{on}: {code}: {error.message[:300]}")


def sync(api: EC2Api, target: Target) -> SyncResult:
    """Make the AWS side of ``target`` right, doing only what is missing (see the module docstring)."""
    spec = target.spec
    where = f"region {target.region}"
    try:
        instances = api.describe_instances([p.instance_id for p in target.peers])
    except AWSCallError as e:
        return _failed(target, [problem_of(e, where)])
    enis = primary_enis(instances)
    problems: list[RouteProblem] = []
    for peer in target.peers:
        if peer.instance_id not in enis:
            problems.append(RouteProblem("InstanceNotFound", f"instance {peer.instance_id} of Node {peer.node} has no "
                                                             f"primary network interface in {where}"))
    if target.active.instance_id not in enis:
        return _failed(target, problems)
    eni = enis[target.active.instance_id][0]
    disabled: list[str] = []
    if spec.disable_source_dest_check:
        for peer in target.peers:
            if peer.instance_id in enis and enis[peer.instance_id][1]:
                peer_eni = enis[peer.instance_id][0]
                try:
                    api.disable_source_dest_check(peer_eni)
                    disabled.append(peer_eni)
                except AWSCallError as e:
                    problems.append(problem_of(e, f"{peer_eni} (Node {peer.node})"))
    try:
        tables = api.describe_route_tables(spec.route_table_ids)
    except AWSCallError as e:
        return _failed(target, [*problems, problem_of(e, where)], disabled=disabled, eni=eni)
    actions, plan_problems = plan_routes(tables, spec.route_table_ids, spec.destination_cidrs, eni)
    problems.extend(plan_problems)
    applied: list[RouteAction] = []
    for action in actions:
        call = api.create_route if action.op == "CreateRoute" else api.replace_route
        try:
            call(action.route_table_id, action.cidr, action.eni)
            applied.append(action)
        except AWSCallError as e:
            problems.append(problem_of(e, f"{action.cidr} in {action.route_table_id}"))
    if problems:
        return _failed(target, problems, applied=applied, disabled=disabled, eni=eni)
    found = len(spec.route_table_ids)
    message = (f"{len(spec.destination_cidrs)} CIDR(s) in {found} route table(s) point at {eni} "
               f"(Node {target.active.node}, {target.active.instance_id}, {target.region})")
    if spec.disable_source_dest_check:
        message += f"; source/dest check off on {len(target.peers)} gateway peer ENI(s)"
    if target.skipped:
        message += f"; not EC2 instances, skipped: {', '.join(target.skipped)}"
    return SyncResult(target, True, SYNCED, message, tuple(applied), tuple(disabled), eni)


def _failed(
    target: Target, problems: Sequence[RouteProblem], *, applied: Sequence[RouteAction] = (),
    disabled: Sequence[str] = (), eni: str = "",
) -> SyncResult:
    if not problems:  # the active instance vanished without a word from DescribeInstances
        problems = [RouteProblem("InstanceNotFound", f"instance {target.active.instance_id} of Node "
                                                     f"{target.active.node} not found in region {target.region}")]
    shown = "; ".join(p.message for p in problems[:4])
    if len(problems) > 4:
        shown += f"; and {len(problems) - 4} more"
    return SyncResult(target, False, problems[0].reason, shown, tuple(applied), tuple(disabled), eni)


# ---------------------------------------------------------------------------------- the thread


@dataclass
class _State:
    target: Target
    next_at: float
    failures: int = 0


@dataclass
class RouteFollower:
    """Keeps each gateway's VPC routes on its active peer (see the module docstring)."""

    settings: AWSSettings
    on_change: Callable[[], None] = lambda: None
    ec2: Callable[[str], EC2Api] | None = None
    clock: Callable[[], float] = time.monotonic
    _targets: dict[str, Target] = field(default_factory=dict)
    _results: dict[str, SyncResult] = field(default_factory=dict)
    _state: dict[str, _State] = field(default_factory=dict)
    _clients: dict[str, EC2Api] = field(default_factory=dict)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    calls: int = 0
    """Syncs done (each a handful of EC2 calls): for tests and the curious."""

    def __post_init__(self) -> None:
        self._log = logger.bind(component="gateway-controller", part="aws-routes")
        if self.ec2 is None:
            self.ec2 = botocore_factory(self.settings)

    def start(self) -> RouteFollower:
        self._thread = threading.Thread(target=self._run, name="gateway-aws-routes", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def set_targets(self, targets: Mapping[str, Target]) -> None:
        """The gateways to follow now (all of them: a gateway left out is forgotten)."""
        with self._lock:
            if targets == self._targets:
                return
            self._targets = dict(targets)
            for gone in set(self._results) - set(targets):
                del self._results[gone]
            for gone in set(self._state) - set(targets):
                del self._state[gone]
        self._wake.set()

    def result(self, gateway: str) -> SyncResult | None:
        with self._lock:
            return self._results.get(gateway)

    def run_once(self) -> float | None:
        """Sync every gateway that is due; returns when the next one is due (None: none to follow)."""
        for name, target in self._due():
            if self._stop.is_set():
                break
            self._sync(name, target)
        with self._lock:
            return min((s.next_at for s in self._state.values()), default=None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the round: a wake-up during it starts the next one at once
            next_at = self.run_once()
            self._wake.wait(None if next_at is None else max(0.0, next_at - self.clock()))

    def _due(self) -> list[tuple[str, Target]]:
        now = self.clock()
        with self._lock:
            return [
                (name, t) for name, t in sorted(self._targets.items())
                if (s := self._state.get(name)) is None or s.target != t or now >= s.next_at
            ]

    def _client(self, region: str) -> EC2Api:
        if region not in self._clients:
            assert self.ec2 is not None
            self._clients[region] = self.ec2(region)
        return self._clients[region]

    def _sync(self, name: str, target: Target) -> None:
        try:
            result = sync(self._client(target.region), target)
        except AWSCallError as e:
            result = _failed(target, [problem_of(e, f"region {target.region}")])
        except Exception as e:  # noqa: BLE001 - one gateway's surprise must not stop the others
            self._log.bind(gateway=name).exception("AWS route sync failed")
            result = _failed(target, [RouteProblem("AWSError", f"{type(e).__name__}: {str(e)[:300]}")])
        self.calls += 1
        now = self.clock()
        with self._lock:
            if self._targets.get(name) != target:
                # The target changed (or went) meanwhile: the next round syncs the new one.
                for action in result.applied:
                    self._log.bind(gateway=name).info("VPC route {} ({}, superseded target)", action, action.op)
                return
            before = self._results.get(name)
            state = self._state.get(name)
            failures = 0 if result.ok else (state.failures + 1 if state and state.target == target else 1)
            delay = (self.settings.verify_period if result.ok
                     else min(self.settings.max_backoff, self.settings.error_backoff * 2 ** (failures - 1)))
            self._state[name] = _State(target, now + delay, failures)
            self._seq += 1
            result = replace(result, seq=self._seq)
            self._results[name] = result
        self._report(name, result, before, delay)
        changed = before is None or (before.target, before.ok, before.reason, before.message) != (
            result.target, result.ok, result.reason, result.message)
        if changed or result.applied:
            self.on_change()

    def _report(self, name: str, result: SyncResult, before: SyncResult | None, delay: float) -> None:
        log = self._log.bind(gateway=name)
        for action in result.applied:
            log.info("VPC route {} ({}, Node {})", action, action.op, result.target.active.node)
        for eni in result.source_dest_check_disabled:
            log.info("source/dest check turned off on {}", eni)
        if not result.ok and (before is None or (before.reason, before.message) != (result.reason, result.message)):
            log.warning("{} not synced: {}: {} (retry in {:.0f} s)", PATH, result.reason, result.message, delay)
        elif result.ok and (before is None or not before.ok):
            log.info("{} synced: {}", PATH, result.message)
