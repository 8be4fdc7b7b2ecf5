"""Prometheus metrics for the relay.

The hot path only bumps plain integers in :class:`~wirekube.relay.server.RelayStats`; a custom
collector turns them into metric families when Prometheus scrapes.  The exposition is served from
the relay's own event loop (a tiny HTTP/1.1 responder), so the collector never races the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wirekube.relay.server import ConnState, RelayServer

PREFIX: Final = "wirekube_relay_"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST_HEAD: Final = 8192
_REQUEST_TIMEOUT: Final = 5.0


class RelayCollector(Collector):
    def __init__(self, relay: RelayServer) -> None:
        self._relay = relay

    def collect(self) -> Iterator[Metric]:
        stats = self._relay.stats
        counts = self._relay.connection_counts()
        conns = GaugeMetricFamily(PREFIX + "connections", "Open client connections by state.", labels=["state"])
        for state in ConnState:
            if state is not ConnState.CLOSED:
                conns.add_metric([state.value], counts.get(state.value, 0))
        yield conns
        yield _counter("connections_accepted", "TCP connections accepted.", stats.connections_accepted)
        yield _labelled(
            "registrations", "Registration attempts by result (ok or the failure reason).", "result",
            stats.registrations,
        )
        yield _counter("forwarded_frames", "Data frames forwarded.", stats.frames_forwarded)
        yield _counter("forwarded_bytes", "Bytes of Data frames forwarded (wire size).", stats.bytes_forwarded)
        yield _labelled("dropped_frames", "Data frames dropped, by reason.", "reason", stats.frames_dropped)
        yield _labelled("dropped_bytes", "Bytes of Data frames dropped, by reason.", "reason", stats.bytes_dropped)
        yield _labelled("protocol_errors", "Connections closed for breaking the protocol.", "reason",
                        stats.protocol_errors)
        yield _labelled("disconnects", "Connections ended, by reason.", "reason", stats.disconnects)
        yield _labelled("nat_probes", "NATProbe requests by result.", "result", stats.nat_probes)
        yield _counter("relay_probes", "RelayProbe frames echoed.", stats.relay_probes)
        yield _counter("keepalives", "Keepalive frames received.", stats.keepalives)
        yield _counter("backpressure_holds", "Reads after which a sender feeding only congested peers was held.",
                       stats.backpressure_holds)
        yield _labelled("stun_requests", "STUN datagrams by result.", "result", stats.stun)
        yield GaugeMetricFamily(
            PREFIX + "pending_handshakes", "Connections between accept and Registered.",
            value=sum(self._relay.pending_by_ip.values()),
        )
        yield _counter("pending_refused", "Connections refused: their source address had too many handshakes pending.",
                       stats.pending_refused)
        yield _counter("goaways", "GoAway frames sent while draining.", stats.goaways)
        yield _counter("wss_accepted", "TCP connections accepted on the WebSocket-over-TLS listener.",
                       stats.wss_accepted)
        yield _labelled("wss_refused", "WebSocket connections closed for what the peer sent, by reason.", "reason",
                        stats.wss_refused)
        yield from _mesh_metrics(self._relay)
        yield GaugeMetricFamily(
            PREFIX + "queue_bytes", "Bytes waiting to be written to clients.", value=self._relay.queued_bytes()
        )
        yield GaugeMetricFamily(
            PREFIX + "queue_limit_bytes", "Per-connection cap on waiting bytes.",
            value=self._relay.settings.queue_limit_bytes,
        )


def _mesh_metrics(relay: RelayServer) -> Iterator[Metric]:
    from wirekube.relay.mesh import RelayMesh

    mesh = relay.mesh
    if not isinstance(mesh, RelayMesh):
        return
    yield GaugeMetricFamily(PREFIX + "mesh_links", "Mesh links up to other replicas.", value=len(mesh.links))
    yield GaugeMetricFamily(PREFIX + "mesh_remote_keys", "Keys this replica forwards to another replica.",
                            value=len(relay.remote_routes))
    yield _counter("mesh_auth_failures", "Mesh links refused for a wrong proof of the mesh secret.",
                   mesh.stats.auth_failures)
    yield _counter("mesh_evictions", "Registrations dropped because another replica holds a newer one "
                   "and their client fell silent.", mesh.stats.evictions)
    yield _counter("mesh_siblings_kept", "Registrations kept although another replica holds a newer one, "
                   "their client being alive (one key connected to two replicas).", mesh.stats.siblings_kept)
    yield _labelled("mesh_link_closes", "Mesh links ended, by reason.", "reason", mesh.stats.closed)
    frames = CounterMetricFamily(PREFIX + "mesh_frames", "Data frames over mesh links, per peer replica.",
                                 labels=["peer", "direction"])
    nbytes = CounterMetricFamily(PREFIX + "mesh_bytes", "Bytes of Data frames over mesh links, per peer replica.",
                                 labels=["peer", "direction"])
    drops = CounterMetricFamily(PREFIX + "mesh_dropped_frames", "Data frames dropped on a mesh link, per peer.",
                                labels=["peer", "reason"])
    keys = GaugeMetricFamily(PREFIX + "mesh_keys", "Keys each linked replica holds (learned over the mesh).",
                             labels=["peer"])
    for peer, link_stats in sorted(mesh.stats.per_peer.items()):
        frames.add_metric([peer, "out"], link_stats.frames_out)
        frames.add_metric([peer, "in"], link_stats.frames_in)
        nbytes.add_metric([peer, "out"], link_stats.bytes_out)
        nbytes.add_metric([peer, "in"], link_stats.bytes_in)
        for reason, count in sorted(link_stats.drops.items()):
            drops.add_metric([peer, reason], count)
    for row in mesh.replicas()[1:]:
        keys.add_metric([str(row["replica"])], float(str(row["keys"])))
    yield keys
    yield frames
    yield nbytes
    yield drops


def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def build_registry(relay: RelayServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Serve ``GET /metrics`` (and ``/healthz``) on ``host:port`` from this event loop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            status, body, ctype = _respond(head, registry)
            writer.write(_http_response(status, body, ctype))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST_HEAD, reuse_address=True)


def _respond(head: bytes, registry: CollectorRegistry) -> tuple[str, bytes, str]:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
        return "405 Method Not Allowed", b"only GET\n", "text/plain"
    path = parts[1].split(b"?", 1)[0]
    if path == b"/metrics":
        return "200 OK", exposition(registry), CONTENT_TYPE
    if path == b"/healthz":
        return "200 OK", b"ok\n", "text/plain"
    return "404 Not Found", b"not found\n", "text/plain"


def _http_response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def metric_value(text: str, name: str, labels: Iterable[tuple[str, str]] = ()) -> float | None:
    """A sample's value in an exposition text (for tests and the benchmark)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels)
    needle = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(needle + " "):
            return float(line.split()[-1])
    return None
