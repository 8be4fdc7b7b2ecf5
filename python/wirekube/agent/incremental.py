"""The incremental planner: :func:`wirekube.agent.planfull.plan`'s answer, re-deciding only the
peers an input change can affect (the agent plans with this; tests compare it with the full plan).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from wirekube.agent.planfull import (
    _EXCLUDED,
    _NO_PATH,
    _TAKEN,
    _key_error,
    _link_config,
    _mesh_ip,
    _MeshIps,
    _order,
    _peer_config,
    _same_ip,
    _same_key,
    _static_drop,
    _subtract,
    desired_rules,
    plan,
)
from wirekube.agent.plantypes import Desired, Dropped, LocalFacts, PeerPath, Route, Skipped, route_for
from wirekube.agent.wg.base import WgPeerConfig
from wirekube.models import FWMARK, IPNetwork, Mesh, Peer


@dataclass(frozen=True, slots=True)
class _Entry:
    """One AllowedIPs entry, as far as it can be judged without the other peers."""

    net: IPNetwork
    static: str
    """Drop reason that does not depend on other peers ("" when kept so far)."""
    check_taken: bool
    """Whether the whole entry is dropped when an older peer already routes it."""
    pieces: tuple[IPNetwork, ...]
    """What is left after routing.excludeCIDRs (empty when statically dropped)."""
    excluded: bool


@dataclass(frozen=True, slots=True)
class _Local:
    """Everything about one peer that depends only on the peer, the mesh and this node."""

    peer: Peer
    order: tuple[str, str]
    key_error: str
    """Bad key or this node's own key (the identity check every peer fails alone)."""
    ip: ipaddress.IPv4Address | None
    """The mesh IP (first /32 entry, inside meshCIDR)."""
    wide: tuple[tuple[int, IPNetwork], ...]
    """Entries inside meshCIDR that must not contain another peer's mesh IP (before ``claim``)."""
    claim: str
    """The claim problem found without the other peers ("" for none)."""
    entries: tuple[_Entry, ...]
    candidates: frozenset[IPNetwork]
    """Every net whose ownership by an older peer could change what this peer routes."""


def _local(peer: Peer, mesh: Mesh, node: LocalFacts, own_ip: ipaddress.IPv4Address | None) -> _Local:
    spec = mesh.spec
    key = peer.spec.public_key
    key_error = _key_error(key) or (_same_key(node.name) if key == node.public_key else "")
    peer_ip = peer.mesh_ip
    wide: list[tuple[int, IPNetwork]] = []
    claim = ""
    for i, entry in enumerate(peer.spec.allowed_ips):  # the local half of _claim_reason, same order
        where = f"spec.allowedIPs[{i}] {entry}"
        if entry.prefixlen == entry.max_prefixlen and entry.network_address in node.addresses:
            claim = f"{where} claims this node's own address"
            break
        if entry.version != 4 or not entry.subnet_of(spec.mesh_cidr):
            continue
        if own_ip is not None and own_ip in entry:
            claim = f"{where} contains this node's mesh IP {own_ip}"
            break
        if entry.prefixlen == 32 and entry.network_address == peer_ip:
            continue  # holds only the peer's own mesh IP, which is never a conflict
        wide.append((i, entry))
    entries: list[_Entry] = []
    if not claim:  # a local claim problem always ends up skipping the peer: its entries never count
        for entry in peer.spec.allowed_ips:
            static, check_taken = _static_drop(entry, node, spec.routing)
            pieces = () if static else tuple(_subtract(entry, spec.routing.exclude_cidrs))
            entries.append(_Entry(entry, static, check_taken, pieces, not static and pieces != (entry,)))
    candidates = {e.net for e in entries if not e.static and e.check_taken}
    candidates.update(p for e in entries for p in e.pieces)
    return _Local(
        peer=peer,
        order=_order(peer),
        key_error=key_error,
        ip=_mesh_ip(peer, mesh),
        wide=tuple(wide),
        claim=claim,
        entries=tuple(entries),
        candidates=frozenset(candidates),
    )


