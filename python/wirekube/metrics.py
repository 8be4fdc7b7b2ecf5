"""Prometheus metrics and health endpoints shared by the agent, relay and controller.

The agent's metrics are *snapshot driven*: each reconcile tick hands :class:`AgentMetrics` a
plain :class:`AgentSnapshot` (what the engine and the path state machines saw), and a custom
collector turns the latest snapshot into metric families at scrape time. Nothing in the
dataplane code touches prometheus objects, and a peer that disappears disappears from
``/metrics`` at once (no stale label sets).

Names follow the reference implementation where it has one (``wirekube_peer_connected``,
``wirekube_peer_transport_mode``, ``wirekube_peer_last_handshake_seconds``,
``wirekube_peer_bytes_{sent,received}_total``, ``wirekube_peer_latency_seconds``,
``wirekube_node_nat_type``, ``wirekube_{peers,relayed_peers,direct_peers}_total``), plus failover,
relay and EPERM metrics.

``serve(host, port, ready)`` starts ``/metrics``, ``/healthz`` (process alive) and ``/readyz``
(``ready()`` true: e.g. the agent has applied a plan at least once) on a daemon thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

NAT_TYPES = ("open", "cone", "port-restricted-cone", "symmetric", "")


@dataclass(frozen=True)
class PeerSample:
    connected: bool
    transport: str  # direct | relay
    last_handshake: float  # unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    latency_seconds: float | None = None
    relay_reason: str = ""


@dataclass(frozen=True)
class AgentSnapshot:
    node: str
    nat_type: str = ""
    engine: str = ""
    peers: Mapping[str, PeerSample] = field(default_factory=dict)
    relay_connections: int = 0
    refused_routes: Mapping[str, int] = field(default_factory=dict)
    """AllowedIPs entries this node does not route, by claiming peer (wirekube.authority)."""


class _AgentCollector(Collector):
    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.snapshot
        peers = sorted(snap.peers.items())
        connected = GaugeMetricFamily("wirekube_peer_connected", "1 when the peer had a recent handshake",
                                      labels=["node", "peer"])
        mode = GaugeMetricFamily("wirekube_peer_transport_mode", "1 for the transport in use toward the peer",
                                 labels=["node", "peer", "mode"])
        handshake = GaugeMetricFamily("wirekube_peer_last_handshake_seconds", "Unix time of the last handshake",
                                      labels=["node", "peer"])
        sent = CounterMetricFamily("wirekube_peer_bytes_sent", "Bytes sent to the peer (WireGuard counter)",
                                   labels=["node", "peer"])
        received = CounterMetricFamily("wirekube_peer_bytes_received", "Bytes received from the peer",
                                       labels=["node", "peer"])
        latency = GaugeMetricFamily("wirekube_peer_latency_seconds", "Last measured round trip to the peer",
                                    labels=["node", "peer"])
        node = snap.node
        for name, p in peers:
            connected.add_metric([node, name], 1.0 if p.connected else 0.0)
            for m in ("direct", "relay"):
                mode.add_metric([node, name, m], 1.0 if p.transport == m else 0.0)
            handshake.add_metric([node, name], p.last_handshake)
            sent.add_metric([node, name], float(p.tx_bytes))
            received.add_metric([node, name], float(p.rx_bytes))
            if p.latency_seconds is not None:
                latency.add_metric([node, name], p.latency_seconds)
        nat = GaugeMetricFamily("wirekube_node_nat_type", "1 for this node's NAT type", labels=["node", "type"])
        for t in NAT_TYPES:
            nat.add_metric([snap.node, t or "unknown"], 1.0 if snap.nat_type == t else 0.0)
        total = GaugeMetricFamily("wirekube_peers_total", "Peers in the mesh (besides this node)")
        total.add_metric([], float(len(peers)))
        relayed = GaugeMetricFamily("wirekube_relayed_peers_total", "Peers reached through the relay")
        relayed.add_metric([], float(sum(p.transport == "relay" for _, p in peers)))
        direct = GaugeMetricFamily("wirekube_direct_peers_total", "Peers reached directly")
        direct.add_metric([], float(sum(p.transport == "direct" for _, p in peers)))
        relays = GaugeMetricFamily("wirekube_agent_relay_connections", "Warm, authenticated relay connections")
        relays.add_metric([], float(snap.relay_connections))
        engine = GaugeMetricFamily("wirekube_engine_info", "WireGuard engine in use", labels=["engine"])
        if snap.engine:
            engine.add_metric([snap.engine], 1.0)
        refused = GaugeMetricFamily("wirekube_route_claims_refused",
                                    "AllowedIPs entries not routed for lack of a grant or holding a guarded address",
                                    labels=["peer"])
        for name, count in sorted(snap.refused_routes.items()):
            refused.add_metric([name], float(count))
        yield from (connected, mode, handshake, sent, received, latency, nat, total, relayed, direct, relays, engine,
                    refused)


class AgentMetrics:
    """The agent's registry: the snapshot collector plus event counters."""

    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._snapshot = AgentSnapshot(node=node)
        self.registry.register(_AgentCollector(self))
        self.failovers = Counter("wirekube_failovers", "Direct paths failed over to the relay", ["peer"],
                                 registry=self.registry)
        self.failover_detect = Histogram(
            "wirekube_failover_detection_seconds", "Silence on the direct path before failing over",
            buckets=(0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0), registry=self.registry)
        self.recoveries = Counter("wirekube_direct_recoveries", "Relayed peers moved back to direct", ["peer"],
                                  registry=self.registry)
        self.relay_reconnects = Counter("wirekube_agent_relay_reconnects", "Relay connections re-established",
                                        registry=self.registry)
        self.eperm = Counter("wirekube_agent_relay_proxy_eperm", "EPERM on the relay proxy's loopback socket",
                             registry=self.registry)
        self.eperm_recoveries = Counter("wirekube_agent_relay_proxy_eperm_recoveries",
                                        "Proxy sockets recreated after EPERM",
                                        registry=self.registry)
        self.reconcile_ops = Counter("wirekube_reconcile_operations", "Dataplane operations applied", ["kind"],
                                     registry=self.registry)
        self.reconcile_seconds = Histogram("wirekube_reconcile_duration_seconds", "Time of one reconcile pass",
                                           registry=self.registry)

    @property
    def snapshot(self) -> AgentSnapshot:
        with self._lock:
            return self._snapshot

    def update(self, snapshot: AgentSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot


# ---- HTTP ------------------------------------------------------------------------------------------


def serve(host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    """/metrics, /healthz, /readyz on a daemon thread; returns the server (``.shutdown()`` it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ok = ready()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes are not worth a log line
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True).start()
    return server
