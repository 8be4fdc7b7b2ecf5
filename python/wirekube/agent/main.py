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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse

from loguru import logger

from wirekube.agent import keys as keystore
from wirekube.agent.netlink import Netlink
from wirekube.agent.reconcile import Reconciler, ReconcilerSettings, Result, describe
from wirekube.agent.wg.userspace import SOCKET_DIR
from wirekube.errors import WireKubeError
from wirekube.models import Engine, IPAddress, key_fingerprint


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
    source, api_ips = _make_source(settings, lambda: reconciler.wake.set() if reconciler else None)
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
    )
    try:
        if settings.once:
            return _once(reconciler, source, settings.dry_run)
        _install_signal_handlers(stop)
        logger.info("agent started (engine {}, resync {}s)", settings.engine.value, settings.resync_seconds)
        reconciler.run(stop)
        logger.info("agent stopping; dataplane left in place")
        return 0
    finally:
        reconciler.close()
        source.stop()
        netlink.close()


def _make_source(settings: AgentSettings, wake: object) -> tuple[object, tuple[IPAddress, ...]]:
    from wirekube.agent.source import FileSource, KubeSource

    if settings.peers_file is not None:
        return FileSource(settings.peers_file, on_change=wake).start(), ()  # type: ignore[arg-type]
    from wirekube import k8s

    if settings.api_server and not settings.kubeconfig:
        kube = k8s.Kube.auto(None, host_override=settings.api_server)
    else:
        kube = k8s.Kube.auto(settings.kubeconfig)
    source = KubeSource(kube, settings.node_name, on_change=wake).start()  # type: ignore[arg-type]
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