def _accept(name: str, local: _Local, taken: set[IPNetwork]) -> tuple[tuple[IPNetwork, ...], tuple[Dropped, ...]]:
    """The same decisions as _accepted_entries, from the precomputed entries."""
    accepted: list[IPNetwork] = []
    dropped: list[Dropped] = []
    for e in local.entries:
        if e.static:
            dropped.append(Dropped(name, e.net, e.static))
            continue
        if e.check_taken and e.net in taken:
            dropped.append(Dropped(name, e.net, _TAKEN))
            continue
        if e.excluded:
            dropped.append(Dropped(name, e.net, _EXCLUDED))
        accepted.extend(p for p in e.pieces if p not in taken)
    return tuple(accepted), tuple(dropped)


@dataclass(slots=True)
class _Change:
    """One update's input change: the peers that changed or left, and the keys and mesh IPs they
    held before or hold now (where an identity conflict can have started or ended)."""

    changed: list[str]
    removed: list[str]
    keys: set[str] = field(default_factory=set)
    ips: set[ipaddress.IPv4Address] = field(default_factory=set)
    touched: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.touched = {*self.changed, *self.removed}

    def seed(self, local: _Local) -> None:
        if not local.key_error:
            self.keys.add(local.peer.spec.public_key)
        if local.ip is not None:
            self.ips.add(local.ip)


class _IdentityIndex:
    """Which peers hold each WireGuard key and each mesh IP (peers with an unusable key are left
    out): the links along which an identity change spreads."""

    def __init__(self, local: Mapping[str, _Local]) -> None:
        self._local = local
        self._by_key: dict[str, set[str]] = {}
        self._by_ip: dict[ipaddress.IPv4Address, set[str]] = {}

    def add(self, name: str, local: _Local) -> None:
        if local.key_error:
            return
        self._by_key.setdefault(local.peer.spec.public_key, set()).add(name)
        if local.ip is not None:
            self._by_ip.setdefault(local.ip, set()).add(name)

    def remove(self, name: str, local: _Local) -> None:
        if local.key_error:
            return
        key = local.peer.spec.public_key
        self._by_key[key].discard(name)
        if not self._by_key[key]:
            del self._by_key[key]
        if local.ip is not None:
            self._by_ip[local.ip].discard(name)
            if not self._by_ip[local.ip]:
                del self._by_ip[local.ip]

    def group(self, keys: set[str], ips: set[ipaddress.IPv4Address]) -> set[str]:
        """Every peer linked to ``keys``/``ips`` through shared keys and mesh IPs."""
        group: set[str] = set()
        keys, ips = set(keys), set(ips)
        todo_k, todo_i = list(keys), list(ips)
        while todo_k or todo_i:
            names = self._by_key.get(todo_k.pop(), ()) if todo_k else self._by_ip.get(todo_i.pop(), ())
            for name in names:
                if name in group:
                    continue
                group.add(name)
                local = self._local[name]
                if (k := local.peer.spec.public_key) not in keys:
                    keys.add(k)
                    todo_k.append(k)
                if local.ip is not None and local.ip not in ips:
                    ips.add(local.ip)
                    todo_i.append(local.ip)
        return group


class _NetIndex:
    """Which active peers could route each net (their candidates, see ``_Local.candidates``): the
    links along which a routing change spreads."""

    def __init__(self) -> None:
        self._by_net: dict[IPNetwork, set[str]] = {}
        self._cand: dict[str, frozenset[IPNetwork]] = {}

    def add(self, name: str, nets: frozenset[IPNetwork]) -> None:
        self._cand[name] = nets
        for net in nets:
            self._by_net.setdefault(net, set()).add(name)

    def remove(self, name: str) -> frozenset[IPNetwork]:
        """Forget ``name``'s candidates; returns them."""
        nets = self._cand.pop(name)
        for net in nets:
            self._by_net[net].discard(name)
            if not self._by_net[net]:
                del self._by_net[net]
        return nets

    def spread(self, nets: set[IPNetwork], group: set[str]) -> None:
        """Grow ``group`` by every peer linked to ``nets`` through shared nets (both grow in place)."""
        todo = list(nets)
        while todo:
            for n in self._by_net.get(todo.pop(), ()):
                if n not in group:
                    group.add(n)
                    for net in self._cand[n]:
                        if net not in nets:
                            nets.add(net)
                            todo.append(net)


