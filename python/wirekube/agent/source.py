"""Where the agent's view of the mesh comes from.

- :class:`KubeSource`: the API server (informers on WireKubeMesh and WireKubePeer, and on the
  WireKubePairSignals addressed to this node; registration of the node's own peer; status, the
  node's WireKubeNodeReport, the signals it sends, and Events).  It keeps its last view while the API server is
  unreachable (informers reconnect with backoff), so the dataplane keeps its last state.  The
  report, the pair signals and the Events are written by its collaborators in
  :mod:`wirekube.agent.publishing`.
- :class:`FileSource`: a YAML/JSON file holding ``mesh`` (a WireKubeMesh object) and ``peers``
  (WireKubePeer objects), re-read when it changes.  For standalone use and dataplane tests.

Only ``wirekube.k8s`` talks to the API server; this module passes it plain dicts.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import yaml
from loguru import logger

from wirekube.agent.gateway import augment_peers, parse_gateways
from wirekube.agent.plan import Skipped
from wirekube.agent.publishing import PeerEvents, SplitPublisher
from wirekube.agent.reconcile import Snapshot
from wirekube.agent.registration import (
    NodeInfo,
    desired_registration,
    new_peer_body,
    node_info_from_obj,
    update_patch,
)
from wirekube.authority import Refusal, grants_by_node, merge_grants
from wirekube.errors import AlreadyExists, ApiError, InvalidObject, NotFound
from wirekube.gateway.contract import client_allowed_ips
from wirekube.models import (
    LABEL_SIGNAL_TO,
    MESH_SINGLETON,
    PAIR_FIELDS,
    IPNetwork,
    PairSignal,
    Peer,
    PeerStatus,
    mesh_from_cr,
    overlay_report,
    pair_signal_from_cr,
    pair_signal_name,
    peer_facts_to_cr,
    peer_from_cr,
    peer_status_to_cr,
    route_grant_from_cr,
    with_signal,
)


def parse_peers(
    objs: Sequence[Mapping[str, Any]], memo: dict[str, tuple[str, Peer | Skipped]] | None = None
) -> tuple[tuple[Peer, ...], tuple[Skipped, ...]]:
    """Peers (and the objects that are not even peers) from WireKubePeer objects.

    With ``memo`` (name -> (resourceVersion, parsed)), an object whose resourceVersion did not
    change is not parsed again and keeps its ``Peer`` object, which is what lets the planner
    skip unchanged peers by identity.  The memo is trimmed to the names in ``objs``.
    """
    peers: list[Peer] = []
    rejected: list[Skipped] = []
    seen: dict[str, tuple[str, Peer | Skipped]] = {}
    for obj in objs:
        meta = obj.get("metadata")
        # Plain dicts (what the informer holds) only: an ABC isinstance per object costs more
        # than everything else this loop does for an unchanged peer.
        name, rv = (meta.get("name"), meta.get("resourceVersion")) if type(meta) is dict else (None, None)
        memoable = type(name) is str and type(rv) is str and rv != ""
        hit = memo.get(name) if memo is not None and memoable else None  # type: ignore[arg-type]
        if hit is not None and hit[0] == rv:
            parsed = hit[1]
        else:
            try:
                parsed = peer_from_cr(obj)
            except InvalidObject as e:
                parsed = Skipped(e.name or "?", f"{e.field}: {e.reason}")
        if memoable:
            seen[cast(str, name)] = (cast(str, rv), parsed)
        if type(parsed) is Skipped:
            rejected.append(parsed)
        else:
            peers.append(parsed)  # type: ignore[arg-type]
    if memo is not None:
        memo.clear()
        memo.update(seen)
    return tuple(peers), tuple(rejected)


class FileSource:
    """Mesh and peers from a file, polled for changes every ``poll_seconds``."""

    def __init__(self, path: Path, on_change: Callable[[], None] = lambda: None, poll_seconds: float = 0.5) -> None:
        self.path = path
        self._on_change = on_change
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._stamp: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._status = PeerStatus()

    def start(self) -> FileSource:
        self._stamp = self._file_stamp()
        self._thread = threading.Thread(target=self._watch, name="file-source", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                self._on_change()

    def snapshot(self) -> Snapshot | None:
        try:
            doc = yaml.safe_load(self.path.read_text()) or {}
            mesh = mesh_from_cr(doc.get("mesh") or {"metadata": {"name": MESH_SINGLETON}})
        except (OSError, yaml.YAMLError, InvalidObject, AttributeError) as e:
            logger.error("cannot read {}: {}", self.path, e)
            return None
        peers, rejected = parse_peers(doc.get("peers") or [])
        return Snapshot(mesh, peers, rejected)

    def register(self, public_key: str) -> None:
        """Static source: the file already lists this node."""

    def publish(self, status: PeerStatus, skipped: Sequence[Skipped]) -> None:
        self._status = status

    def own_status(self) -> PeerStatus:
        return self._status

    def report_refusals(self, refusals: Sequence[Refusal]) -> None:
        """A peers file has nobody to tell; the reconciler logs refusals."""


class KubeSource:
    """Mesh and peers from the API server, through informers (``wirekube.k8s``)."""

    def __init__(
        self,
        kube: Any,
        node_name: str,
        on_change: Callable[[], None] = lambda: None,
        discovered: Callable[[], tuple[Any, Any]] = lambda: (None, None),
    ) -> None:
        from wirekube import k8s

        self._k8s = k8s
        self.kube = kube
        self.node_name = node_name
        self._on_change = on_change
        self._discovered = discovered
        self.peers = k8s.Informer(kube, k8s.PEERS, on_event=self._event)
        self.meshes = k8s.Informer(kube, k8s.MESHES, on_event=self._event)
        self.gateways = k8s.Informer(kube, k8s.GATEWAYS, on_event=self._gateway_event)
        self.grants = k8s.Informer(kube, k8s.ROUTE_GRANTS, on_event=self._event)
        # This node's own Node object (annotations, addresses): registration reads it every pass,
        # so it is watched rather than fetched (one GET per event pass at 1,000 peers adds up).
        self.node = k8s.Informer(kube, k8s.NODES, on_event=self._event, field_selector=f"metadata.name={node_name}")
        # Only what other nodes address to this one: O(pairs this node coordinates), not O(N).
        self.signals = k8s.Informer(kube, k8s.PAIR_SIGNALS, on_event=self._event,
                                    label_selector=f"{LABEL_SIGNAL_TO}={node_name}")
        self._signals_memo: tuple[str, dict[str, PairSignal]] | None = None
        self.on_gateway_change: Callable[[], None] = lambda: None
        """Also told when a WireKubeGateway changes (the gateway agent's wake-up)."""
        self._grants_missing_logged = False
        self._grants_memo: tuple[str, dict[str, tuple[IPNetwork, ...]]] | None = None
        """Grants by node with the informer's resourceVersion they were built at."""
        self._parsed: dict[str, tuple[str, Peer | Skipped]] = {}
        """Parsed peers by name, with the resourceVersion they were parsed from."""
        self._parse_lock = threading.Lock()
        self._log = logger.bind(component="kube-source", node=node_name)
        self._split = SplitPublisher(kube, node_name, self._log, on_change, lambda: len(self.peers.cache))
        self._events = PeerEvents(kube, node_name, self._log, self.peers)

    def start(self) -> KubeSource:
        self.peers.start()
        self.meshes.start()
        self.gateways.start()
        self.grants.start()
        self.node.start()
        self.signals.start()
        return self

    def stop(self) -> None:
        # Side by side: each informer may take a while to leave a blocked watch.
        stoppers = [threading.Thread(target=i.stop, daemon=True)
                    for i in (self.peers, self.meshes, self.gateways, self.grants, self.node,
                                                                  self.signals)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()

    def wait_synced(self, timeout: float) -> bool:
        """Wait until a full snapshot can be taken: peers and the mesh listed, and the route grants
        and gateways too (or their CRDs known to be absent), so ``--once`` plans what the running
        loop keeps (gateway routes included)."""
        deadline = time.monotonic() + timeout
        for informer in (self.peers, self.meshes):
            if not informer.wait_synced(max(0.0, deadline - time.monotonic())):
                return False
        for optional in (self.grants, self.gateways):
            while not optional.wait_synced(0.1):
                if isinstance(optional.last_error, NotFound):
                    break
                if time.monotonic() >= deadline:
                    return False
        return True

    def _event(self, etype: str, obj: dict[str, Any]) -> None:
        self._on_change()

    def _gateway_event(self, etype: str, obj: dict[str, Any]) -> None:
        self._on_change()
        self.on_gateway_change()

    def snapshot(self) -> Snapshot | None:
        if not (self.peers.wait_synced(0) and self.meshes.wait_synced(0)):
            return None
        mesh_obj = self.meshes.cache.get(MESH_SINGLETON)
        if mesh_obj is None:
            self._log.warning("WireKubeMesh {!r} does not exist; waiting", MESH_SINGLETON)
            return None
        try:
            mesh = mesh_from_cr(mesh_obj)
        except InvalidObject as e:
            self._log.error("{}; keeping the dataplane as it is", e)
            return None
        with self._parse_lock:  # snapshot() is called from the reconciler and the status decorator
            peers, rejected = parse_peers(list(self.peers.cache.values()), self._parsed)
        granted = self._granted()
        if granted is None:
            return None
        # Gateways are not waited for (the CRD may be absent): routes appear once they are known.
        gateways = parse_gateways(self.gateways.cache.values())
        peers = augment_peers(peers, gateways, self.node_name)
        granted = merge_grants(granted, client_allowed_ips(gateways, self.node_name))
        return Snapshot(mesh, self._with_signals(peers), rejected, granted)

    def _with_signals(self, peers: tuple[Peer, ...]) -> tuple[Peer, ...]:
        """Each peer with what it signalled to this node (status.observedEndpoints[<this node>],
        status.birthday[<this node>], where traversal reads them), and this node's own peer with
        the path MTUs of its report (``--once`` keeps them)."""
        incoming = self._incoming_signals()
        own_mtus = (self._split.read_report() or {}).get("pathMTU") or {}
        if not incoming and not own_mtus:
            return peers
        out = []
        for p in peers:
            if p.name in incoming:
                p = with_signal(p, incoming[p.name])
            elif p.name == self.node_name and own_mtus and not p.status.path_mtu:
                p = dataclasses.replace(p, status=dataclasses.replace(
                    p.status, path_mtu={str(k): int(v) for k, v in own_mtus.items() if isinstance(v, int)}))
            out.append(p)
        return tuple(out)

    def _incoming_signals(self) -> dict[str, PairSignal]:
        if not self.signals.wait_synced(0):
            return {}
        rv = self.signals.resource_version
        if self._signals_memo is not None and self._signals_memo[0] == rv:
            return self._signals_memo[1]
        by_sender: dict[str, PairSignal] = {}
        for obj in self.signals.cache.values():
            try:
                sig = pair_signal_from_cr(obj)
            except InvalidObject as e:
                self._log.warning("ignoring {}", e)
                continue
            if (sig.addressee == self.node_name
                    and obj["metadata"]["name"] == pair_signal_name(sig.sender, sig.addressee)):
                by_sender[sig.sender] = sig
        self._signals_memo = (rv, by_sender)
        return by_sender

    def _granted(self) -> dict[str, tuple[IPNetwork, ...]] | None:
        """Route grants by node; None while they are not known yet.

        Fail closed: without the WireKubeRouteGrant CRD (an old install) nothing beyond mesh IPs
        and gateway routes is routed, and that is said once.  Until the first list answers, the
        snapshot waits (so a restarting agent does not withdraw routes it is about to re-grant)."""
        if not self.grants.wait_synced(0):
            if not isinstance(self.grants.last_error, NotFound):
                return None
            if not self._grants_missing_logged:
                self._log.error("WireKubeRouteGrant is not served (install the chart's CRDs): only mesh IPs "
                                "and gateway routes are routed")
                self._grants_missing_logged = True
            return {}
        rv = self.grants.resource_version
        if self._grants_memo is not None and self._grants_memo[0] == rv:
            return self._grants_memo[1]  # unchanged since the last snapshot: no re-parsing per pass
        grants = []
        for obj in self.grants.cache.values():
            try:
                grants.append(route_grant_from_cr(obj))
            except InvalidObject as e:
                self._log.warning("ignoring {}", e)
        by_node = grants_by_node(grants)
        self._grants_memo = (rv, by_node)
        return by_node

    def interface_name(self) -> str | None:
        """The mesh's WireGuard interface, once the mesh is known."""
        obj = self.meshes.cache.get(MESH_SINGLETON)
        try:
            return mesh_from_cr(obj).spec.interface_name if obj is not None else None
        except InvalidObject:
            return None

    # ------------------------------------------------------------------ registration

    def register(self, public_key: str) -> None:
        snap = self.snapshot()
        if snap is None:
            return
        try:
            if self.node.wait_synced(0):
                obj = self.node.cache.get(self.node_name)
                node = node_info_from_obj(obj) if obj is not None else NodeInfo(self.node_name)
            else:
                node = node_info_from_obj(self.kube.get(self._k8s.NODES, self.node_name))
        except NotFound:
            node = NodeInfo(self.node_name)
        except ApiError as e:
            self._log.warning("cannot read Node {}: {}; registration postponed", self.node_name, e)
            return
        existing_obj = self.peers.cache.get(self.node_name)
        existing = next((p for p in snap.peers if p.name == self.node_name), None)
        others = [p for p in snap.peers if p.name != self.node_name]
        reg = desired_registration(node, snap.mesh, public_key, existing, others, self._discovered())
        for problem in reg.problems:
            self._log.warning("node {}: {}", self.node_name, problem)
        if existing is None or existing_obj is None:
            self._create(node, reg)
            return
        patch = update_patch(node, reg, existing, existing_obj)
        if patch:
            self._log.info("updating own WireKubePeer ({})", ", ".join(sorted(patch)))
            self.kube.patch_merge(self._k8s.PEERS, self.node_name, patch)
        method = reg.endpoint_method.value if reg.endpoint_method else ""
        if method and existing.status.endpoint_discovery_method != method:
            self.kube.patch_status(self._k8s.PEERS, self.node_name, {"status": {"endpointDiscoveryMethod": method}})

    def _create(self, node: NodeInfo, reg: Any) -> None:
        try:
            self.kube.create(self._k8s.PEERS, new_peer_body(node, reg))
            self._log.info("registered own WireKubePeer with mesh IP {}", reg.spec.allowed_ips[0])
        except AlreadyExists:
            self._on_change()  # the informer is behind; the next pass updates instead

    # ------------------------------------------------------------------ status and events

    def own_status(self) -> PeerStatus:
        """What this node last published: its WireKubePeer's status with its report's conditions
        (which live on the report since issue 20: the next pass keeps their transition times)."""
        obj = self.peers.cache.get(self.node_name)
        if obj is None:
            return PeerStatus()
        if not self._split.legacy():
            conditions = (self._split.read_report() or {}).get("conditions")
            if conditions:
                obj = overlay_report(obj, {"status": {"conditions": conditions}})
        try:
            return peer_from_cr(obj).status
        except InvalidObject:
            return PeerStatus()

    def publish(self, status: PeerStatus, skipped: Sequence[Skipped]) -> None:
        """Write what changed, each part where its readers are (issue 20): per-node facts on the
        WireKubePeer, this node's view of each pair on its WireKubeNodeReport, observed endpoints
        and birthday rounds as pair signals. Nothing is written when nothing a reader needs
        changed (a later handshake time alone is not a change)."""
        obj = self.peers.cache.get(self.node_name)
        legacy = self._split.legacy()
        if obj is not None:
            current = obj.get("status") or {}
            if legacy:
                wanted = peer_status_to_cr(status)
            else:
                wanted = peer_facts_to_cr(status)
                # What a v1alpha1 agent (or this one, before the CRDs were there) left here goes, once.
                wanted.update({k: None for k in PAIR_FIELDS if k in current})
            if any(current.get(k) != v for k, v in wanted.items()):
                # A merge patch merges maps: keys that are gone (a removed peer) must be nulled.
                for k, v in wanted.items():
                    old = current.get(k)
                    if isinstance(v, dict) and isinstance(old, dict):
                        wanted[k] = {**{gone: None for gone in old if gone not in v}, **v}
                try:
                    self.kube.patch_status(self._k8s.PEERS, self.node_name, {"status": wanted})
                except ApiError as e:
                    self._log.warning("cannot write own status: {}", e)
        if obj is not None and not legacy:
            self._split.publish(status)
        self._events.skipped(skipped)

    def report_refusals(self, refusals: Sequence[Refusal]) -> None:
        """One Warning Event per newly refused claim, on the peer that made it."""
        self._events.refusals(refusals)
