"""Desired dataplane state from the mesh, the peers and this node's facts; and the diff to reach it.

Pure module: no I/O, no clock (``now`` is passed in), no pyroute2, no kubernetes.

``plan()`` decides what the node should have:
- the interface (mesh /32, MTU, up, sysctls disable_xfrm=1, disable_policy=1, rp_filter=2);
- the WireGuard device (listen port, fwmark 0x574B, one peer per valid WireKubePeer);
- routes in table 22347, one per accepted AllowedIPs entry, via the interface;
- rules: ``fwmark 0x574B lookup main`` (priority 100), ``to <API server> lookup main``
  (priority 199) and ``lookup 22347`` (priority 200).

``diff()`` compares that with what was observed and returns the operations that close the gap.
It touches only what WireKube owns (its interface, table 22347, rules it recognises as its own),
never rewrites a WireGuard peer whose configuration already matches, and removes duplicates of
its own rules.  Applying the result and diffing again yields no operations.

The agent does not call ``plan()`` on every change: :class:`IncrementalPlanner` gives the same
answer while re-deciding only the peers a change can affect, and ``diff_since()`` turns the
difference between two plans into operations without re-reading the whole route table.  The
reconciler still does a full ``diff()`` (and a from-scratch plan) on every periodic resync.

Peers are validated here as well as in the models, because a bad peer must be *skipped with a
reason* while the rest of the mesh keeps working:
- a public key that is not a key, or this node's own key, or a key already used by an older peer;
- a mesh IP (first /32 entry) claimed by an older peer (``ipam.conflict_winner``);
- an AllowedIPs entry claiming one of this node's addresses, or, inside meshCIDR, containing this
  node's or another peer's mesh IP (wider entries such as egress ranges may cover mesh IPs: the
  /32s are more specific and win in WireGuard and in the route table).
Entries that are merely not routable from here are *dropped* (the peer stays): loopback,
link-local and multicast ranges, a default route unless ``routing.allowDefaultRoute``, the parts
covered by ``routing.excludeCIDRs``, entries overlapping this node's own subnets when
``routing.localSubnetPolicy`` is ``skip``, and exact duplicates of an older peer's entry
(WireGuard AllowedIPs are unique per device).


The module is the planner's front door; the work lives next to it, one concern a module:
:mod:`~wirekube.agent.plantypes` (facts, desired/observed state, operations),
:mod:`~wirekube.agent.planfull` (``plan()`` and the per-peer validation),
:mod:`~wirekube.agent.incremental` (:class:`IncrementalPlanner`) and
:mod:`~wirekube.agent.plandiff` (``diff()``, ``diff_since()``).
"""

from __future__ import annotations

from wirekube.agent.incremental import IncrementalPlanner
from wirekube.agent.plandiff import diff, diff_since
from wirekube.agent.planfull import desired_rules, is_wirekube_rule, mesh_ip_claims, plan
from wirekube.agent.plantypes import (
    HANDSHAKE_FRESH_SECONDS,
    INTERFACE_SYSCTLS,
    MAIN_TABLE,
    RULE_PRIORITY_BYPASS,
    RULE_PRIORITY_FWMARK,
    RULE_PRIORITY_TABLE,
    AddAddress,
    AddRoute,
    AddRule,
    DelAddress,
    DelRoute,
    DelRule,
    Desired,
    Dropped,
    LinkConfig,
    LinkOp,
    LinkState,
    LocalFacts,
    Observed,
    Op,
    PeerPath,
    Route,
    Rule,
    SetMtu,
    SetSysctl,
    SetUp,
    Skipped,
    route_for,
)

__all__ = [
    "HANDSHAKE_FRESH_SECONDS",
    "INTERFACE_SYSCTLS",
    "MAIN_TABLE",
    "RULE_PRIORITY_BYPASS",
    "RULE_PRIORITY_FWMARK",
    "RULE_PRIORITY_TABLE",
    "AddAddress",
    "AddRoute",
    "AddRule",
    "DelAddress",
    "DelRoute",
    "DelRule",
    "Desired",
    "Dropped",
    "IncrementalPlanner",
    "LinkConfig",
    "LinkOp",
    "LinkState",
    "LocalFacts",
    "Observed",
    "Op",
    "PeerPath",
    "Route",
    "Rule",
    "SetMtu",
    "SetSysctl",
    "SetUp",
    "Skipped",
    "desired_rules",
    "diff",
    "diff_since",
    "is_wirekube_rule",
    "mesh_ip_claims",
    "plan",
    "route_for",
]