class _Output:
    """The answer, kept up to date peer by peer: each active peer's WireGuard entry, path and
    routes, the aggregates a :class:`Desired` is made of, and cached immutable copies of those
    (``out``, dropped by ``stale()`` when what they show changes)."""

    def __init__(self, ifname: str, link_mtu: int) -> None:
        self._ifname = ifname
        self._link_mtu = link_mtu
        self.path: dict[str, PeerPath] = {}
        self._config: dict[str, WgPeerConfig] = {}
        self._routes_of: dict[str, frozenset[Route]] = {}
        self._configs: dict[str, WgPeerConfig] = {}
        self._names: dict[str, str] = {}
        self._forced: set[str] = set()
        self._route_count: dict[Route, int] = {}
        self._v6_routes = 0
        self.out: dict[str, object] = {}
        """Cached immutable parts of the last Desired (dropped when what they show changes)."""

    def stale(self, part: str) -> None:
        self.out.pop(part, None)

    def emit(self, name: str, peer: Peer, accepted: tuple[IPNetwork, ...], path: PeerPath | None = None) -> None:
        """(Re)build the WireGuard peer and the routes of active peer ``name``."""
        if path is None:
            path = self.path.get(name, _NO_PATH)
        if path == _NO_PATH:
            self.path.pop(name, None)
        else:
            self.path[name] = path
        cfg = _peer_config(peer, accepted, path)
        old = self._config.get(name)
        if old is not None and old.public_key != cfg.public_key:
            self._drop_entry(name)
            old = None
        if old is None or old != cfg:  # an equal configuration keeps its object (cheap comparisons)
            self._config[name] = cfg
            self._configs[cfg.public_key] = cfg
            self._names[cfg.public_key] = name
            self.stale("peers")
        if (path.endpoint is not None) != (cfg.public_key in self._forced):
            if path.endpoint is not None:
                self._forced.add(cfg.public_key)
            else:
                self._forced.discard(cfg.public_key)
            self.stale("forced")
        self._set_routes(name, accepted, path)

    def _set_routes(self, name: str, accepted: tuple[IPNetwork, ...], path: PeerPath = _NO_PATH) -> None:
        old = self._routes_of.get(name, frozenset())
        new = frozenset(route_for(net, self._ifname, path, self._link_mtu) for net in accepted)
        if new == old:
            return
        for r in old - new:
            self._route_count[r] -= 1
            if not self._route_count[r]:
                del self._route_count[r]
                self._v6_routes -= r.dst.version == 6
        for r in new - old:
            if r not in self._route_count:
                self._route_count[r] = 0
                self._v6_routes += r.dst.version == 6
            self._route_count[r] += 1
        if new:
            self._routes_of[name] = new
        else:
            self._routes_of.pop(name, None)
        self.stale("routes")

    def _drop_entry(self, name: str) -> None:
        cfg = self._config.pop(name, None)
        # The key may already belong to another peer (emitted earlier in the same update).
        if cfg is not None and self._names.get(cfg.public_key) == name:
            del self._configs[cfg.public_key]
            del self._names[cfg.public_key]
            self._forced.discard(cfg.public_key)
            self.stale("peers")
            self.stale("forced")

    def withdraw(self, name: str) -> None:
        """Forget the WireGuard entry, path and routes of ``name`` (it is no longer active)."""
        self._drop_entry(name)
        self.path.pop(name, None)
        self._set_routes(name, ())

    def desired(self, mesh: Mesh, node: LocalFacts, own_ip: ipaddress.IPv4Address | None) -> Desired:
        """The answer; ``out`` must hold "skipped" and "dropped" (the planner's part)."""
        out = self.out
        if "peers" not in out:
            out["peers"] = (dict(self._configs), dict(self._names))
        if "forced" not in out:
            out["forced"] = frozenset(self._forced)
        if "routes" not in out:
            out["routes"] = frozenset(self._route_count)
        families = {4, 6} if self._v6_routes else {4}
        rules_key = (node.api_server_ips, self._v6_routes > 0)
        if out.get("rules_key") != rules_key:
            out["rules_key"] = rules_key
            out["rules"] = frozenset(desired_rules(node.api_server_ips, families))
        peers, names = cast(tuple[dict[str, WgPeerConfig], dict[str, str]], out["peers"])
        return Desired(
            link=_link_config(mesh, own_ip),
            listen_port=mesh.spec.listen_port,
            fwmark=FWMARK,
            public_key=node.public_key,
            peers=peers,
            peer_names=names,
            forced_endpoints=out["forced"],  # type: ignore[arg-type]
            routes=out["routes"],  # type: ignore[arg-type]
            rules=out["rules"],  # type: ignore[arg-type]
            skipped=out["skipped"],  # type: ignore[arg-type]
            dropped=out["dropped"],  # type: ignore[arg-type]
        )


