"""``wirekubectl status``: the mesh at a glance.

Pure part: :func:`build_report` turns WireKubePeer / WireKubeGateway / WireKubeMesh dicts into a
:class:`Report` (nodes, the ordered pair matrix with transport and relay reason, gateways).
Rendering: :func:`render_table` (colours on a terminal), :func:`render_json`, :func:`render_yaml`.
The command itself (:func:`run`) reads the objects through the Kubernetes adapter.

A pair's transport comes from the *from* side's ``status.peerTransports``; a pair is ``down``
when the from side does not list the peer (never reached, or the agent is not running) or the
from side is not connected at all.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from wirekube.relay.replicastatus import ReplicaRow, replica_rows

JSON = Mapping[str, Any]


@dataclass(frozen=True)
class NodeRow:
    name: str
    nat_type: str
    endpoint: str
    mesh_ip: str
    connected: bool
    transport_mode: str
    discovery: str


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    transport: str  # direct | relay | down
    reason: str = ""
    path_mtu: int = 0
    """The route MTU the *from* side measured and applied (status.pathMTU); 0: the interface's."""


@dataclass(frozen=True)
class GatewayRow:
    name: str
    active_peer: str
    ready: bool
    routes: int
    peer_health: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    nodes: tuple[NodeRow, ...]
    pairs: tuple[Pair, ...]
    gateways: tuple[GatewayRow, ...]
    relay_endpoints: tuple[str, ...] = ()
    relay_replicas: tuple[ReplicaRow, ...] = ()
    """From each relay replica's Lease (``--status-lease``)."""
    relay_replicas_note: str = ""
    """Why the replicas could not be listed (empty when they could)."""

    @property
    def all_connected(self) -> bool:
        return bool(self.nodes) and all(n.connected for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(n) for n in self.nodes],
            "pairs": [{"from": p.source, "to": p.target, "transport": p.transport, "reason": p.reason}
                      | ({"pathMTU": p.path_mtu} if p.path_mtu else {}) for p in self.pairs],
            "gateways": [asdict(g) | {"peer_health": dict(g.peer_health)} for g in self.gateways],
            "relayEndpoints": list(self.relay_endpoints),
            "relayReplicas": [asdict(r) | {"age": round(r.age, 1) if r.age != float("inf") else None}
                              for r in self.relay_replicas],
        }


def _status(obj: JSON) -> JSON:
    return obj.get("status") or {}


def _spec(obj: JSON) -> JSON:
    return obj.get("spec") or {}


def build_report(peers: Iterable[JSON], gateways: Iterable[JSON] = (), mesh: JSON | None = None,
                 relay_leases: Iterable[JSON] = (), now: float = 0.0, relay_note: str = "") -> Report:
    peers = sorted(peers, key=lambda p: p["metadata"]["name"])
    nodes = []
    for p in peers:
        spec, status = _spec(p), _status(p)
        allowed = spec.get("allowedIPs") or []
        nodes.append(
            NodeRow(
                name=p["metadata"]["name"],
                nat_type=status.get("natType") or "",
                endpoint=spec.get("endpoint") or "",
                mesh_ip=str(allowed[0]).split("/")[0] if allowed else "",
                connected=bool(status.get("connected")),
                transport_mode=status.get("transportMode") or "",
                discovery=status.get("endpointDiscoveryMethod") or "",
            )
        )
    pairs = []
    for src in peers:
        status = _status(src)
        transports = status.get("peerTransports") or {}
        reasons = status.get("relayReasons") or {}
        mtus = status.get("pathMTU") or {}
        for dst in peers:
            a, b = src["metadata"]["name"], dst["metadata"]["name"]
            if a == b:
                continue
            transport = transports.get(b) if status.get("connected") else None
            pairs.append(Pair(a, b, transport or "down", reasons.get(b, "") if transport == "relay" else "",
                              int(mtus.get(b) or 0) if transport == "direct" else 0))
    gws = tuple(
        GatewayRow(
            name=g["metadata"]["name"],
            active_peer=_status(g).get("activePeer") or "",
            ready=bool(_status(g).get("ready")),
            routes=int(_status(g).get("routesInjected") or 0),
            peer_health=dict(_status(g).get("peerHealth") or {}),
        )
        for g in sorted(gateways, key=lambda g: g["metadata"]["name"])
    )
    relay = tuple(((_status(mesh or {}).get("relay") or {}).get("endpoints")) or ())
    return Report(tuple(nodes), tuple(pairs), gws, relay, tuple(replica_rows(relay_leases, now)), relay_note)


# ---- rendering ----------------------------------------------------------------------------------

_COLOURS = {"direct": "\033[32m", "relay": "\033[33m", "down": "\033[31m", True: "\033[32m", False: "\033[31m"}
_RESET = "\033[0m"


