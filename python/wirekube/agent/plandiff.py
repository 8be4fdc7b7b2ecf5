"""The diff: the operations that bring the observed dataplane to the desired one (a full
:func:`diff`, or :func:`diff_since` for an event-driven pass).

It touches only what WireKube owns, never rewrites a WireGuard peer whose configuration already
matches, and removes duplicates of its own rules; applying the result and diffing again yields no
operations.  Pure: ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from wirekube.agent.planfull import is_wirekube_rule
from wirekube.agent.plantypes import (
    HANDSHAKE_FRESH_SECONDS,
    AddAddress,
    AddRoute,
    AddRule,
    DelAddress,
    DelRoute,
    DelRule,
    Desired,
    LinkConfig,
    LinkState,
    Observed,
    Op,
    Route,
    Rule,
    SetMtu,
    SetSysctl,
    SetUp,
)
from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgDeviceState
from wirekube.models import Endpoint, IPNetwork


def diff(desired: Desired, observed: Observed, now: float) -> tuple[Op, ...]:
    """Operations that turn ``observed`` into ``desired``: adds first, removals last."""
    link = _link_ops(desired.link, observed.link)
    wg_device = _device_ops(desired, observed.wg)
    puts, removes = _peer_ops(desired, observed.wg, now)
    add_routes, del_routes = _route_ops(desired.routes, observed.routes)
    add_rules, del_rules = _rule_ops(desired.rules, observed.rules)
    del_addrs = [op for op in link if isinstance(op, DelAddress)]
    link = [op for op in link if not isinstance(op, DelAddress)]
    return (*link, *wg_device, *puts, *add_routes, *add_rules, *removes, *del_routes, *del_rules, *del_addrs)


def diff_since(
    previous: Desired,
    desired: Desired,
    link: LinkState,
    wg: WgDeviceState,
    rules: Sequence[Rule],
    now: float,
) -> tuple[Op, ...]:
    """The operations for an event-driven pass: only what changed from ``previous`` to ``desired``.

    ``previous`` is the plan the dataplane was last brought to.  The link, the device settings
    and the rules are compared with what is observed (they are small); the WireGuard peers only
    for the keys whose configuration changed between the two plans (against ``wg``, so a
    roamed endpoint is judged as in :func:`diff`); the routes of table 22347 are not read at all:
    the table is taken to hold ``previous.routes``.  Drift in what did not change (a route or a
    peer removed behind the agent's back) is left to the next full :func:`diff`, which the
    reconciler runs on every resync.  When the dataplane does match ``previous``, the result
    equals ``diff(desired, observed, now)``.
    """
    link_ops = _link_ops(desired.link, link)
    device = _device_ops(desired, wg)
    keys: set[str] = set()
    if desired.peers is not previous.peers:
        before = previous.peers
        keys.update(k for k, cfg in desired.peers.items() if (old := before.get(k)) is not cfg and old != cfg)
        keys.update(k for k in before if k not in desired.peers)
    if desired.forced_endpoints is not previous.forced_endpoints:
        keys.update(desired.forced_endpoints ^ previous.forced_endpoints)
    puts: list[Op] = [
        op for k in sorted(keys) if k in desired.peers and (op := _peer_op(desired, k, wg, now)) is not None
    ]
    removes: list[Op] = [RemovePeer(k) for k in sorted(keys) if k not in desired.peers and k in wg.peers]
    add_routes: list[Op] = []
    del_routes: list[Op] = []
    if desired.routes is not previous.routes:
        add_routes = [AddRoute(r) for r in sorted(desired.routes - previous.routes, key=_route_key)]
        replaced = {_route_slot(r) for r in desired.routes}
        del_routes = [DelRoute(r) for r in sorted(previous.routes - desired.routes, key=_route_key)
                      if _route_slot(r) not in replaced]
    add_rules, del_rules = _rule_ops(desired.rules, rules)
    del_addrs = [op for op in link_ops if isinstance(op, DelAddress)]
    link_ops = [op for op in link_ops if not isinstance(op, DelAddress)]
    return (*link_ops, *device, *puts, *add_routes, *add_rules, *removes, *del_routes, *del_rules, *del_addrs)


def _link_ops(want: LinkConfig, have: LinkState) -> list[Op]:
    ops: list[Op] = []
    if have.mtu != want.mtu:
        ops.append(SetMtu(want.mtu))
    for name, value in sorted(want.sysctls.items()):
        if have.sysctls.get(name) != value:
            ops.append(SetSysctl(name, value))
    wanted = {want.address} if want.address is not None else set()
    ops.extend(AddAddress(a) for a in sorted(wanted - have.addresses, key=str))
    if not have.up:
        ops.append(SetUp())
    ops.extend(DelAddress(a) for a in sorted(have.addresses - wanted, key=str))
    return ops


def _device_ops(desired: Desired, have: WgDeviceState) -> list[Op]:
    op = SetDevice(
        private_key=have.public_key != desired.public_key,
        listen_port=desired.listen_port if have.listen_port != desired.listen_port else None,
        fwmark=desired.fwmark if have.fwmark != desired.fwmark else None,
    )
    return [op] if op != SetDevice() else []


def _peer_ops(desired: Desired, have: WgDeviceState, now: float) -> tuple[list[Op], list[Op]]:
    puts: list[Op] = [op for key in sorted(desired.peers) if (op := _peer_op(desired, key, have, now)) is not None]
    removes: list[Op] = [RemovePeer(k) for k in sorted(have.peers) if k not in desired.peers]
    return puts, removes


def _peer_op(desired: Desired, key: str, have: WgDeviceState, now: float) -> PutPeer | None:
    want = desired.peers[key]
    state = have.peers.get(key)
    if state is None:
        return PutPeer(want, create=True)
    cur = state.config
    set_endpoint = _endpoint_needs_write(
        want.endpoint, cur.endpoint, key in desired.forced_endpoints, now - state.last_handshake
    )
    op = PutPeer(
        want,
        create=False,
        set_endpoint=set_endpoint,
        set_allowed_ips=cur.allowed_ips != want.allowed_ips,
        set_keepalive=cur.persistent_keepalive != want.persistent_keepalive,
    )
    return op if op.set_endpoint or op.set_allowed_ips or op.set_keepalive else None


def _endpoint_needs_write(want: Endpoint | None, have: Endpoint | None, forced: bool, handshake_age: float) -> bool:
    """A roamed endpoint that works (fresh handshake, not loopback) is kept unless forced."""
    if want is None or want == have:
        return False
    if forced or have is None or have.ip.is_loopback:
        return True
    return handshake_age >= HANDSHAKE_FRESH_SECONDS


def _route_ops(want: frozenset[Route], have: Sequence[Route]) -> tuple[list[Op], list[Op]]:
    seen: set[Route] = set()
    dels: list[Route] = []
    for route in have:
        if route not in want or route in seen:
            dels.append(route)
        seen.add(route)
    adds: list[Op] = [AddRoute(r) for r in sorted(want - seen, key=_route_key)]
    # A route whose MTU changes is rewritten in place (AddRoute replaces): deleting the old one
    # afterwards (by destination) would delete the new one.
    replaced = {_route_slot(r) for r in want - seen}
    return adds, [DelRoute(r) for r in sorted(dels, key=_route_key)
                  if _route_slot(r) not in replaced]


def _rule_ops(want: frozenset[Rule], have: Sequence[Rule]) -> tuple[list[Op], list[Op]]:
    seen: set[Rule] = set()
    dels: list[Op] = []
    for rule in have:
        if not is_wirekube_rule(rule):
            continue
        if rule not in want or rule in seen:
            dels.append(DelRule(rule))
        seen.add(rule)
    adds: list[Op] = [AddRule(r) for r in sorted(want - seen, key=_rule_key)]
    return adds, dels


def _route_key(r: Route) -> tuple[int, int, int, str, int]:
    return (r.dst.version, int(r.dst.network_address), r.dst.prefixlen, r.dev, r.mtu)


def _route_slot(r: Route) -> tuple[IPNetwork, int]:
    """What identifies a route in the kernel's table (the MTU is an attribute of it)."""
    return (r.dst, r.table)


def _rule_key(r: Rule) -> tuple[int, int, int, int, str]:
    return (r.family, r.priority, r.table, r.fwmark, str(r.dst))
