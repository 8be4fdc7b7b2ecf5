"""What :class:`~wirekube.agent.source.KubeSource` writes besides its own WireKubePeer.

- :class:`SplitPublisher`: this node's view of each pair where issue 20 puts it, on its
  WireKubeNodeReport and as the WireKubePairSignals it sends; while those CRDs are not served (a
  chart from before issue 20) it says so and the source publishes the v1alpha1 way.
- :class:`PeerEvents`: the Warning Events about peers this node skips or whose routes it refuses.

Only ``wirekube.k8s`` talks to the API server; these classes are handed its client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from wirekube.agent.plan import Skipped
from wirekube.authority import Refusal
from wirekube.errors import AlreadyExists, ApiError, NotFound
from wirekube.models import (
    LABEL_NODE,
    LABEL_SIGNAL_FROM,
    LABEL_SIGNAL_TO,
    PeerStatus,
    pair_signal_body,
    pair_signal_name,
    pair_signal_specs,
    report_status_to_cr,
)

SPLIT_RECHECK_SECONDS = 300.0
"""Without the WireKubeNodeReport / WireKubePairSignal CRDs (a chart from before issue 20) the
agent publishes the v1alpha1 way (everything on its WireKubePeer) and looks again this often."""


class SplitPublisher:
    """Owns this node's WireKubeNodeReport and the pair signals it sends: what was last read or
    written of each (so only changes are written), and whether their CRDs are served."""

    def __init__(
        self,
        kube: Any,
        node_name: str,
        log: Any,
        on_change: Callable[[], None],
        peer_count: Callable[[], int],
    ) -> None:
        from wirekube import k8s

        self._k8s = k8s
        self.kube = kube
        self.node_name = node_name
        self._log = log
        self._on_change = on_change
        self._peer_count = peer_count
        self._report: dict[str, Any] | None = None
        """The node's WireKubeNodeReport status as last read or written (None: not read yet)."""
        self._report_read = False
        self._sent: dict[str, dict[str, Any]] | None = None
        """Specs of the pair signals this node has sent, by addressee (None: not listed yet)."""
        self._legacy_since: float | None = None
        """When the split CRDs were last found missing (then everything goes on the WireKubePeer)."""

    def legacy(self) -> bool:
        """Whether to publish the v1alpha1 way (the split CRDs were found missing recently)."""
        if self._legacy_since is None:
            return False
        if time.monotonic() - self._legacy_since < SPLIT_RECHECK_SECONDS:
            return True
        self._legacy_since = None  # look again: the CRDs may have been installed since
        self._report, self._sent = None, None
        return False

    def read_report(self) -> dict[str, Any] | None:
        """The report as stored, read once per process (the writes keep ``_report`` current)."""
        if self._report is None and not self._report_read:
            self._report_read = True
            try:
                self._report = dict(self.kube.get(self._k8s.NODE_REPORTS, self.node_name).get("status") or {})
            except ApiError:
                pass  # none yet (or not served): the first publish creates it
        return self._report

    def publish(self, status: PeerStatus) -> None:
        """Write the report and the pair signals where they differ from what was last written."""
        try:
            try:
                self._publish_report(status)
                self._publish_signals(status)
            except NotFound:  # deleted behind our back, or the CRDs are not served: read again
                self._report, self._sent = None, None
                self._publish_report(status)
                self._publish_signals(status)
        except NotFound:
            self._go_legacy()
        except ApiError as e:
            self._log.warning("cannot write own report or pair signals: {}", e)

    def _go_legacy(self) -> None:
        self._log.error("WireKubeNodeReport / WireKubePairSignal are not served (install the chart's CRDs): "
                        "publishing every pair on the WireKubePeer, as v1alpha1 agents do")
        self._legacy_since = time.monotonic()
        self._on_change()  # the next pass writes the full status

    def _publish_report(self, status: PeerStatus) -> None:
        wanted = report_status_to_cr(status)
        if self._report is None:
            try:
                self._report = dict(self.kube.get(self._k8s.NODE_REPORTS, self.node_name).get("status") or {})
            except NotFound:
                self.kube.create(self._k8s.NODE_REPORTS, {
                    "apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeNodeReport",
                    "metadata": {"name": self.node_name, "labels": {LABEL_NODE: self.node_name}}})
                self._report = {}
        current = self._report
        # A handshake time advances by itself, and a symmetric NAT's port step varies from one STUN
        # round to the next: both are written with the next real change, never alone.
        if all(current.get(k) == v for k, v in wanted.items() if k not in ("lastHandshake", "natPortStep")):
            return
        patch: dict[str, Any] = dict(wanted)
        for k, v in wanted.items():
            old = current.get(k)
            if isinstance(v, dict) and isinstance(old, dict):
                patch[k] = {**{gone: None for gone in old if gone not in v}, **v}
        for k in current:
            if k not in wanted:
                patch[k] = None
        written = self.kube.patch_status(self._k8s.NODE_REPORTS, self.node_name, {"status": patch})
        self._report = dict(written.get("status") or {})

    def _publish_signals(self, status: PeerStatus) -> None:
        wanted = pair_signal_specs(status, self.node_name, self._peer_count())
        if self._sent is None:
            mine, _ = self.kube.list(self._k8s.PAIR_SIGNALS, label_selector=f"{LABEL_SIGNAL_FROM}={self.node_name}")
            self._sent = {}
            for obj in mine:
                to = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_SIGNAL_TO, "")
                self._sent[to] = dict(obj.get("spec") or {})
        sent = self._sent
        for to, spec in wanted.items():
            if sent.get(to) == spec:
                continue
            if to in sent:
                try:
                    self.kube.patch_merge(self._k8s.PAIR_SIGNALS, pair_signal_name(self.node_name, to),
                                          {"spec": {k: spec.get(k) for k in ("observedEndpoint", "birthday")}})
                except NotFound:
                    self.kube.create(self._k8s.PAIR_SIGNALS, pair_signal_body(self.node_name, to, spec))
            else:
                try:
                    self.kube.create(self._k8s.PAIR_SIGNALS, pair_signal_body(self.node_name, to, spec))
                except AlreadyExists:
                    self.kube.patch_merge(self._k8s.PAIR_SIGNALS, pair_signal_name(self.node_name, to),
                                          {"spec": {k: spec.get(k) for k in ("observedEndpoint", "birthday")}})
            sent[to] = spec
        for to in sorted(set(sent) - set(wanted)):
            try:
                self.kube.delete(self._k8s.PAIR_SIGNALS, pair_signal_name(self.node_name, to))
            except NotFound:
                pass
            del sent[to]


