"""The Grafana dashboard is generated, and queries only metrics that are really exported."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from wirekube.metrics import AgentMetrics, AgentSnapshot, PeerSample

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "wirekube" / "dashboards" / "wirekube.json"


def exported_names() -> set[str]:
    m = AgentMetrics("n")
    m.update(AgentSnapshot(node="n", peers={"p": PeerSample(True, "direct", 1.0, 1, 1, 0.1)}))
    m.failovers.labels(peer="p").inc()
    m.recoveries.labels(peer="p").inc()
    m.failover_detect.observe(1.0)
    m.eperm.inc()
    m.eperm_recoveries.inc()
    names = {ln.split("{")[0].split(" ")[0] for ln in generate_latest(m.registry).decode().splitlines()
             if ln and not ln.startswith("#")}
    relay_src = (ROOT / "python" / "wirekube" / "relay" / "metrics.py").read_text()
    gauges = re.findall(r'PREFIX \+ "(\w+)"', relay_src)
    counters = re.findall(r'_(?:counter|labelled)\(\s*"(\w+)"', relay_src)
    names |= {f"wirekube_relay_{g}" for g in gauges} | {f"wirekube_relay_{c}_total" for c in counters}
    return names


def test_dashboard_is_generated() -> None:
    subprocess.run([sys.executable, str(ROOT / "ci" / "gen-dashboard.py"), "--check"], check=True)


def test_every_queried_metric_exists() -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    queried = {n for e in exprs for n in re.findall(r"wirekube_[a-z_]+", e)}
    missing = queried - exported_names()
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for needed in ("pair matrix", "transports", "failover", "relay"):
        assert needed in titles