def _paint(text: str, key: Any, colour: bool) -> str:
    return f"{_COLOURS[key]}{text}{_RESET}" if colour and key in _COLOURS else text


def _table(header: list[str], rows: list[list[str]], painted: list[list[str]] | None = None) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for i, row in enumerate(rows):
        cells = painted[i] if painted else row
        out.append("  ".join(c + " " * (w - len(r)) for c, r, w in zip(cells, row, widths, strict=True)).rstrip())
    return "\n".join(out)


def render_table(report: Report, *, colour: bool = False) -> str:
    header = ["NODE", "NAT", "ENDPOINT", "MESH-IP", "CONNECTED", "MODE"]
    rows = [[n.name, n.nat_type or "-", n.endpoint or "-", n.mesh_ip or "-", str(n.connected).lower(),
             n.transport_mode or "-"] for n in report.nodes]
    painted = [r[:4] + [_paint(r[4], n.connected, colour), r[5]] for r, n in zip(rows, report.nodes, strict=True)]
    parts = [_table(header, rows, painted)]

    names = [n.name for n in report.nodes]
    if len(names) > 1:
        lookup = {(p.source, p.target): p for p in report.pairs}
        mheader = ["FROM \\ TO", *names]
        mrows, mpainted = [], []
        for a in names:
            row, prow = [a], [a]
            for b in names:
                t = lookup[(a, b)].transport if a != b else "."
                row.append(t)
                prow.append(_paint(t, t, colour))
            mrows.append(row)
            mpainted.append(prow)
        parts.append(_table(mheader, mrows, mpainted))
        relayed = [p for p in report.pairs if p.transport == "relay" and p.reason]
        if relayed:
            parts.append("\n".join(f"relay {p.source} -> {p.target}: {p.reason}" for p in relayed))
        small = [p for p in report.pairs if p.path_mtu]
        if small:
            parts.append("\n".join(f"path MTU {p.source} -> {p.target}: {p.path_mtu}" for p in small))
    if report.gateways:
        gheader = ["GATEWAY", "ACTIVE", "READY", "ROUTES", "HEALTH"]
        grows = [[g.name, g.active_peer or "-", str(g.ready).lower(), str(g.routes),
                  ",".join(f"{k}={v}" for k, v in sorted(g.peer_health.items())) or "-"] for g in report.gateways]
        parts.append(_table(gheader, grows))
    if report.relay_endpoints:
        parts.append("relay: " + ", ".join(report.relay_endpoints))
    if report.relay_replicas:
        rheader = ["RELAY-REPLICA", "NAMESPACE", "ID", "KEYS", "MESH-LINKS", "RENEWED"]
        rrows = [[r.name, r.namespace or "-", r.replica or "-", str(r.keys), "-" if r.links is None else str(r.links),
                  (f"{r.age:.0f}s ago" if r.age != float("inf") else "never") + (" (stale)" if r.stale else "")]
                 for r in report.relay_replicas]
        parts.append(_table(rheader, rrows))
    if report.relay_replicas_note:
        parts.append(f"relay replicas: {report.relay_replicas_note}")
    return "\n\n".join(parts) + "\n"


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def render_yaml(report: Report) -> str:
    return yaml.safe_dump(report.to_dict(), sort_keys=False)


# ---- the command --------------------------------------------------------------------------------


def fetch_report(kube: Any) -> Report:
    from wirekube import errors, k8s, reports

    peers = reports.list_peers(kube)
    gateways, _ = kube.list(k8s.GATEWAYS)
    try:
        mesh = kube.get(k8s.MESHES, "default")
    except errors.NotFound:
        mesh = None
    from wirekube.relay.replicastatus import LABEL

    leases: list[JSON] = []
    note = ""
    try:  # every namespace: the relay may run in any
        leases, _ = kube.list(dataclasses.replace(k8s.LEASES, namespaced=False), label_selector=LABEL)
    except errors.Forbidden:
        note = "not shown (this user may not list Leases in all namespaces)"
    return build_report(peers, gateways, mesh, leases, time.time(), note)


def run(kube: Any, *, output: str = "table", require_connected: bool = False, timeout: float = 0.0) -> int:
    """Print the report; with ``require_connected``, wait up to ``timeout`` s for every peer to
    report connected and exit 1 if they do not (the `helm test` hook)."""
    deadline = time.monotonic() + timeout
    while True:
        report = fetch_report(kube)
        if not require_connected or report.all_connected or time.monotonic() >= deadline:
            break
        time.sleep(2)
    render = {"json": render_json, "yaml": render_yaml}.get(output)
    text = render(report) if render else render_table(report, colour=sys.stdout.isatty())
    sys.stdout.write(text)
    if require_connected and not report.all_connected:
        down = [n.name for n in report.nodes if not n.connected] or ["(no peers)"]
        print(f"not connected: {', '.join(down)}", file=sys.stderr)
        return 1
    return 0