class PeerEvents:
    """Tells, once per new reason, why this node skips a peer or does not route one of its claims
    (Warning Events on the WireKubePeer concerned)."""

    def __init__(self, kube: Any, node_name: str, log: Any, peers: Any) -> None:
        self.kube = kube
        self.node_name = node_name
        self._log = log
        self._peers = peers
        """The WireKubePeer informer (its objects are the Events' ``regarding``)."""
        self._reported: dict[str, str] = {}
        self._refusals_reported: set[Refusal] = set()

    def _regarding(self, name: str) -> dict[str, Any]:
        regarding = self._peers.cache.get(name) or {"metadata": {"name": name}}
        return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer", **regarding}

    def skipped(self, skipped: Sequence[Skipped]) -> None:
        current = {s.peer: s.reason for s in skipped}
        for name, reason in current.items():
            if self._reported.get(name) == reason:
                continue
            self.kube.emit_event(
                self._regarding(name),
                "PeerSkipped",
                f"node {self.node_name} skips peer {name}: {reason}",
                type_="Warning",
                component="agent",
            )
        self._reported = current

    def refusals(self, refusals: Sequence[Refusal]) -> None:
        """One Warning Event per newly refused claim, on the peer that made it."""
        current = set(refusals)
        for r in sorted(current - self._refusals_reported, key=lambda r: (r.peer, str(r.entry))):
            try:
                self.kube.emit_event(self._regarding(r.peer), "RouteNotGranted",
                                     f"node {self.node_name} does not route {r.entry} of peer {r.peer}: {r.reason}; "
                                     f"fix: {r.fix}", type_="Warning", component="agent")
            except ApiError as e:
                self._log.warning("cannot record an Event for {} of {}: {}", r.entry, r.peer, e)
                current.discard(r)  # told again on the next pass
        self._refusals_reported = current
