from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from wirekube.metrics import AgentMetrics, AgentSnapshot, PeerSample, serve


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_snapshot_metrics_and_health_endpoints() -> None:
    m = AgentMetrics("node-a")
    ready = {"ok": False}
    server = serve("127.0.0.1", 0, m.registry, lambda: ready["ok"])
    port = server.server_address[1]
    try:
        m.update(AgentSnapshot(node="node-a", nat_type="symmetric", engine="userspace", relay_connections=2,
                               refused_routes={"evil": 2},
                               peers={"b": PeerSample(True, "direct", 1_700_000_000.0, 1000, 2000, 0.004),
                                      "c": PeerSample(False, "relay", 0.0, 10, 20, relay_reason="udp blocked")}))
        m.failovers.labels(peer="b").inc()
        m.failover_detect.observe(1.4)
        status, text = scrape(port)
        assert status == 200
        for line in (
            'wirekube_peer_connected{node="node-a",peer="b"} 1.0',
            'wirekube_peer_connected{node="node-a",peer="c"} 0.0',
            'wirekube_peer_transport_mode{mode="relay",node="node-a",peer="c"} 1.0',
            'wirekube_peer_bytes_received_total{node="node-a",peer="b"} 1000.0',
            'wirekube_peer_last_handshake_seconds{node="node-a",peer="b"} 1.7e+09',
            'wirekube_node_nat_type{node="node-a",type="symmetric"} 1.0',
            "wirekube_relayed_peers_total 1.0",
            'wirekube_route_claims_refused{peer="evil"} 2.0',
            "wirekube_direct_peers_total 1.0",
            'wirekube_failovers_total{peer="b"} 1.0',
            "wirekube_agent_relay_connections 2.0",
        ):
            assert line in text, line
        # A peer that is gone vanishes from the next scrape.
        m.update(AgentSnapshot(node="node-a", peers={}))
        assert 'peer="c"' not in scrape(port)[1].split("wirekube_failovers")[0]
        assert scrape(port, "/healthz") == (200, "ok\n")
        assert scrape(port, "/readyz")[0] == 503
        ready["ok"] = True
        assert scrape(port, "/readyz") == (200, "ok\n")
        assert scrape(port, "/nope")[0] == 404
    finally:
        server.shutdown()


@pytest.mark.parametrize("nat", ["", "open"])
def test_unknown_nat_type_is_labelled(nat: str) -> None:
    from prometheus_client import generate_latest

    m = AgentMetrics("n")
    m.update(AgentSnapshot(node="n", nat_type=nat))
    text = generate_latest(m.registry).decode()
    assert f'wirekube_node_nat_type{{node="n",type="{nat or "unknown"}"}} 1.0' in text
