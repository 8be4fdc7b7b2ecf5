"""The agent's loop: observe -> plan -> diff -> apply, on changes and on a resync timer.

Nothing is planned before the source has a mesh and a synced peer list: an agent that starts
while the API server is down keeps whatever dataplane is already in place (no blackout), and an
agent that loses the API server keeps its last state until it comes back.

Two kinds of pass, so that reacting to one changed peer does not cost a rebuild of everything:

* full (the first pass, every ``resync_seconds``, after a failed pass, after the WireGuard
  device was (re)created, and ``--once``): plans from scratch, reads the whole dataplane
  (link, device, peers, rules, table 22347) and diffs all of it.  This is what repairs drift
  nobody told us about (a route or a peer removed behind the agent's back).
* event-driven (any other wake-up: a peer, the mesh, a gateway or a path changed): the
  :class:`~wirekube.agent.plan.IncrementalPlanner` re-decides only what the change touches, and
  :func:`~wirekube.agent.plan.diff_since` writes only the difference from the plan last
  applied, reading the link, the device's peers and the rules but not the route table.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loguru import logger

from wirekube.agent import plan as planner
from wirekube.agent.keys import KeyPair
from wirekube.agent.netlink import Netlink
from wirekube.agent.plan import Desired, LocalFacts, Observed, Op, PeerPath, Skipped
from wirekube.agent.status import own_status
from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgDeviceState, WireGuardEngine
from wirekube.agent.wg.select import select_engine
from wirekube.agent.wg.userspace import SOCKET_DIR, UserspaceSettings
from wirekube.authority import Authorizer, Guarded, Refusal
from wirekube.errors import DataplaneError, WireKubeError
from wirekube.gateway import conditions as cond
from wirekube.models import ROUTE_TABLE, Engine, IPAddress, IPNetwork, Mesh, Peer, PeerStatus, key_fingerprint


@dataclass(frozen=True)
class Snapshot:
    mesh: Mesh
    peers: tuple[Peer, ...]
    rejected: tuple[Skipped, ...] = ()
    """Objects that could not even be read as peers (models.InvalidObject)."""
    granted: Mapping[str, tuple[IPNetwork, ...]] | None = None
    """What each node may route beyond its mesh IP (WireKubeRouteGrants and the routes of the
    gateways it is active for; see ``wirekube.authority``).  None: the source is the
    administrator's own word (a peers file), so every entry it lists is granted."""


class Source(Protocol):
    """Where the mesh and the peers come from, and where the agent reports back."""

    def snapshot(self) -> Snapshot | None:
        """The current view, or None while it is not known yet (keep the dataplane as it is)."""

    def register(self, public_key: str) -> None:
        """Make sure this node's own peer object says what it should (no-op for static sources)."""

    def publish(self, status: PeerStatus, skipped: Sequence[Skipped]) -> None:
        """Write this node's peer status and report skipped peers (only on change)."""

    def own_status(self) -> PeerStatus:
        """The status currently published (to carry over fields this loop does not own)."""

    def report_refusals(self, refusals: Sequence[Refusal]) -> None:
        """Tell the cluster which route claims this node does not route (only on change)."""


@dataclass(frozen=True)
class ReconcilerSettings:
    node_name: str
    engine: Engine = Engine.AUTO
    """Overrides the mesh's spec.engine unless auto."""
    api_server_ips: tuple[IPAddress, ...] = ()
    resync_seconds: float = 30.0
    error_backoff_max: float = 30.0
    wireguard_go: str = "wireguard-go"
    socket_dir: Path = SOCKET_DIR
    wireguard_go_log: Path | None = None


@dataclass(frozen=True)
class Result:
    ops: tuple[Op, ...]
    desired: Desired
    observed: Observed
    """On an event-driven pass ``routes`` holds what the last applied plan put in table 22347
    (the table itself is only read on full passes)."""
    full: bool = True


@dataclass
class _Memory:
    skipped: frozenset[Skipped] = frozenset()
    refused: frozenset[Refusal] = frozenset()
    engine_key: tuple[str, Engine] | None = None
    applied: Desired | None = None
    """The plan the dataplane was last brought to by a pass that applied without error; None
    forces the next pass to be a full one."""
    next_full: float = 0.0
    """Monotonic time from which the next pass is a full resync."""