class IncrementalPlanner:
    """``plan()`` that remembers its last answer and re-decides only what an input change touches.

    The result is always exactly ``plan(mesh, peers, node, paths)``; what differs is the cost: a
    call where one peer changed costs a pass of identity checks over the peer list plus the work
    for the peers that change could affect, instead of re-validating every peer.

    Peers interact in three ways only, and each is followed through an index:

    * identity: a key or mesh IP held by an older valid peer.  Peers sharing a key or a mesh IP
      (transitively) form a group that is re-decided together, oldest first; removing the peer
      that held an address un-skips the next one that wanted it.
    * claims: an entry inside meshCIDR containing another valid peer's mesh IP.  When the owner
      of a mesh IP changes, the (usually few) peers with such entries are re-checked.
    * routing: an entry or piece an older peer already routes.  Active peers sharing a net
      (transitively) are re-decided together, oldest first.

    Per-peer facts (key validity, entry filters, excludeCIDRs pieces) are memoised by the peer's
    spec and creation time; a change of the mesh's CIDR/routing/interface, of the node's facts
    or of this node's own mesh IP rebuilds everything.  Unchanged peers keep their
    ``WgPeerConfig`` and ``Route`` objects, so comparing two results is cheap.

    This class owns the decisions (who is valid, skipped, active; what each active peer routes);
    the indexes (:class:`_IdentityIndex`, :class:`_NetIndex`) say whom a change reaches, and
    :class:`_Output` turns the decisions into the WireGuard peers, routes and rules.
    """

    def __init__(self) -> None:
        self._reset(None, None)

    @property
    def warm(self) -> bool:
        """Whether there is a previous answer to build on."""
        return self._ctx is not None

    def _reset(self, ctx: object, own_ip: ipaddress.IPv4Address | None, ifname: str = "", link_mtu: int = 0) -> None:
        self._ctx = ctx
        self._own_ip = own_ip
        self._peers: dict[str, Peer] = {}
        self._local: dict[str, _Local] = {}
        # identity
        self._identity = _IdentityIndex(self._local)
        self._valid: set[str] = set()
        self._skip_id: dict[str, str] = {}
        self._mesh_ips = _MeshIps()
        # claims
        self._wide: set[str] = set()
        self._skip_claim: dict[str, str] = {}
        self._active: set[str] = set()
        # routing
        self._nets = _NetIndex()
        self._result: dict[str, tuple[tuple[IPNetwork, ...], tuple[Dropped, ...]]] = {}
        # output
        self._output = _Output(ifname, link_mtu)

    # ------------------------------------------------------------------ the entry point

    def plan(
        self,
        mesh: Mesh,
        peers: Sequence[Peer],
        node: LocalFacts,
        paths: Mapping[str, PeerPath] | None = None,
    ) -> Desired:
        paths = paths or {}
        spec = mesh.spec
        current: dict[str, Peer] = {}
        for p in peers:
            if p.name in current:  # names are unique in the API; a hand-written file may repeat one
                self._reset(None, None)
                return plan(mesh, peers, node, paths)
            current[p.name] = p
        own = current.pop(node.name, None)
        own_ip = _mesh_ip(own, mesh)
        ctx = (spec.mesh_cidr, spec.routing, spec.interface_name, spec.mtu, node)
        if self._ctx is None or ctx != self._ctx or own_ip != self._own_ip:
            self._reset(ctx, own_ip, spec.interface_name, spec.mtu)
            change = _Change(list(current), [])
        else:
            change = self._changes(current)
        if change.changed or change.removed:
            self._update(change, current, mesh, node)
        self._follow_paths(paths)
        return self._desired(mesh, node, own_ip)

    def _changes(self, current: Mapping[str, Peer]) -> _Change:
        """The peers whose planning inputs differ from the last call's, and the ones that left."""
        changed = []
        known = self._peers
        for name, p in current.items():
            prev = known.get(name)
            if prev is p:
                continue
            if prev is not None and prev.spec == p.spec and prev.creation_timestamp == p.creation_timestamp:
                known[name] = p  # a new object (status, labels) with the same planning inputs
                continue
            changed.append(name)
        removed = [n for n in known if n not in current] if changed or len(current) != len(known) else []
        return _Change(changed, removed)

    # ------------------------------------------------------------------ one update

    def _update(self, change: _Change, current: Mapping[str, Peer], mesh: Mesh, node: LocalFacts) -> None:
        """Re-decide what ``change`` can affect, in the full plan's order: identity, claims, routing."""
        self._refresh(change, current, mesh, node)
        validity_changed, moved_ips = self._redecide_identity(change, node.name)
        recheck, was_active = self._recheck_claims(change, validity_changed, moved_ips)
        self._reroute(change, recheck, was_active)

    def _refresh(self, change: _Change, current: Mapping[str, Peer], mesh: Mesh, node: LocalFacts) -> None:
        """Forget the peers that left and re-derive the per-peer facts of the ones that changed,
        keeping the identity index and the peers with wide entries in step; seeds ``change``."""
        for name in change.removed:
            old = self._local.pop(name)
            del self._peers[name]
            self._identity.remove(name, old)
            change.seed(old)
            self._wide.discard(name)
        for name in change.changed:
            if (previous := self._local.get(name)) is not None:
                self._identity.remove(name, previous)
                change.seed(previous)
            new = _local(current[name], mesh, node, self._own_ip)
            self._local[name] = new
            self._peers[name] = current[name]
            self._identity.add(name, new)
            change.seed(new)
            if new.wide:
                self._wide.add(name)
            else:
                self._wide.discard(name)

    def _redecide_identity(
        self, change: _Change, node_name: str
    ) -> tuple[set[str], set[ipaddress.IPv4Address]]:
        """1. identity: re-decide every group a changed peer is or was part of, oldest first.

        Returns the peers whose validity flipped and the mesh IPs that may have changed hands.
        """
        group = self._identity.group(change.keys, change.ips)
        redo = group | change.touched
        was_valid = {n for n in redo if n in self._valid}
        ips = set(change.ips)
        ips.update(ip for n in group if (ip := self._local[n].ip) is not None)
        old_owner = {ip: self._mesh_ips.owner(ip) for ip in ips}
        for ip in ips:
            self._mesh_ips.remove(ip)
        for n in redo:
            self._valid.discard(n)
            self._skip_id.pop(n, None)
        for n in change.changed:
            if self._local[n].key_error:
                self._skip_id[n] = self._local[n].key_error
        self._admit_oldest_first(group, node_name)
        validity_changed = {n for n in redo if (n in self._valid) != (n in was_valid)}
        moved_ips = {ip for ip in ips if self._mesh_ips.owner(ip) != old_owner[ip]} | change.ips
        self._output.stale("skipped")
        return validity_changed, moved_ips

    def _admit_oldest_first(self, group: set[str], node_name: str) -> None:
        """Validate ``group`` in age order: a key or mesh IP already held by an older member (the
        mesh IP also by this node) skips the peer; the others become valid and own their mesh IP."""
        keys_seen: dict[str, str] = {}
        ips_seen: dict[ipaddress.IPv4Address, str] = {}
        for n in sorted(group, key=lambda n: self._local[n].order):
            local = self._local[n]
            key, ip = local.peer.spec.public_key, local.ip
            if key in keys_seen:
                self._skip_id[n] = _same_key(keys_seen[key])
            elif ip is not None and ip == self._own_ip:
                self._skip_id[n] = _same_ip(ip, node_name)
            elif ip is not None and ip in ips_seen:
                self._skip_id[n] = _same_ip(ip, ips_seen[ip])
            else:
                self._valid.add(n)
                keys_seen[key] = n
                if ip is not None:
                    ips_seen[ip] = n
                    self._mesh_ips.add(ip, n, local.order)

    def _recheck_claims(
        self, change: _Change, validity_changed: set[str], moved_ips: set[ipaddress.IPv4Address]
    ) -> tuple[set[str], set[str]]:
        """2. claims: the changed peers, the peers whose validity flipped, and the peers with an
        entry inside meshCIDR covering a mesh IP that changed hands.

        Returns the re-checked peers, and which of them and of the removed ones were active before.
        """
        removed = set(change.removed)
        recheck = (change.touched - removed) | validity_changed
        if moved_ips:
            for n in self._wide:
                if any(ip in entry for _, entry in self._local[n].wide for ip in moved_ips):
                    recheck.add(n)
        recheck -= removed
        was_active = {n for n in (*recheck, *change.removed) if n in self._active}
        for n in change.removed:
            self._skip_claim.pop(n, None)
            self._active.discard(n)
        for n in recheck:
            local = self._local[n]
            self._skip_claim.pop(n, None)
            self._active.discard(n)
            if n not in self._valid or not local.peer.spec.allowed_ips:
                continue
            reason = self._claim(n, local)
            if reason:
                self._skip_claim[n] = reason
            else:
                self._active.add(n)
        return recheck, was_active

    def _claim(self, name: str, local: _Local) -> str:
        for i, entry in local.wide:
            if (hit := self._mesh_ips.oldest_in(entry, name, local.peer.mesh_ip)) is not None:
                return f"spec.allowedIPs[{i}] {entry} contains the mesh IP {hit[0]} of peer {hit[1]!r}"
        return local.claim

    def _reroute(self, change: _Change, recheck: set[str], was_active: set[str]) -> None:
        """3. routing: re-decide every group of active peers sharing a net with a peer that
        changed, left or (de)activated, oldest first."""
        nets: set[IPNetwork] = set()
        group: set[str] = set()
        for n in (*recheck, *change.removed):
            now = n in self._active
            before = n in was_active
            if before and (not now or n in change.touched):
                nets.update(self._nets.remove(n))
            if before and not now:
                self._withdraw(n)
            if now and (not before or n in change.touched):
                self._nets.add(n, self._local[n].candidates)
                nets.update(self._local[n].candidates)
                group.add(n)
        self._nets.spread(nets, group)
        taken: set[IPNetwork] = set()
        for n in sorted(group, key=lambda n: self._local[n].order):
            result = _accept(n, self._local[n], taken)
            taken.update(result[0])
            if n in change.touched or self._result.get(n) != result:
                self._result[n] = result
                self._output.stale("dropped")
                self._emit(n)

    # ------------------------------------------------------------------ output

    def _follow_paths(self, paths: Mapping[str, PeerPath]) -> None:
        if not paths and not self._output.path:
            return
        for n in self._active:
            path = paths.get(n, _NO_PATH)
            if path != self._output.path.get(n, _NO_PATH):
                self._emit(n, path)

    def _emit(self, name: str, path: PeerPath | None = None) -> None:
        self._output.emit(name, self._local[name].peer, self._result[name][0], path)

    def _withdraw(self, name: str) -> None:
        """Forget everything ``name`` contributed (it is no longer active)."""
        self._output.withdraw(name)
        if self._result.pop(name, None) is not None:
            self._output.stale("dropped")

    def _desired(self, mesh: Mesh, node: LocalFacts, own_ip: ipaddress.IPv4Address | None) -> Desired:
        out = self._output.out
        order = self._order_of
        if "skipped" not in out:
            out["skipped"] = tuple(
                [Skipped(n, self._skip_id[n]) for n in sorted(self._skip_id, key=order)]
                + [Skipped(n, self._skip_claim[n]) for n in sorted(self._skip_claim, key=order)]
            )
        if "dropped" not in out:
            with_drops = [n for n, r in self._result.items() if r[1]]
            out["dropped"] = tuple(d for n in sorted(with_drops, key=order) for d in self._result[n][1])
        return self._output.desired(mesh, node, own_ip)

    def _order_of(self, name: str) -> tuple[str, str]:
        return self._local[name].order
