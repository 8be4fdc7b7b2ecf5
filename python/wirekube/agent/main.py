"""``wirekube-agent``: the node agent's command line.

    wirekube-agent --node-name NODE [--kubeconfig PATH | --peers-file PATH] [--state-dir DIR]
                   [--engine auto|kernel|userspace] [--log-format text|json] [--once [--dry-run]]

SIGTERM/SIGINT stop the loop and leave the dataplane in place (the interface, wireguard-go,
routes and rules keep carrying traffic); a new agent adopts them without a blackout.
``--once`` runs a single reconcile and prints the operations as JSON (``--dry-run``: plan only).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube.agent import keys as keystore
from wirekube.agent.gateway import GatewayAgent
from wirekube.agent.netlink import Netlink
from wirekube.agent.plan import HANDSHAKE_FRESH_SECONDS
from wirekube.agent.reconcile import Reconciler, ReconcilerSettings, Result, describe
from wirekube.agent.traversal import Traversal
from wirekube.agent.wg.userspace import SOCKET_DIR
from wirekube.errors import WireKubeError
from wirekube.metrics import AgentMetrics, AgentSnapshot, PeerSample, serve
from wirekube.models import Engine, IPAddress, PeerStatus, Transport, key_fingerprint


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent is told at start; built once in :func:`main`."""

    node_name: str
    state_dir: Path = keystore.DEFAULT_STATE_DIR
    kubeconfig: str | None = None
    """None: in-cluster config (or $KUBECONFIG)."""
    api_server: str | None = None
    """https://host:port override for nodes that cannot reach the Service ClusterIP."""
    peers_file: Path | None = None
    """Static source instead of the API server."""
    engine: Engine = Engine.AUTO
    api_server_ips: tuple[IPAddress, ...] = ()
    """Extra addresses kept in the main table (the API server's is added automatically)."""
    resync_seconds: float = 30.0
    log_format: str = "text"
    log_level: str = "INFO"
    wireguard_go: str = "wireguard-go"
    socket_dir: Path = SOCKET_DIR
    once: bool = False
    dry_run: bool = False
    metrics_listen: str = ""
    """host:port (or :port) for /metrics, /healthz, /readyz; empty = off."""
    traversal: bool = True
    """STUN, NAT type, relay fallback and failover (API-server source only)."""


def parse_args(argv: list[str] | None = None) -> AgentSettings:
    p = argparse.ArgumentParser(prog="wirekube-agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node's name (env NODE_NAME)")
    p.add_argument("--state-dir", type=Path, default=keystore.DEFAULT_STATE_DIR)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--kubeconfig", default=None)
    source.add_argument("--peers-file", type=Path, default=None, help="static YAML with 'mesh' and 'peers'")
    p.add_argument("--api-server", default=os.environ.get("WIREKUBE_API_SERVER"), help="https://host:port override")
    p.add_argument("--engine", choices=[e.value for e in Engine], default=Engine.AUTO.value)
    p.add_argument("--api-server-ip", action="append", default=[], help="extra address bypassing the mesh")
    p.add_argument("--resync-seconds", type=float, default=30.0)
    p.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("WIREKUBE_LOG_FORMAT", "text"))
    p.add_argument("--log-level", default=os.environ.get("WIREKUBE_LOG_LEVEL", "INFO"))
    p.add_argument("--wireguard-go", default="wireguard-go")
    p.add_argument("--socket-dir", type=Path, default=SOCKET_DIR, help=argparse.SUPPRESS)
    p.add_argument("--once", action="store_true", help="reconcile once, print the operations as JSON, exit")
    p.add_argument("--dry-run", action="store_true", help="with --once: plan only, change nothing")
    p.add_argument("--metrics-listen", default=os.environ.get("WIREKUBE_METRICS_LISTEN", ""),
                   help="host:port or :port for /metrics, /healthz and /readyz (default off)")
    p.add_argument("--no-traversal", action="store_true",
                   help="no STUN/relay/failover: every peer direct at its published endpoint")
    a = p.parse_args(argv)
    if not a.node_name:
        p.error("--node-name (or NODE_NAME) is required")
    return AgentSettings(
        node_name=a.node_name,
        state_dir=a.state_dir,
        kubeconfig=a.kubeconfig,
        api_server=a.api_server,
        peers_file=a.peers_file,
        engine=Engine(a.engine),
        api_server_ips=tuple(ipaddress.ip_address(x) for x in a.api_server_ip),
        resync_seconds=a.resync_seconds,
        log_format=a.log_format,
        log_level=a.log_level.upper(),
        wireguard_go=a.wireguard_go,
        socket_dir=a.socket_dir,
        once=a.once,
        dry_run=a.dry_run,
        metrics_listen=a.metrics_listen,
        traversal=not a.no_traversal,
    )


def configure_logging(settings: AgentSettings) -> None:
    logger.remove()
    logger.add(sys.stderr, level=settings.log_level, serialize=settings.log_format == "json", backtrace=False)
    logger.configure(extra={"node": settings.node_name})


def resolve_host(url: str) -> tuple[IPAddress, ...]:
    """The addresses of the API server URL's host (for the main-table bypass rule)."""
    host = urlparse(url).hostname or ""
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        logger.warning("cannot resolve API server host {!r}; no bypass rule", host)
        return ()
    return tuple(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    configure_logging(settings)
    try:
        return run(settings)
    except WireKubeError as e:
        logger.error("agent failed: {}", e)
        return 1


def run(settings: AgentSettings) -> int:
    keys = keystore.load_or_create(settings.state_dir)
    logger.info("node key {} (state {})", key_fingerprint(keys.public_key), settings.state_dir)
    stop = threading.Event()
    netlink = Netlink()
    reconciler: Reconciler | None = None
    wake = lambda: reconciler.wake.set() if reconciler else None  # noqa: E731
    metrics = AgentMetrics(settings.node_name)
    traversal = None
    if settings.traversal and settings.peers_file is None and not settings.once:
        traversal = Traversal(
            settings.node_name,
            X25519PrivateKey.from_private_bytes(keys.private_bytes),
            keys.public_key,
            engine_state=lambda: reconciler.engine.get() if reconciler and reconciler.engine else None,
            wake=wake,
            on_failover=lambda peer, seconds: _count_failover(metrics, peer, seconds),
            on_transition=lambda peer, old, new, reason: _transport_event(source, settings.node_name, peer, old,
                                                                          new, reason, metrics),
        )
    ready = threading.Event()
    source, api_ips = _make_source(settings, wake, traversal)
    reconciler = Reconciler(
        ReconcilerSettings(
            node_name=settings.node_name,
            engine=settings.engine,
            api_server_ips=tuple(dict.fromkeys((*api_ips, *settings.api_server_ips))),
            resync_seconds=settings.resync_seconds,
            wireguard_go=settings.wireguard_go,
            socket_dir=settings.socket_dir,
            wireguard_go_log=settings.state_dir / "wireguard-go.log",
        ),
        keys,
        source,
        netlink,
        paths=traversal.paths if traversal else dict,
        on_snapshot=(lambda snap, facts: traversal.update_view(
            snap.mesh, snap.peers, tuple(str(a) for a in facts.addresses))) if traversal else None,
        decorate_status=lambda status: _decorate(status, traversal, reconciler, metrics, ready),
    )
    server = None
    if settings.metrics_listen:
        host, _, port = settings.metrics_listen.rpartition(":")
        server = serve(host or "0.0.0.0", int(port), metrics.registry, ready.is_set)
    if traversal is not None:
        traversal.start()
    gateway_agent = _gateway_agent(settings, source, metrics_resync=settings.resync_seconds)
    try:
        if settings.once:
            return _once(reconciler, source, settings.dry_run)
        _install_signal_handlers(stop)
        logger.info("agent started (engine {}, resync {}s)", settings.engine.value, settings.resync_seconds)
        reconciler.run(stop)
        logger.info("agent stopping; dataplane left in place")
        return 0
    finally:
        if gateway_agent is not None:
            gateway_agent.stop()
        if traversal is not None:
            traversal.stop()
        if server is not None:
            server.shutdown()
        reconciler.close()
        source.stop()
        netlink.close()


def _gateway_agent(settings: AgentSettings, source: object, metrics_resync: float) -> GatewayAgent | None:
    """Health checks and forwarding for WireKubeGateways naming this node (API-server source only)."""
    from wirekube.agent.source import KubeSource

    if settings.once or not isinstance(source, KubeSource):
        return None
    agent = GatewayAgent(source.kube, settings.node_name, lambda: source.gateways.cache.values(),
                         source.interface_name, synced=source.gateways.wait_synced,
                         resync_seconds=min(5.0, metrics_resync))
    source.on_gateway_change = agent.wake.set
    return agent.start()


def _transport_event(source: object, node: str, peer: str, old: str, new: str, reason: str,
                     metrics: AgentMetrics) -> None:
    """A Kubernetes Event on this node's WireKubePeer for every transport change toward a peer."""
    if new == "direct" and old == "relay":
        metrics.recoveries.labels(peer=peer).inc()
    kube = getattr(source, "kube", None)
    if kube is None:
        return
    note = f"{node} -> {peer}: {old} -> {new}" + (f" ({reason})" if reason and new == "relay" else "")
    kube.emit_event({"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer", "metadata": {"name": node}},
                    "TransportChanged", note, type_="Warning" if new == "relay" and old == "direct" else "Normal",
                    component="agent")


def _count_failover(metrics: AgentMetrics, peer: str, seconds: float) -> None:
    metrics.failovers.labels(peer=peer).inc()
    metrics.failover_detect.observe(seconds)


def _decorate(
    status: PeerStatus,
    traversal: Traversal | None,
    reconciler: Reconciler | None,
    metrics: AgentMetrics,
    ready: threading.Event,
) -> PeerStatus:
    """Add traversal's view to the published status and refresh the metrics snapshot."""
    if traversal is not None:
        status = traversal.decorate(status)
    engine = reconciler.engine if reconciler else None
    wg = engine.get() if engine is not None else None
    names = {}
    source = reconciler.source if reconciler else None
    snap = source.snapshot() if source is not None else None
    if snap is not None:
        names = {p.spec.public_key: p.name for p in snap.peers}
    peers = {}
    if wg is not None:
        now = time.time()
        for key, ws in wg.peers.items():
            name = names.get(key)
            if name is None:
                continue
            transport = status.peer_transports.get(name, Transport.DIRECT)
            peers[name] = PeerSample(
                connected=ws.last_handshake > 0 and now - ws.last_handshake < HANDSHAKE_FRESH_SECONDS,
                transport=transport.value,
                last_handshake=ws.last_handshake,
                rx_bytes=ws.rx_bytes,
                tx_bytes=ws.tx_bytes,
                relay_reason=status.relay_reasons.get(name, ""),
            )
    relay = traversal.relay_stats() if traversal is not None else {}
    metrics.update(AgentSnapshot(node=metrics.snapshot.node, nat_type=status.nat_type.value,
                                 engine=type(engine).__name__ if engine else "", peers=peers,
                                 relay_connections=int(relay.get("relay_connections", 0))))
    ready.set()
    return status


def _make_source(settings: AgentSettings, wake: object, traversal: Traversal | None = None) -> tuple[object, tuple[IPAddress, ...]]:
    from wirekube.agent.source import FileSource, KubeSource

    if settings.peers_file is not None:
        return FileSource(settings.peers_file, on_change=wake).start(), ()  # type: ignore[arg-type]
    from wirekube import k8s

    if settings.api_server and not settings.kubeconfig:
        kube = k8s.Kube.auto(None, host_override=settings.api_server)
    else:
        kube = k8s.Kube.auto(settings.kubeconfig)
    discovered = (lambda: (traversal.discovery().endpoint, traversal.discovery().method)) if traversal else (
        lambda: (None, None))
    source = KubeSource(kube, settings.node_name, on_change=wake, discovered=discovered).start()  # type: ignore[arg-type]
    return source, resolve_host(kube.host)


def _once(reconciler: Reconciler, source: object, dry_run: bool) -> int:
    synced = getattr(source, "peers", None)
    if synced is not None:
        synced.wait_synced(30)
        source.meshes.wait_synced(30)  # type: ignore[attr-defined]
    result = reconciler.reconcile_once(dry_run=dry_run)
    print(json.dumps(_result_json(result)))
    return 0 if result is not None else 2


def _result_json(result: Result | None) -> dict[str, object]:
    if result is None:
        return {"synced": False, "ops": None}
    return {
        "synced": True,
        "ops": len(result.ops),
        "operations": [describe(op) for op in result.ops],
        "skipped": [{"peer": s.peer, "reason": s.reason} for s in result.desired.skipped],
    }


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        logger.info("received {}", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


if __name__ == "__main__":
    sys.exit(main())