class Reconciler:
    def __init__(
        self,
        settings: ReconcilerSettings,
        keys: KeyPair,
        source: Source,
        netlink: Netlink,
        clock: Callable[[], float] = time.time,
        paths: Callable[[], Mapping[str, PeerPath]] = dict,
        on_snapshot: Callable[[Snapshot, LocalFacts], None] | None = None,
        decorate_status: Callable[[PeerStatus], PeerStatus] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        guarded: Callable[[Mesh], Sequence[Guarded]] = lambda mesh: (),
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.source = source
        self.netlink = netlink
        self.clock = clock
        self.paths = paths
        """Per-peer path overrides (NAT traversal / relay plug in here)."""
        self.on_snapshot = on_snapshot
        """Told every pass what the mesh looks like (NAT traversal follows peers with it)."""
        self.decorate_status = decorate_status
        """Adds what others know (NAT type, relay reasons) to the status this loop publishes."""
        self.wake = threading.Event()
        self.engine: WireGuardEngine | None = None
        self.monotonic = monotonic
        self.guarded = guarded
        """Addresses only the agent knows to guard: the relay and STUN hosts the mesh names by DNS
        name, resolved (``authority.named_hosts``)."""
        self.authorizer = Authorizer()
        self.refusals: tuple[Refusal, ...] = ()
        """The route claims the last pass did not route (wirekube.authority)."""
        self.planner = planner.IncrementalPlanner()
        self._mem = _Memory()
        self._restarted = False
        """Set by the engine's watcher thread: the device was recreated, the next pass is full."""
        self._lock = threading.Lock()
        self._log = logger.bind(component="reconcile", node=settings.node_name)

    # ------------------------------------------------------------------ one pass

    def reconcile_once(self, dry_run: bool = False, full: bool | None = None) -> Result | None:
        """One pass.  ``full`` forces (True) or forbids (False) a full pass; None decides: full
        when the resync is due or the dataplane's state is not known (see the module docstring).
        A dry run is always full and changes nothing, not even what the next pass builds on."""
        with self._lock:
            snap = self.source.snapshot()
            if snap is None:
                self._log.debug("no mesh/peer view yet; dataplane left as it is")
                return None
            if not dry_run:
                self.source.register(self.keys.public_key)
            engine = self._engine_for(snap.mesh)
            if self._restarted:
                self._restarted = False
                self._mem.applied = None
            created = engine.ensure_device() if not dry_run else False
            ifname = snap.mesh.spec.interface_name
            facts = self._facts(ifname)
            if self.on_snapshot is not None:
                self.on_snapshot(snap, facts)
            paths = self.paths()
            previous = self._mem.applied
            if dry_run or created or previous is None:
                full = True
            elif full is None:
                full = self.monotonic() >= self._mem.next_full
            link = None
            if not full:
                link = self.netlink.link_state(ifname, tuple(planner.INTERFACE_SYSCTLS))
                full = not link.exists  # the interface went away: everything must be rewritten
            authorized, refusals = self._authorize(snap, facts)
            desired = self._plan(authorized, facts, paths, full)
            self._mem.applied = None  # until this pass has applied without error
            if full or link is None or previous is None:
                observed = self.observe(ifname, engine)
                ops = planner.diff(desired, observed, self.clock())
            else:
                wg = engine.get()
                observed = Observed(link=link, wg=wg, rules=self.netlink.rules(), routes=tuple(previous.routes))
                ops = planner.diff_since(previous, desired, link, wg, observed.rules, self.clock())
            if dry_run:
                self._mem.applied = previous
                return Result(ops, desired, observed, full)
            self.apply(ops, ifname, engine)
            self._mem.applied = desired
            if full:
                self._mem.next_full = self.monotonic() + self.settings.resync_seconds
            self._report(snap, desired, paths, observed.wg, refusals)
            return Result(ops, desired, observed, full)

    def _authorize(self, snap: Snapshot, facts: LocalFacts) -> tuple[Snapshot, tuple[Refusal, ...]]:
        """The snapshot with only the AllowedIPs entries each peer is granted (wirekube.authority)."""
        granted = snap.granted if snap.granted is not None else {p.name: p.spec.allowed_ips for p in snap.peers}
        guarded = self.authorizer.guarded(snap.mesh, snap.peers, facts.api_server_ips, facts.addresses,
                                          tuple(self.guarded(snap.mesh)))
        peers, refusals = self.authorizer.authorize(snap.mesh, snap.peers, granted, guarded)
        self.refusals = refusals
        return dataclasses.replace(snap, peers=peers), refusals

    def _plan(self, snap: Snapshot, facts: LocalFacts, paths: Mapping[str, PeerPath], full: bool) -> Desired:
        """The incremental plan; a full pass also plans from scratch and keeps that one if they
        differ (they never should: the difference is logged as the bug it is)."""
        warm = self.planner.warm
        desired = self.planner.plan(snap.mesh, snap.peers, facts, paths)
        if full and warm:
            fresh = planner.IncrementalPlanner()
            check = fresh.plan(snap.mesh, snap.peers, facts, paths)
            if check != desired:
                self._log.error("incremental plan differed from a full plan; using the full plan")
                self.planner, desired = fresh, check
        return desired

    def _facts(self, ifname: str) -> LocalFacts:
        addresses, subnets = self.netlink.node_addresses(ifname)
        return LocalFacts(
            name=self.settings.node_name,
            public_key=self.keys.public_key,
            addresses=addresses,
            subnets=subnets,
            api_server_ips=self.settings.api_server_ips,
        )

    def observe(self, ifname: str, engine: WireGuardEngine) -> Observed:
        link = self.netlink.link_state(ifname, tuple(planner.INTERFACE_SYSCTLS))
        wg = engine.get() if link.exists else WgDeviceState()
        return Observed(
            link=link,
            wg=wg,
            rules=self.netlink.rules(),
            routes=self.netlink.routes(ROUTE_TABLE),
        )

    def apply(self, ops: Sequence[Op], ifname: str, engine: WireGuardEngine) -> None:
        wg_batch: list[SetDevice | PutPeer | RemovePeer] = []
        for op in ops:
            if isinstance(op, (SetDevice, PutPeer, RemovePeer)):
                wg_batch.append(op)
                continue
            if wg_batch:
                engine.apply(wg_batch, self.keys.private_key)
                wg_batch = []
            apply_link_op(self.netlink, ifname, op)
        if wg_batch:
            engine.apply(wg_batch, self.keys.private_key)
        for op in ops:
            self._log.info("applied {}", describe(op))

    def _engine_for(self, mesh: Mesh) -> WireGuardEngine:
        choice = self.settings.engine if self.settings.engine is not Engine.AUTO else mesh.spec.engine
        key = (mesh.spec.interface_name, choice)
        if self.engine is not None:
            if key != self._mem.engine_key:
                self._log.warning("mesh changed interface/engine to {}; restart the agent to switch", key)
            return self.engine
        userspace = UserspaceSettings(
            ifname=mesh.spec.interface_name,
            binary=self.settings.wireguard_go,
            socket_dir=self.settings.socket_dir,
            log_path=self.settings.wireguard_go_log,
        )
        self.engine = select_engine(choice, self.netlink, userspace)
        self.engine.set_on_restart(self._on_engine_restart)
        self._mem.engine_key = key
        return self.engine

    def _on_engine_restart(self) -> None:
        self._log.warning("WireGuard device was recreated; reapplying the configuration")
        self._restarted = True  # everything is new: the next pass is a full one
        self.wake.set()

    def _report(self, snap: Snapshot, desired: Desired, paths: Mapping[str, PeerPath], wg: WgDeviceState,
                refusals: Sequence[Refusal] = ()) -> None:
        """Log skip changes and publish the status.

        ``wg`` is the device as this pass read it, before applying: the status only uses the
        handshakes of the peers in ``desired``, which applying does not change (a new peer has
        none either way), so the device is not dumped a second time.
        """
        skipped = frozenset((*snap.rejected, *desired.skipped))
        for s in sorted(skipped - self._mem.skipped, key=lambda s: s.peer):
            self._log.warning("peer {} skipped: {}", s.peer, s.reason)
        for s in sorted(self._mem.skipped - skipped, key=lambda s: s.peer):
            self._log.info("peer {} no longer skipped", s.peer)
        self._mem.skipped = skipped
        refused = frozenset(refusals)
        for r in sorted(refused - self._mem.refused, key=lambda r: (r.peer, str(r.entry))):
            self._log.warning("not routing {} of peer {}: {}", r.entry, r.peer, r.reason)
        for r in sorted(self._mem.refused - refused, key=lambda r: (r.peer, str(r.entry))):
            self._log.info("{} of peer {} is no longer refused", r.entry, r.peer)
        self._mem.refused = refused
        now = self.clock()
        status = own_status(desired, wg, paths, now, self.source.own_status())
        status = dataclasses.replace(status, conditions=routes_condition(
            status.conditions, [r for r in refusals if r.peer == self.settings.node_name], now))
        if self.decorate_status is not None:
            status = self.decorate_status(status)
        self.source.publish(status, sorted(skipped, key=lambda s: s.peer))
        self.source.report_refusals(refusals)

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        """Reconcile on wake-ups and every resync interval until ``stop`` is set."""
        backoff = 1.0
        while not stop.is_set():
            self.wake.clear()
            timeout = self.settings.resync_seconds
            try:
                result = self.reconcile_once()
                if result is not None and result.ops:
                    self._log.info("reconcile applied {} operations ({} pass)", len(result.ops),
                                   "full" if result.full else "event")
                backoff = 1.0
            except WireKubeError as e:
                self._log.error("reconcile failed: {}; retrying in {:.0f}s", e, backoff)
                timeout = backoff
                backoff = min(backoff * 2, self.settings.error_backoff_max)
            except Exception:  # noqa: BLE001 - the loop must survive a bug in one pass
                self._log.exception("reconcile crashed; retrying in {:.0f}s", backoff)
                timeout = backoff
                backoff = min(backoff * 2, self.settings.error_backoff_max)
            self._wait(stop, timeout)

    def _wait(self, stop: threading.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and not self.wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wake.wait(min(left, 0.5))

    def close(self) -> None:
        """Stop supervising; the dataplane (interface, daemon, routes, rules) stays in place."""
        if self.engine is not None:
            self.engine.close()


def apply_link_op(nl: Netlink, ifname: str, op: Op) -> None:
    match op:
        case planner.SetMtu(mtu):
            nl.set_mtu(ifname, mtu)
        case planner.SetUp():
            nl.set_up(ifname)
        case planner.AddAddress(address):
            nl.add_address(ifname, address)
        case planner.DelAddress(address):
            nl.del_address(ifname, address)
        case planner.SetSysctl(name, value):
            nl.set_sysctl(ifname, name, value)
        case planner.AddRoute(route):
            nl.add_route(route)
        case planner.DelRoute(route):
            nl.del_route(route)
        case planner.AddRule(rule):
            nl.add_rule(rule)
        case planner.DelRule(rule):
            nl.del_rule(rule)
        case _:
            raise DataplaneError(f"unknown operation {op!r}")


def describe(op: Op) -> str:
    """A log line for ``op`` without key material (keys as fingerprints)."""
    if isinstance(op, PutPeer):
        c = op.config
        parts = [f"{'add' if op.create else 'update'} peer {key_fingerprint(c.public_key)}"]
        if op.set_endpoint and c.endpoint:
            parts.append(f"endpoint {c.endpoint}")
        if op.set_allowed_ips:
            parts.append("allowed-ips " + ",".join(str(n) for n in c.allowed_ips))
        if op.set_keepalive:
            parts.append(f"keepalive {c.persistent_keepalive}")
        return " ".join(parts)
    if isinstance(op, RemovePeer):
        return f"remove peer {key_fingerprint(op.public_key)}"
    if isinstance(op, SetDevice):
        return (
            f"set device private-key={'new' if op.private_key else 'kept'}"
            f" listen-port={op.listen_port} fwmark={op.fwmark}"
        )
    name = type(op).__name__
    fields = " ".join(str(v) for v in vars(op).values())
    return f"{name} {fields}".strip()


CONDITION_ROUTES = "RoutesGranted"


def routes_condition(
    conditions: Sequence[Mapping[str, object]], own: Sequence[Refusal], now: float
) -> tuple[Mapping[str, object], ...]:
    """``RoutesGranted`` on the node's own peer: False naming each of its entries this node's view
    of the grants refuses; True once they are all granted (absent while never refused)."""
    if own:
        message = "; ".join(f"{r.reason} (fix: {r.fix})" for r in own)
        return tuple(cond.set_condition(conditions, CONDITION_ROUTES, False, "NotGranted", message, now, 0))
    if cond.find(conditions, CONDITION_ROUTES) is not None:
        return tuple(cond.set_condition(conditions, CONDITION_ROUTES, True, "Granted",
                                        "every spec.allowedIPs entry is granted", now, 0))
    return tuple(conditions)
