#!/usr/bin/env python3
"""Generate charts/wirekube/dashboards/wirekube.json (the Grafana dashboard).

Panels: the pair matrix (direct / relay / down per ordered node pair), transports over time,
failovers and their detection time, relay load (throughput, connections, drops), NAT types.
A test checks every metric a panel queries is one the agent or relay really exports.

    python3 ci/gen-dashboard.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from _generated import write_or_check  # ci/ is sys.path[0] when a generator runs

OUT = Path(__file__).resolve().parents[1] / "charts" / "wirekube" / "dashboards" / "wirekube.json"
DS = {"type": "prometheus", "uid": "${datasource}"}


def target(expr: str, legend: str = "", *, instant: bool = False, fmt: str = "time_series") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "instant": instant, "format": fmt, "refId": "A"}


def panel(pid: int, title: str, kind: str, grid: tuple[int, int, int, int], targets: list[dict[str, Any]],
          **extra: Any) -> dict[str, Any]:
    x, y, w, h = grid
    return {"id": pid, "title": title, "type": kind, "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "targets": [dict(t, refId=chr(65 + i)) for i, t in enumerate(targets)], **extra}


def dashboard() -> dict[str, Any]:
    matrix_expr = ('max by (node, peer) (wirekube_peer_transport_mode{mode="relay"})'
                   ' + 2 * (1 - max by (node, peer) (wirekube_peer_connected))')
    mappings = [{"type": "value", "options": {
        "0": {"text": "direct", "color": "green"}, "1": {"text": "relay", "color": "yellow"},
        "2": {"text": "down", "color": "red"}, "3": {"text": "down", "color": "red"}}}]
    panels = [
        panel(1, "Pair matrix (row: from node, column: to peer)", "table", (0, 0, 24, 10),
              [target(matrix_expr, instant=True, fmt="table")],
              transformations=[{"id": "groupingToMatrix",
                                "options": {"rowField": "node", "columnField": "peer", "valueField": "Value"}}],
              fieldConfig={"defaults": {"mappings": mappings, "custom": {"cellOptions": {"type": "color-background"}}},
                           "overrides": []}),
        panel(2, "Transports over time", "timeseries", (0, 10, 12, 8),
              [target("sum by (mode) (wirekube_peer_transport_mode)", "{{mode}}"),
               target("sum(1 - wirekube_peer_connected)", "down")]),
        panel(3, "Failovers (5m)", "timeseries", (12, 10, 12, 8),
              [target("sum by (node) (increase(wirekube_failovers_total[5m]))", "{{node}} failovers"),
               target("sum by (node) (increase(wirekube_direct_recoveries_total[5m]))", "{{node}} back to direct")]),
        panel(4, "Failover detection time (p50 / p99)", "timeseries", (0, 18, 12, 8),
              [target("histogram_quantile(0.5, sum by (le) (rate(wirekube_failover_detection_seconds_bucket[15m])))",
                      "p50"),
               target("histogram_quantile(0.99, sum by (le) (rate(wirekube_failover_detection_seconds_bucket[15m])))",
                      "p99")],
              fieldConfig={"defaults": {"unit": "s"}, "overrides": []}),
        panel(5, "Relay throughput", "timeseries", (12, 18, 12, 8),
              [target("sum by (pod) (rate(wirekube_relay_forwarded_bytes_total[1m])) * 8", "{{pod}}")],
              fieldConfig={"defaults": {"unit": "bps"}, "overrides": []}),
        panel(6, "Relay connections", "timeseries", (0, 26, 8, 8),
              [target('sum by (pod) (wirekube_relay_connections{state="registered"})', "{{pod}}"),
               target("sum(wirekube_agent_relay_connections)", "agents' warm connections")]),
        panel(7, "Relay drops by reason", "timeseries", (8, 26, 8, 8),
              [target("sum by (reason) (rate(wirekube_relay_dropped_frames_total[5m]))", "{{reason}}")]),
        panel(8, "Relay registrations by result", "timeseries", (16, 26, 8, 8),
              [target("sum by (result) (increase(wirekube_relay_registrations_total[5m]))", "{{result}}")]),
        panel(9, "NAT type per node", "table", (0, 34, 12, 8),
              [target("wirekube_node_nat_type == 1", instant=True, fmt="table")]),
        panel(10, "Relay proxy EPERM", "timeseries", (12, 34, 12, 8),
              [target("sum by (node) (increase(wirekube_agent_relay_proxy_eperm_total[5m]))", "{{node}} EPERM"),
               target("sum by (node) (increase(wirekube_agent_relay_proxy_eperm_recoveries_total[5m]))",
                      "{{node}} recovered")]),
    ]
    return {
        "title": "WireKube mesh", "uid": "wirekube-mesh", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["wirekube", "wireguard"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def main() -> int:
    return write_or_check(OUT, json.dumps(dashboard(), indent=2) + "\n", __doc__.split("\n\n")[0],
                          "ci/gen-dashboard.py")


if __name__ == "__main__":
    sys.exit(main())
