"""The CLI's settings, and the metrics/probe HTTP server."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from wirekube.gateway.main import build_parser, parse_listen, settings_from_args
from wirekube.gateway.metrics import ControllerMetrics, GatewaySummary, MetricsServer, Summary


def test_settings_from_the_command_line() -> None:
    args = build_parser().parse_args([
        "--kubeconfig", "/k", "--namespace", "wk", "--relay-service", "relay", "--metrics-listen", "127.0.0.1:9999",
        "--leader-elect", "--handover-timeout", "4", "--failback-delay", "12", "--log-format", "text",
    ])
    s = settings_from_args(args)
    assert (s.kubeconfig, s.metrics_host, s.metrics_port, s.log_format) == ("/k", "127.0.0.1", 9999, "text")
    c = s.controller
    assert (c.namespace, c.relay_service, c.leader_elect) == ("wk", "relay", True)
    assert (c.plan.handover_timeout, c.plan.failback_after) == (4.0, 12.0)


def test_defaults_match_the_chart() -> None:
    s = settings_from_args(build_parser().parse_args([]))
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 9090)
    assert s.controller.leader_elect is False and s.controller.relay_service == "wirekube-relay"


def test_bad_listen_address_and_lease_timings_are_refused() -> None:
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_listen("nope")
    assert parse_listen(":8080") == ("0.0.0.0", 8080) and parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(SystemExit, match="renew-deadline"):
        settings_from_args(build_parser().parse_args(["--lease-duration", "5", "--renew-deadline", "5"]))


def test_metrics_reflect_the_latest_summary() -> None:
    summary = Summary(leader=True, gateways={"vpc": GatewaySummary(
        active_peer="ec2-a", ready=True, routes=2, clients=3, peer_health={"ec2-a": "healthy", "ec2-b": "unknown"})},
        relay_endpoints=1)
    metrics = ControllerMetrics(lambda: summary)
    metrics.switches.labels("vpc", "Failover", "false").inc()
    text = metrics.exposition().decode()
    assert "wirekube_gateway_leader 1.0" in text
    assert 'wirekube_gateway_active_peer{gateway="vpc",peer="ec2-a"} 1.0' in text
    assert 'wirekube_gateway_peer_healthy{gateway="vpc",peer="ec2-b",state="unknown"} 0.0' in text
    assert 'wirekube_gateway_routes_injected{gateway="vpc"} 2.0' in text
    assert 'wirekube_gateway_switches_total{forced="false",gateway="vpc",kind="Failover"} 1.0' in text
    assert "wirekube_gateway_relay_endpoints 1.0" in text


def test_metrics_server_serves_metrics_and_probes() -> None:
    healthy = {"ok": True}
    server = MetricsServer("127.0.0.1", 0, ControllerMetrics(), lambda: healthy["ok"], lambda: False).start()
    try:
        base = "http://{}:{}".format(*server.address)
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            assert b"wirekube_gateway_leader 0.0" in r.read()
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert r.status == 200
        healthy["ok"] = False
        for path in ("/healthz", "/readyz", "/nothing"):
            with pytest.raises(urllib.error.HTTPError, match="HTTP Error 404: Not Found" if path == "/nothing"
                               else "HTTP Error 503: Service Unavailable") as err:
                urllib.request.urlopen(base + path, timeout=5)
            assert err.value.code in (503, 404)
    finally:
        server.stop()
