"""Readers of every pair: WireKubePeers in the v1alpha1 shape, with their nodes'
WireKubeNodeReports and the WireKubePairSignals they sent folded in (issue 20).

Agents publish per-pair observations (peerTransports, relayReasons, pathMTU, lastHandshake) on
their node's WireKubeNodeReport, and observed endpoints and birthday rounds as pair signals, none
of which every agent watches. ``wirekubectl status``, doctor and the lab read them with the peers,
in the shape agents before issue 20 wrote on the peer itself (an agent that predates it has no
report and sends no signals; its peer's own fields stand).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from wirekube import errors, k8s
from wirekube.models import LABEL_SIGNAL_FROM, LABEL_SIGNAL_TO, overlay_report

JSON = dict[str, Any]


def _optional_list(kube: Any, res: k8s.Resource, label_selector: str | None = None) -> list[JSON]:
    try:
        items, _ = kube.list(res, label_selector=label_selector)
    except (errors.NotFound, errors.Forbidden):  # CRDs from before issue 20, or a user who may not read them
        return []
    return list(items)


def fold_signals(peer: JSON, signals: Iterable[JSON]) -> JSON:
    """``peer`` with the signals it sent as status.observedEndpoints / status.birthday entries."""
    status = dict(peer.get("status") or {})
    observed = dict(status.get("observedEndpoints") or {})
    rounds = dict(status.get("birthday") or {})
    for sig in signals:
        to = ((sig.get("metadata") or {}).get("labels") or {}).get(LABEL_SIGNAL_TO)
        spec = sig.get("spec") or {}
        if not to:
            continue
        if spec.get("observedEndpoint"):
            observed[to] = spec["observedEndpoint"]
        if spec.get("birthday"):
            rounds[to] = spec["birthday"]
    if observed:
        status["observedEndpoints"] = observed
    if rounds:
        status["birthday"] = rounds
    return {**peer, "status": status}


def list_peers(kube: Any) -> list[JSON]:
    """Every WireKubePeer, its node's report and sent signals folded into its status."""
    peers, _ = kube.list(k8s.PEERS)
    reports = {r["metadata"]["name"]: r for r in _optional_list(kube, k8s.NODE_REPORTS)}
    sent: dict[str, list[JSON]] = {}
    for sig in _optional_list(kube, k8s.PAIR_SIGNALS):
        sender = ((sig.get("metadata") or {}).get("labels") or {}).get(LABEL_SIGNAL_FROM, "")
        sent.setdefault(sender, []).append(sig)
    return [fold_signals(overlay_report(p, reports.get(p["metadata"]["name"])), sent.get(p["metadata"]["name"], []))
            for p in peers]


def get_peer(kube: Any, name: str) -> JSON:
    """One WireKubePeer the same way (raises NotFound for the peer only)."""
    peer = kube.get(k8s.PEERS, name)
    try:
        report = kube.get(k8s.NODE_REPORTS, name)
    except (errors.NotFound, errors.Forbidden):
        report = None
    return fold_signals(overlay_report(peer, report),
                        _optional_list(kube, k8s.PAIR_SIGNALS, f"{LABEL_SIGNAL_FROM}={name}"))
