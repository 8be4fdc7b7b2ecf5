"""Prometheus metrics of the gateway controller, and the small HTTP server exposing them.

Gauges describing the current state come from a collector that reads the controller's latest
:class:`Summary` at scrape time (so a deleted gateway's series disappear with it); event counts
are ordinary counters.  ``/healthz`` answers 200 while the worker loop is alive, ``/readyz`` once
the informers have synced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "wirekube_gateway_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class GatewaySummary:
    active_peer: str = ""
    pending_peer: str = ""
    ready: bool = False
    routes: int = 0
    clients: int = 0
    rejected_routes: int = 0
    peer_health: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    leader: bool = False
    gateways: Mapping[str, GatewaySummary] = field(default_factory=dict)
    relay_endpoints: int = 0
    pod_cidrs_synced: int = 0
    pod_cidrs_refused: int = 0


class _StateCollector(Collector):
    def __init__(self, summary: Callable[[], Summary]) -> None:
        self._summary = summary

    def collect(self) -> Iterator[Metric]:
        s = self._summary()
        yield GaugeMetricFamily(PREFIX + "leader", "1 while this replica holds the leader Lease.", value=int(s.leader))
        ready = GaugeMetricFamily(PREFIX + "ready", "1 when the gateway is Ready.", labels=["gateway"])
        active = GaugeMetricFamily(PREFIX + "active_peer", "1 for the active peer of each gateway.",
                                   labels=["gateway", "peer"])
        pending = GaugeMetricFamily(PREFIX + "pending_peer", "1 for a peer being prepared to take over.",
                                    labels=["gateway", "peer"])
        health = GaugeMetricFamily(PREFIX + "peer_healthy", "1 when the controller judges a gateway peer healthy.",
                                   labels=["gateway", "peer", "state"])
        routes = GaugeMetricFamily(PREFIX + "routes_injected", "Routes injected for clients.", labels=["gateway"])
        rejected = GaugeMetricFamily(PREFIX + "routes_rejected", "Routes rejected by overlap checks.",
                                     labels=["gateway"])
        clients = GaugeMetricFamily(PREFIX + "clients", "Client peers routing through the gateway.", labels=["gateway"])
        for name, g in sorted(s.gateways.items()):
            ready.add_metric([name], int(g.ready))
            if g.active_peer:
                active.add_metric([name, g.active_peer], 1)
            if g.pending_peer:
                pending.add_metric([name, g.pending_peer], 1)
            for peer, state in sorted(g.peer_health.items()):
                health.add_metric([name, peer, state], int(state == "healthy"))
            routes.add_metric([name], g.routes)
            rejected.add_metric([name], g.rejected_routes)
            clients.add_metric([name], g.clients)
        yield from (ready, active, pending, health, routes, rejected, clients)
        yield GaugeMetricFamily(PREFIX + "relay_endpoints", "Relay endpoints published in the mesh status.",
                                value=s.relay_endpoints)
        yield GaugeMetricFamily(PREFIX + "pod_cidrs_synced", "Pod CIDRs synced into peers' AllowedIPs.",
                                value=s.pod_cidrs_synced)
        yield GaugeMetricFamily(PREFIX + "pod_cidrs_refused", "Pod CIDRs refused for overlaps.",
                                value=s.pod_cidrs_refused)


class ControllerMetrics:
    """One registry per controller (tests run several controllers in one process)."""

    def __init__(self, summary: Callable[[], Summary] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.switches = Counter(PREFIX + "switches", "Changes of active peer, by kind (GatewayActivated, "
                                "Failover, Failback) and whether forced.", ["gateway", "kind", "forced"],
                                registry=self.registry)
        self.writes = Counter(PREFIX + "api_writes", "Writes to the API server, by object kind.", ["kind"],
                              registry=self.registry)
        self.errors = Counter(PREFIX + "reconcile_errors", "Failed reconcile steps, by step.", ["step"],
                              registry=self.registry)
        self.duration = Histogram(PREFIX + "reconcile_duration_seconds", "Duration of a full reconcile pass.",
                                  registry=self.registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self._summary: Callable[[], Summary] = summary or Summary
        self.registry.register(_StateCollector(lambda: self._summary()))

    def bind(self, summary: Callable[[], Summary]) -> None:
        self._summary = summary

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background thread."""

    def __init__(
        self, host: str, port: int, metrics: ControllerMetrics, healthy: Callable[[], bool], ready: Callable[[], bool]
    ) -> None:
        handler = _handler(metrics, healthy, ready)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    metrics: ControllerMetrics, healthy: Callable[[], bool], ready: Callable[[], bool]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE)
            elif self.path == "/healthz":
                self._probe(healthy())
            elif self.path == "/readyz":
                self._probe(ready())
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _probe(self, ok: bool) -> None:
            self._reply(200 if ok else 503, b"ok\n" if ok else b"not ok\n", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler
