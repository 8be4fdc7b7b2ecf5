"""``wirekube-agent``: the node agent's command line.

    wirekube-agent --node-name NODE [--kubeconfig PATH | --peers-file PATH] [--state-dir DIR]
                   [--engine auto|kernel|userspace] [--log-format text|json] [--once [--dry-run]]
                   [--imds-url URL | --no-imds]

SIGTERM/SIGINT stop the loop and leave the dataplane in place (the interface, wireguard-go,
routes and rules keep carrying traffic); a new agent adopts them without a blackout.
``--once`` runs a single reconcile and prints the operations as JSON (``--dry-run``: plan only).
It runs no NAT traversal, so it plans what the running loop would keep: the traversal keepalive
on every peer (1 s unless relay.mode is never), relayed peers left on the relay proxy they use,
LAN endpoints left in place, and the endpoint STUN published carried over (:func:`once_paths`).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loguru import logger

from wirekube import logsetup
from wirekube.agent import imds as imdsmod
from wirekube.agent import keys as keystore
from wirekube.agent import relayproc
from wirekube.agent.gateway import GatewayAgent
from wirekube.agent.netlink import Netlink
from wirekube.agent.plan import HANDSHAKE_FRESH_SECONDS, PeerPath
from wirekube.agent.pmtu import PathMtu, Target, targets_from
from wirekube.agent.reconcile import Reconciler, ReconcilerSettings, Result, describe
from wirekube.agent.registration import first_discovered
from wirekube.agent.relayproc import PathConfig, RelayDatapath, RelayProcessMode, RemoteRelayPath
from wirekube.agent.traversal import DIRECT_KEEPALIVE, RELAY_KEEPALIVE, Traversal
from wirekube.agent.wg.base import PutPeer, WgDeviceState, WgPeerConfig
from wirekube.agent.wg.select import describe_engine
from wirekube.agent.wg.userspace import SOCKET_DIR
from wirekube.authority import Guarded, named_hosts
from wirekube.entrypoint import console_script
from wirekube.errors import WireKubeError
from wirekube.metrics import AgentMetrics, AgentSnapshot, PeerSample, serve
from wirekube.models import (
    Endpoint,
    EndpointDiscovery,
    Engine,
    IPAddress,
    Mesh,
    NatType,
    Peer,
    PeerStatus,
    RelayMode,
    Transport,
    key_fingerprint,
)
from wirekube.relay.dial import ProxyConfig


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
    imds_url: str = imdsmod.DEFAULT_URL
    """AWS instance metadata base URL (endpoint discovery); empty = IMDS discovery off."""
    relay_proxy: ProxyConfig = ProxyConfig()
    """HTTP CONNECT proxy for relay connections (``HTTPS_PROXY``/``NO_PROXY``, credentials from
    ``--relay-proxy-credentials-file``)."""
    relay_ca_file: str | None = None
    """CA bundle a ``wss://`` relay's certificate must chain to (``None``: the system's)."""
    relay_process: RelayProcessMode = RelayProcessMode.SPAWN
    """Where relayed packets are carried (see :mod:`wirekube.agent.relayproc`): a process that
    outlives the agent, started by it (spawn) or by somebody else (external), or the agent itself."""


def parse_args(argv: list[str] | None = None) -> AgentSettings:
    p = _parser()
    a = p.parse_args(argv)
    if not a.node_name:
        p.error("--node-name (or NODE_NAME) is required")
    try:
        relay_proxy = relay_proxy_config(os.environ, a.relay_proxy_credentials_file)
    except ValueError as e:
        p.error(str(e))
    if a.relay_ca_file is not None and not os.access(a.relay_ca_file, os.R_OK):
        p.error(f"--relay-ca-file {a.relay_ca_file}: cannot be read")
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
        imds_url="" if a.no_imds else a.imds_url,
        relay_proxy=relay_proxy,
        relay_ca_file=a.relay_ca_file,
        relay_process=RelayProcessMode(a.relay_process),
    )


def _parser() -> argparse.ArgumentParser:
    """The agent's flags (defaults from the environment where one is named)."""
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
    _add_reachability_args(p)
    return p


def _add_reachability_args(p: argparse.ArgumentParser) -> None:
    """How this node is found and reached: traversal, IMDS discovery and the relay connections."""
    p.add_argument("--no-traversal", action="store_true",
                   help="no STUN/relay/failover: every peer direct at its published endpoint")
    p.add_argument("--imds-url", default=os.environ.get(imdsmod.ENV_URL) or imdsmod.DEFAULT_URL,
                   help=f"AWS IMDSv2 base URL for the public IPv4 (env {imdsmod.ENV_URL})")
    p.add_argument("--no-imds", action="store_true",
                   default=imdsmod.switched_off(os.environ.get(imdsmod.ENV_SWITCH)),
                   help=f"no AWS IMDS endpoint discovery (env {imdsmod.ENV_SWITCH}=off)")
    p.add_argument("--relay-ca-file", default=os.environ.get("WIREKUBE_RELAY_CA_FILE") or None, metavar="PATH",
                   help="CA bundle (PEM) for a wss:// relay's certificate (env WIREKUBE_RELAY_CA_FILE; "
                        "default: the system's)")
    p.add_argument("--relay-proxy-credentials-file", metavar="PATH",
                   default=os.environ.get("WIREKUBE_RELAY_PROXY_CREDENTIALS_FILE") or None,
                   help="user:password for the HTTPS_PROXY proxy (Basic auth), e.g. from a Secret "
                        "(env WIREKUBE_RELAY_PROXY_CREDENTIALS_FILE)")
    p.add_argument("--relay-process", choices=[m.value for m in RelayProcessMode],
                   default=os.environ.get("WIREKUBE_RELAY_PROCESS", RelayProcessMode.SPAWN.value),
                   help="where relayed packets are carried: a process of their own that outlives the agent, "
                        "started by the agent (spawn, default) or run beside it (external: the chart's "
                        "relaypath container), or inside the agent (inprocess) (env WIREKUBE_RELAY_PROCESS)")


def _relay_datapath(settings: AgentSettings) -> Callable[[PathConfig], RelayDatapath] | None:
    """The relay-path process of this node (None: in the agent).  Its socket is beside
    wireguard-go's, on a tmpfs; its log goes to the state directory."""
    if settings.relay_process is RelayProcessMode.INPROCESS:
        return None
    path = relayproc.socket_path(settings.socket_dir)
    spawn = (relayproc.spawner(path, settings.state_dir / "relaypath.log", settings.log_level)
             if settings.relay_process is RelayProcessMode.SPAWN else None)
    return lambda config: RemoteRelayPath(path, config, spawn=spawn)


def relay_proxy_config(env: Mapping[str, str], credentials_file: str | None) -> ProxyConfig:
    """The relay connections' proxy: ``HTTPS_PROXY``/``NO_PROXY``, with the credentials file's
    ``user:password`` in place of any in the URL.  ValueError (one line, no secret in it)."""
    config = ProxyConfig.from_env(env)
    if credentials_file is None:
        return config
    if config.proxy is None:
        raise ValueError("--relay-proxy-credentials-file needs HTTPS_PROXY")
    try:
        with open(credentials_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"--relay-proxy-credentials-file {credentials_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--relay-proxy-credentials-file {credentials_file}: not UTF-8 text") from None
    try:
        return replace(config, proxy=config.proxy.with_credentials(text))
    except ValueError as e:
        raise ValueError(f"--relay-proxy-credentials-file {credentials_file}: {e}") from None


def configure_logging(settings: AgentSettings) -> None:
    logsetup.configure_logging(settings.log_format, settings.log_level, node=settings.node_name)


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


def _addresses_of(host: str) -> tuple[IPAddress, ...]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as e:
        logger.warning("cannot resolve {} to guard its addresses: {}", host, e)
        return ()
    return tuple(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))


class NamedHostGuard:
    """The addresses of the relay and STUN hosts the mesh names by DNS name (an NLB's name, say),
    for the never-routed set (``wirekube.authority``); each name is looked up again every
    ``ttl`` seconds, and a failed lookup keeps the last answer."""

    def __init__(self, ttl: float = 300.0, resolve: Callable[[str], tuple[IPAddress, ...]] | None = None) -> None:
        self.ttl = ttl
        self._resolve = resolve or _addresses_of
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...]]] = {}

    def __call__(self, mesh: Mesh) -> tuple[Guarded, ...]:
        now = time.monotonic()
        out: list[Guarded] = []
        for host, what in named_hosts(mesh):
            at, addrs = self._cache.get(host, (float("-inf"), ()))
            if now - at >= self.ttl:
                addrs = self._resolve(host) or addrs
                self._cache[host] = (now, addrs)
            out.extend(Guarded(a, what) for a in addrs)
        return tuple(out)


@console_script("wirekube-agent")
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
    parts = _Parts(settings, keys)
    parts.traversal = parts.make_traversal()
    parts.imds = _imds(settings, parts.wake)
    parts.source, api_ips = _make_source(settings, parts.wake, parts.traversal, parts.imds)
    reconciler = parts.make_reconciler(netlink, api_ips)
    server = None
    if settings.metrics_listen:
        host, _, port = settings.metrics_listen.rpartition(":")
        server = serve(host or "0.0.0.0", int(port), parts.metrics.registry, parts.ready.is_set)  # noqa: S104 - ':PORT' means every address
    parts.start()
    gateway_agent = _gateway_agent(settings, parts.source, metrics_resync=settings.resync_seconds)
    try:
        if settings.once:
            if parts.imds is not None and not settings.dry_run:
                parts.imds.refresh_if_due()  # one lookup, before registering (a one-shot may wait ~1 s)
            return _once(reconciler, parts.source, settings.dry_run)
        _install_signal_handlers(stop)
        logger.info("agent started (engine {}, resync {}s)", settings.engine.value, settings.resync_seconds)
        reconciler.run(stop)
        logger.info("agent stopping; dataplane left in place")
        return 0
    finally:
        if gateway_agent is not None:
            gateway_agent.stop()
        parts.stop()
        if server is not None:
            server.shutdown()
        reconciler.close()
        parts.source.stop()
        netlink.close()


class _Parts:
    """The running agent's parts and their wiring.  Traversal, path MTU and the reconciler call
    into each other (and into the source) through this object, whose attributes are filled in as
    the parts are built; every callback reads them when it runs."""

    def __init__(self, settings: AgentSettings, keys: keystore.KeyPair) -> None:
        self.settings = settings
        self.keys = keys
        self.metrics = AgentMetrics(settings.node_name)
        self.ready = threading.Event()
        """Set once the first status was decorated (/readyz)."""
        self.reconciler: Reconciler | None = None
        self.source: Any = None
        self.traversal: Traversal | None = None
        self.pathmtu: PathMtu | None = None
        self.imds: imdsmod.ImdsDiscovery | None = None

    def wake(self) -> None:
        if self.reconciler:
            self.reconciler.wake.set()

    def make_traversal(self) -> Traversal | None:
        """NAT traversal (STUN, relay, failover): API-server source only, not for ``--once``."""
        settings, keys, metrics = self.settings, self.keys, self.metrics
        if not settings.traversal or settings.peers_file is not None or settings.once:
            return None
        return Traversal(
            settings.node_name,
            X25519PrivateKey.from_private_bytes(keys.private_bytes),
            keys.public_key,
            engine_state=lambda: self.reconciler.engine.get() if self.reconciler and self.reconciler.engine else None,
            wake=self.wake,
            on_failover=lambda peer, seconds: _count_failover(metrics, peer, seconds),
            on_transition=lambda peer, old, new, reason: _transport_event(self.source, settings.node_name, peer, old,
                                                                          new, reason, metrics),
            relay_proxy=settings.relay_proxy,
            relay_ca_file=settings.relay_ca_file,
            fast_switch=lambda key, endpoint: _fast_switch(self.reconciler, keys.private_key, key, endpoint),
            relay_datapath=_relay_datapath(settings),
        )

    def make_paths(self) -> Callable[[], Mapping[str, PeerPath]]:
        """The per-peer path overrides the planner gets: traversal's, or for ``--once`` what the
        running loop keeps; wrapped by path MTU (spec.mtu auto, issue 18) outside ``--once``."""
        settings, traversal = self.settings, self.traversal
        paths: Callable[[], Mapping[str, PeerPath]] = dict
        if traversal is not None:
            paths = traversal.paths
        elif settings.once and settings.traversal and settings.peers_file is None:
            # --once runs no traversal: plan what the running loop keeps (see once_paths).
            paths = lambda: _once_paths_now(self.reconciler, self.source, settings.node_name)  # noqa: E731
        if settings.once:
            return paths
        # path MTU (spec.mtu auto, issue 18): measured per direct peer, on its routes
        inner_paths = paths
        self.pathmtu = PathMtu(lambda: self._mtu_targets(inner_paths), self.wake, ifname=self._ifname)
        return self.pathmtu.wrap(inner_paths)

    def _mtu_targets(self, paths: Callable[[], Mapping[str, PeerPath]]) -> dict[str, Target] | None:
        reconciler, traversal = self.reconciler, self.traversal
        if not reconciler:
            return {}
        return targets_from(reconciler.source.snapshot(), reconciler.engine.get() if reconciler.engine else None,
                            paths(), self.settings.node_name,
                            active=traversal.active if traversal is not None else None)

    def _ifname(self) -> str | None:
        snap = self.reconciler.source.snapshot() if self.reconciler else None
        return snap.mesh.spec.interface_name if snap else None

    def make_reconciler(self, netlink: Netlink, api_ips: tuple[IPAddress, ...]) -> Reconciler:
        settings, traversal = self.settings, self.traversal
        paths = self.make_paths()
        requested_by = "spec.engine" if settings.engine is Engine.AUTO else "--engine"
        self.reconciler = Reconciler(
            ReconcilerSettings(
                node_name=settings.node_name,
                engine=settings.engine,
                api_server_ips=tuple(dict.fromkeys((*api_ips, *settings.api_server_ips))),
                resync_seconds=settings.resync_seconds,
                wireguard_go=settings.wireguard_go,
                socket_dir=settings.socket_dir,
                wireguard_go_log=settings.state_dir / "wireguard-go.log",
            ),
            self.keys,
            self.source,
            netlink,
            paths=paths,
            on_snapshot=(lambda snap, facts: traversal.update_view(
                snap.mesh, snap.peers, tuple(str(a) for a in facts.addresses))) if traversal else None,
            decorate_status=lambda status: _decorate(self.pathmtu.decorate(status) if self.pathmtu else status,
                                                     traversal, self.reconciler, self.metrics, self.ready,
                                                     requested_by),
            guarded=NamedHostGuard(),
        )
        return self.reconciler

    def start(self) -> None:
        if self.traversal is not None:
            self.traversal.start()
        if self.pathmtu is not None:
            self.pathmtu.start()
        if self.imds is not None and not self.settings.once:
            self.imds.start()

    def stop(self) -> None:
        if self.traversal is not None:
            self.traversal.stop()
        if self.pathmtu is not None:
            self.pathmtu.stop()
        if self.imds is not None:
            self.imds.stop()


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


def _fast_switch(reconciler: Reconciler | None, private_key: str, key: str, endpoint: Endpoint) -> None:
    """Point one WireGuard peer at ``endpoint`` now (the failover's only write; see Traversal)."""
    if reconciler is None or reconciler.engine is None:
        return
    config = WgPeerConfig(key, endpoint, ())
    reconciler.engine.apply([PutPeer(config, create=False, set_allowed_ips=False, set_keepalive=False)], private_key)


def _count_failover(metrics: AgentMetrics, peer: str, seconds: float) -> None:
    metrics.failovers.labels(peer=peer).inc()
    metrics.failover_detect.observe(seconds)


def _decorate(
    status: PeerStatus,
    traversal: Traversal | None,
    reconciler: Reconciler | None,
    metrics: AgentMetrics,
    ready: threading.Event,
    requested_by: str = "spec.engine",
) -> PeerStatus:
    """Add traversal's view and the engine (and why) to the published status, and refresh the
    metrics snapshot."""
    if traversal is not None:
        status = traversal.decorate(status)
    engine = reconciler.engine if reconciler else None
    if engine is not None:
        status = replace(status, engine=describe_engine(engine, requested_by))
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
    refused: dict[str, int] = {}
    for r in reconciler.refusals if reconciler else ():
        refused[r.peer] = refused.get(r.peer, 0) + 1
    metrics.update(AgentSnapshot(node=metrics.snapshot.node, nat_type=status.nat_type.value,
                                 engine=type(engine).__name__ if engine else "", peers=peers,
                                 relay_connections=int(relay.get("relay_connections", 0)),
                                 refused_routes=refused))
    ready.set()
    return status


def _imds(settings: AgentSettings, wake: Callable[[], object]) -> imdsmod.ImdsDiscovery | None:
    """AWS IMDSv2 discovery of the public IPv4 (API-server source only, unless turned off)."""
    if settings.peers_file is not None or not settings.imds_url:
        return None
    return imdsmod.ImdsDiscovery(settings.imds_url, on_change=lambda: wake())


def _make_source(settings: AgentSettings, wake: object, traversal: Traversal | None = None,
                 imds: imdsmod.ImdsDiscovery | None = None) -> tuple[Any, tuple[IPAddress, ...]]:
    from wirekube.agent.source import FileSource, KubeSource

    if settings.peers_file is not None:
        return FileSource(settings.peers_file, on_change=wake).start(), ()  # type: ignore[arg-type]
    from wirekube import k8s

    if settings.api_server and not settings.kubeconfig:
        kube = k8s.Kube.auto(None, host_override=settings.api_server)
    else:
        kube = k8s.Kube.auto(settings.kubeconfig)

    def stun() -> tuple[Endpoint | None, EndpointDiscovery | None]:
        if traversal is not None:
            d = traversal.discovery()
            return sticky_symmetric_endpoint(d.endpoint, d.nat.nat_type, source.peers.cache.get(settings.node_name)), \
                d.method
        if settings.once and settings.traversal:
            return carried_stun_endpoint(source.snapshot(), settings.node_name)
        return None, None

    def discovered() -> tuple[Endpoint | None, EndpointDiscovery | None]:
        """annotation (in registration) > STUN > IMDS > ExternalIP > InternalIP (in registration)."""
        return first_discovered(stun(), imds.current() if imds is not None else (None, None))

    source = KubeSource(kube, settings.node_name, on_change=wake, discovered=discovered).start()  # type: ignore[arg-type]
    return source, resolve_host(kube.host)


def sticky_symmetric_endpoint(found: Endpoint | None, nat_type: NatType,
                              own: Mapping[str, Any] | None) -> Endpoint | None:
    """Behind a symmetric NAT every STUN round maps a new port, and no peer can use that port
    (its own flow gets yet another one): keep the published endpoint while only the port moved,
    so discovery rounds do not rewrite the WireKubePeer every agent watches (issue 20)."""
    if found is None or nat_type is not NatType.SYMMETRIC or own is None:
        return found
    text = (own.get("spec") or {}).get("endpoint")
    try:
        published = Endpoint.parse(text) if text else None
    except ValueError:
        return found
    return published if published is not None and published.ip == found.ip else found


def carried_stun_endpoint(snap: object, node_name: str) -> tuple[Endpoint | None, EndpointDiscovery | None]:
    """--once: the endpoint the running loop found with STUN, as published (so a one-shot does not
    replace a NAT mapping with the node's InternalIP)."""
    peers = getattr(snap, "peers", ()) or ()
    own = next((p for p in peers if p.name == node_name), None)
    if own is None or own.spec.endpoint is None or own.status.endpoint_discovery_method != EndpointDiscovery.STUN.value:
        return None, None
    return own.spec.endpoint, EndpointDiscovery.STUN


def once_paths(mesh: Mesh, peers: Sequence[Peer], node_name: str, wg: WgDeviceState,
               proxy_alive: Callable[[Endpoint], bool]) -> dict[str, PeerPath]:
    """What the running loop (traversal) would keep for each peer, without running traversal.

    * relay.mode never: no override (the peer's own keepalive), as traversal does;
    * a peer whose WireGuard endpoint is a live loopback relay proxy (``proxy_alive``: a running
      agent holds that UDP port): left on that proxy with the relay keepalive.  The device, not
      the published status, decides: the status may lag a failover by one pass;
    * a direct peer currently at one of its LAN endpoints (status.hostEndpoints): left there;
    * every other peer: direct at its published endpoint, with the direct keepalive (1 s);
    * a direct peer keeps the path MTU this node published for it (status.pathMTU, spec.mtu auto).

    A loopback endpoint nobody listens on (the agent is gone) cannot be kept (the proxy lives in
    the agent): that peer is planned direct.
    """
    out: dict[str, PeerPath] = {}
    never = mesh.spec.relay.mode is RelayMode.NEVER
    mtus = next((p.status.path_mtu for p in peers if p.name == node_name), {}) if mesh.spec.path_mtu else {}
    for peer in peers:
        if peer.name == node_name:
            continue
        state = wg.peers.get(peer.spec.public_key)
        current = state.config.endpoint if state is not None else None
        if not never and current is not None and current.ip.is_loopback and proxy_alive(current):
            out[peer.name] = PeerPath(current, RELAY_KEEPALIVE, Transport.RELAY)
            continue
        lan = current if current is not None and str(current) in peer.status.host_endpoints else None
        out[peer.name] = PeerPath(lan, None if never else DIRECT_KEEPALIVE, Transport.DIRECT, mtus.get(peer.name))
    return out


def _once_paths_now(reconciler: Reconciler | None, source: object, node_name: str) -> dict[str, PeerPath]:
    snapshot = getattr(source, "snapshot", None)
    snap = snapshot() if snapshot is not None else None
    if reconciler is None or snap is None:
        return {}
    wg = WgDeviceState()
    if reconciler.engine is not None:
        try:
            wg = reconciler.engine.get()
        except WireKubeError:  # no device yet (a dry run on a fresh node)
            wg = WgDeviceState()
    ports = loopback_udp_ports()
    return once_paths(snap.mesh, snap.peers, node_name, wg, lambda ep: ep.port in ports)


def loopback_udp_ports(proc_net: Path = Path("/proc/net")) -> set[int]:
    """UDP ports bound on a loopback (or wildcard) address in this network namespace: the relay
    proxies of a running agent (read from /proc/net/udp{,6}; nothing is bound or sent)."""
    ports: set[int] = set()
    for name, loopback in (("udp", ("0100007F", "00000000")), ("udp6", ("00000000000000000000000001000000",
                                                                         "00000000000000000000000000000000"))):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 1 and ":" in fields[1]:
                address, _, port = fields[1].rpartition(":")
                if address in loopback:
                    ports.add(int(port, 16))
    return ports


def _once(reconciler: Reconciler, source: object, dry_run: bool) -> int:
    wait = getattr(source, "wait_synced", None)
    if wait is not None:
        wait(30.0)
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
