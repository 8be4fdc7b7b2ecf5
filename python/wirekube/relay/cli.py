"""``wirekube-relay``: the relay service.

    wirekube-relay --listen HOST:PORT --stun-listen HOST:PORT --metrics-listen HOST:PORT
                   [--authorize-peers] [--nat-probe-listen HOST:PORT] [...]

Runs on uvloop until SIGTERM or SIGINT, then tells every client it is shutting down and exits 0.
With ``--authorize-peers`` only keys found in some WireKubePeer ``spec.publicKey`` may register,
and a peer's removal disconnects it; the cluster is watched through :mod:`wirekube.k8s`.

With ``--wss-listen HOST:PORT --tls-cert PATH --tls-key PATH`` the relay also serves the same
protocol over WebSocket over TLS (:mod:`wirekube.relay.wsbridge`), for nodes that can only reach
port 443, often only through an HTTP CONNECT proxy.

Replicas behind one load balancer (:mod:`wirekube.relay.mesh`)::

    wirekube-relay ... --mesh-secret-file PATH [--mesh-listen HOST:PORT]
                       (--mesh-peers HOST:PORT,... | --mesh-service NAME [--mesh-namespace NS])

With ``--status-lease NAME`` the replica keeps a Lease with how many keys it holds, which
``wirekubectl status`` lists (:mod:`wirekube.relay.replicastatus`).

On SIGTERM a replica linked to others first drains: it tells its clients (GoAway) to register
again through the load balancer and waits up to ``--drain-timeout`` for them to move.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvloop
from loguru import logger

from wirekube import logsetup
from wirekube.entrypoint import console_script
from wirekube.relay.authz import PeerAuthorizer, keys_from_peers
from wirekube.relay.mesh import DEFAULT_MESH_PORT, MeshSettings, RelayMesh, peers_from_slices
from wirekube.relay.metrics import build_registry, serve_metrics
from wirekube.relay.replicastatus import LeasePublisher, LeaseSettings
from wirekube.relay.server import RelayServer, RelaySettings

DEFAULT_PORT = 3478
DEFAULT_METRICS_PORT = 9478


class StartupError(RuntimeError):
    """The relay cannot start as configured."""


class UsageError(StartupError):
    """The command line is inconsistent (exit code 2, one line)."""


class AdapterMissing(StartupError):
    """--authorize-peers was asked for but the Kubernetes adapter is not usable."""


@dataclass(frozen=True)
class CliSettings:
    relay: RelaySettings = field(default_factory=RelaySettings)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod
    metrics_port: int = DEFAULT_METRICS_PORT
    authorize_peers: bool = False
    kubeconfig: str | None = None
    log_format: str = "json"
    log_level: str = "INFO"
    mesh: MeshSettings | None = None
    mesh_service: str | None = None
    mesh_namespace: str | None = None
    status_lease: str | None = None
    status_namespace: str | None = None


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
        host, port = text, str(default_port)
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ':PORT' means every address
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: port is not a number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port out of range")
    return host, number


def _hostport_list(text: str) -> tuple[tuple[str, int], ...]:
    from wirekube.relay.mesh import DEFAULT_MESH_PORT

    return tuple(parse_hostport(part.strip(), DEFAULT_MESH_PORT) for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wirekube-relay",
        description="WireKube relay: WireGuard datagrams over framed TCP, a STUN responder and NAT probes.",
    )
    hp = "HOST:PORT"
    p.add_argument("--listen", type=parse_hostport, default=("0.0.0.0", DEFAULT_PORT), metavar=hp,  # noqa: S104 - clients come from anywhere
                   help="TCP address for relay clients (default 0.0.0.0:3478)")
    p.add_argument("--stun-listen", type=parse_hostport, default=None, metavar=hp,
                   help="UDP address of the STUN responder and of the first NAT probe (default: --listen)")
    p.add_argument("--metrics-listen", type=parse_hostport, default=("0.0.0.0", DEFAULT_METRICS_PORT), metavar=hp,  # noqa: S104 - scraped
                   help="HTTP address serving /metrics and /healthz (default 0.0.0.0:9478)")
    p.add_argument("--nat-probe-listen", type=parse_hostport, default=None, metavar=hp,
                   help="UDP address the second NAT probe is sent from (default: the STUN host, any free port)")
    p.add_argument("--authorize-peers", action="store_true",
                   help="accept only keys found in a WireKubePeer spec.publicKey; disconnect a peer when it is removed")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig for --authorize-peers (default: in-cluster, else $KUBECONFIG)")
    p.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time allowed from connect to Registered (default 5)")
    p.add_argument("--idle-timeout", type=float, default=90.0, metavar="SECONDS",
                   help="a registered client silent for this long is dropped (default 90)")
    p.add_argument("--queue-limit-bytes", type=int, default=512 * 1024, metavar="BYTES",
                   help="cap on bytes waiting for one client; beyond it that client's packets are dropped "
                        "(default 524288)")
    p.add_argument("--backpressure-hold", type=float, default=0.02, metavar="SECONDS",
                   help="longest a client whose packets all go to congested peers is left unread, so TCP slows "
                        "it instead of the relay dropping what it sends (default 0.02; 0 never holds)")
    p.add_argument("--max-connections", type=int, default=10_000, help="connections beyond this are refused")
    p.add_argument("--max-pending-per-ip", type=int, default=64, metavar="N",
                   help="connections from one source address that may be unregistered at once (default 64); "
                        "registered clients do not count, so many nodes behind one NAT are fine")
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, how long clients told to reconnect elsewhere (GoAway) have before the "
                        "rest are closed (default 10)")
    _add_wss_arguments(p)
    p.add_argument("--reuse-port", action="store_true",
                   help="SO_REUSEPORT on the relay's sockets, so several relay processes meshed over local links "
                        "(--mesh-peers) share one address; the kernel spreads connections among them")
    _add_mesh_arguments(p)
    _add_status_arguments(p)
    p.add_argument("--log-format", choices=("json", "text"), default="json", help="json (default) or text")
    p.add_argument("--log-level", default="INFO", help="loguru level (default INFO)")
    return p


def _add_wss_arguments(p: argparse.ArgumentParser) -> None:
    """The WSS listener's flags (the relay protocol over WebSocket over TLS)."""
    w = p.add_argument_group("WebSocket over TLS", "the same protocol for clients that only reach port 443 "
                             "or an HTTP CONNECT proxy")
    w.add_argument("--wss-listen", type=lambda t: parse_hostport(t, 443), default=None, metavar="HOST:PORT",
                   help="TCP address of the WSS listener (port defaults to 443); needs --tls-cert and --tls-key")
    w.add_argument("--wss-path", default=None, metavar="PATH",
                   help="the only HTTP path upgraded to a WebSocket, e.g. /relay (default: any path)")
    w.add_argument("--tls-cert", default=None, metavar="PATH", help="PEM certificate chain (e.g. a Secret's tls.crt)")
    w.add_argument("--tls-key", default=None, metavar="PATH", help="PEM private key (e.g. a Secret's tls.key)")


def _add_mesh_arguments(p: argparse.ArgumentParser) -> None:
    """The replica mesh's flags (replicas behind one load balancer)."""
    m = p.add_argument_group("replica mesh", "relay replicas behind one load balancer act as one relay")
    m.add_argument("--mesh-secret-file", default=None, metavar="PATH",
                   help="the secret every replica shares (at least 16 bytes); turns the mesh on")
    m.add_argument("--mesh-listen", type=parse_hostport, default=None, metavar="HOST:PORT",
                   help="TCP address for links from other replicas (default 0.0.0.0:3480)")
    m.add_argument("--mesh-peers", type=_hostport_list, default=(), metavar="HOST:PORT,...",
                   help="other replicas' mesh addresses (may include this one's own)")
    m.add_argument("--mesh-service", default=None, metavar="NAME",
                   help="find the replicas in the EndpointSlices of this (headless) Service instead")
    m.add_argument("--mesh-namespace", default=None, metavar="NAMESPACE",
                   help="the Service's namespace (default: $POD_NAMESPACE, else the pod's own namespace)")


def _add_status_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the Lease that ``wirekubectl status`` reads about this replica."""
    st = p.add_argument_group("status", "what `wirekubectl status` shows about this replica")
    st.add_argument("--status-lease", default=None, metavar="NAME",
                    help="keep the Lease NAME (labelled wirekube.io/relay-replica) with this replica's key and "
                         "mesh-link counts, written when they change (at most every 5 s) and renewed every 20 s; "
                         "owned by the Pod $POD_NAME/$POD_UID when both are set")
    st.add_argument("--status-namespace", default=None, metavar="NAMESPACE",
                    help="the Lease's namespace (default: $POD_NAMESPACE, else the pod's own namespace)")


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def settings_from_args(args: argparse.Namespace) -> CliSettings:
    if args.status_lease is not None and not (
            len(args.status_lease) <= 253 and _DNS_SUBDOMAIN.fullmatch(args.status_lease)):
        raise UsageError(f"--status-lease {args.status_lease!r}: not a valid object name "
                         "(lowercase letters, digits, '-' and '.')")
    _check_wss(args)
    listen_host, listen_port = args.listen
    stun_host, stun_port = args.stun_listen or args.listen
    probe_host, probe_port = args.nat_probe_listen or (stun_host, 0)
    return CliSettings(
        relay=RelaySettings(
            listen_host=listen_host,
            listen_port=listen_port,
            stun_host=stun_host,
            stun_port=stun_port,
            nat_probe_host=probe_host,
            nat_probe_port=probe_port,
            handshake_timeout=args.handshake_timeout,
            idle_timeout=args.idle_timeout,
            queue_limit_bytes=args.queue_limit_bytes,
            backpressure_hold=args.backpressure_hold,
            max_connections=args.max_connections,
            max_pending_per_ip=args.max_pending_per_ip,
            drain_timeout=args.drain_timeout,
            reuse_port=args.reuse_port,
            wss_host=args.wss_listen[0] if args.wss_listen else None,
            wss_port=args.wss_listen[1] if args.wss_listen else 443,
            wss_path=args.wss_path,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ),
        mesh=_mesh_settings(args),
        mesh_service=args.mesh_service,
        mesh_namespace=args.mesh_namespace,
        status_lease=args.status_lease,
        status_namespace=args.status_namespace,
        metrics_host=args.metrics_listen[0],
        metrics_port=args.metrics_listen[1],
        authorize_peers=args.authorize_peers,
        kubeconfig=args.kubeconfig,
        log_format=args.log_format,
        log_level=args.log_level.upper(),
    )


def _check_wss(args: argparse.Namespace) -> None:
    """The WSS flags go together, and the certificate and key must load (one line if not)."""
    if args.wss_listen is None:
        if args.tls_cert or args.tls_key or args.wss_path:
            raise UsageError("--tls-cert, --tls-key and --wss-path need --wss-listen")
        return
    if not args.tls_cert or not args.tls_key:
        raise UsageError("--wss-listen needs --tls-cert and --tls-key")
    if args.wss_path is not None and not args.wss_path.startswith("/"):
        raise UsageError(f"--wss-path {args.wss_path!r}: must start with '/'")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert, args.tls_key)
    except ssl.SSLError as e:
        raise UsageError(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: not a usable certificate "
                         f"and key ({e.reason or e})") from None
    except OSError as e:
        raise UsageError(f"cannot read the TLS certificate or key: {e.strerror}: {e.filename}") from None


def _mesh_settings(args: argparse.Namespace) -> MeshSettings | None:
    from wirekube.relay.meshwire import check_secret

    wants_mesh = args.mesh_peers or args.mesh_service or args.mesh_listen
    if args.mesh_secret_file is None:
        if wants_mesh:
            raise UsageError("--mesh-peers, --mesh-service and --mesh-listen need --mesh-secret-file")
        return None
    try:
        with open(args.mesh_secret_file, "rb") as f:
            secret = check_secret(f.read())
    except OSError as e:
        raise UsageError(f"--mesh-secret-file: cannot read {args.mesh_secret_file}: {e.strerror}") from e
    except ValueError as e:
        raise UsageError(f"--mesh-secret-file {args.mesh_secret_file}: {e}") from e
    host, port = args.mesh_listen or ("0.0.0.0", DEFAULT_MESH_PORT)  # noqa: S104 - the other replicas dial the pod
    return MeshSettings(secret=secret, listen_host=host, listen_port=port, peers=tuple(args.mesh_peers))


def _pod_namespace(explicit: str | None, flag: str = "--mesh-service", ns_flag: str = "--mesh-namespace") -> str:
    if explicit:
        return explicit
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        raise StartupError(f"{flag}: no namespace (set {ns_flag} or $POD_NAMESPACE)") from None


def watch_mesh_peers(mesh: RelayMesh, service: str, namespace: str, kubeconfig: str | None) -> Callable[[], None]:
    """Keep the mesh dialing every replica listed in ``service``'s EndpointSlices; returns a stopper."""
    try:
        from wirekube import k8s
    except ImportError as e:
        raise AdapterMissing("--mesh-service needs the Kubernetes adapter") from e
    loop = asyncio.get_running_loop()
    scheduled = False
    informer: Any = None

    def refresh() -> None:
        nonlocal scheduled
        scheduled = False
        peers = peers_from_slices(informer.cache.values(), "mesh", mesh.settings.listen_port)
        logger.bind(component="relay-mesh").info("replicas in Service {}/{}: {}", namespace, service,
                                                 ", ".join(f"{h}:{p}" for h, p in peers) or "none")
        mesh.set_peers(peers)

    def changed(*_: object) -> None:  # on the informer's thread
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            loop.call_soon_threadsafe(refresh)

    try:
        kube = k8s.Kube.auto(kubeconfig)
    except Exception as e:  # kubeconfig/in-cluster loading raises many types
        raise StartupError(f"--mesh-service: no usable Kubernetes client: {e}") from e
    informer = k8s.Informer(kube, k8s.ENDPOINTSLICES, on_event=changed, namespace=namespace,
                            label_selector=f"kubernetes.io/service-name={service}").start()
    return informer.stop  # type: ignore[no-any-return]


def start_status_lease(settings: CliSettings, relay: RelayServer, mesh: RelayMesh | None) -> LeasePublisher:
    """Keep this replica's Lease (see :mod:`wirekube.relay.replicastatus`); the caller closes it."""
    assert settings.status_lease is not None
    try:
        from wirekube import k8s
    except ImportError as e:
        raise AdapterMissing("--status-lease needs the Kubernetes adapter") from e
    try:
        kube = k8s.Kube.auto(settings.kubeconfig)
    except Exception as e:  # kubeconfig/in-cluster loading raises many types
        raise StartupError(f"--status-lease: no usable Kubernetes client: {e}") from e
    pod, uid = os.environ.get("POD_NAME"), os.environ.get("POD_UID")
    lease = LeaseSettings(name=settings.status_lease,
                          namespace=_pod_namespace(settings.status_namespace, "--status-lease", "--status-namespace"),
                          owner_pod=(pod, uid) if pod and uid else None)
    replica = mesh.id.hex()[:8] if mesh is not None else os.urandom(4).hex()
    publisher = LeasePublisher(kube, lease, replica,
                               lambda: (len(relay.routes), len(mesh.links) if mesh is not None else None))
    publisher.start()
    return publisher


def configure_logging(fmt: str, level: str) -> None:
    logsetup.configure_logging(fmt, level)


def watch_peers(authorizer: PeerAuthorizer, kubeconfig: str | None) -> Callable[[], None]:
    """Keep ``authorizer`` equal to the keys of all WireKubePeer objects; returns a stopper.

    The informer runs on its own thread; every change schedules one recomputation of the full
    key set on the event loop (changes arriving together are folded into one).
    """
    try:
        from wirekube import k8s
    except ImportError as e:  # the adapter is absent or cannot import its client
        raise AdapterMissing("--authorize-peers needs the Kubernetes adapter") from e
    if not (hasattr(k8s, "Informer") and hasattr(k8s, "Kube") and hasattr(k8s, "PEERS")):
        raise AdapterMissing("--authorize-peers needs the Kubernetes adapter")

    loop = asyncio.get_running_loop()
    scheduled = False
    informer: Any = None

    def refresh() -> None:
        nonlocal scheduled
        scheduled = False
        authorizer.replace(keys_from_peers(informer.cache.values()))

    def changed(*_: object) -> None:  # on the informer's thread
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            loop.call_soon_threadsafe(refresh)

    try:
        kube = k8s.Kube.auto(kubeconfig)
    except Exception as e:  # kubeconfig/in-cluster loading raises many types
        raise StartupError(f"--authorize-peers: no usable Kubernetes client: {e}") from e
    informer = k8s.Informer(kube, k8s.PEERS, on_event=changed).start()

    async def first_sync() -> None:
        await asyncio.to_thread(informer.wait_synced)
        changed()  # an empty cluster emits no event, but is a valid (empty) set

    sync_task = loop.create_task(first_sync(), name="relay-peer-sync")

    def stop() -> None:
        sync_task.cancel()
        informer.stop()

    return stop


async def serve(settings: CliSettings) -> None:
    authorizer = PeerAuthorizer() if settings.authorize_peers else None
    stop_watch = watch_peers(authorizer, settings.kubeconfig) if authorizer is not None else None
    relay = RelayServer(settings.relay, authorizer=authorizer)
    mesh = RelayMesh(relay, settings.mesh) if settings.mesh is not None else None
    await relay.start()
    stop_mesh_watch = None
    if mesh is not None:
        await mesh.start()
        if settings.mesh_service:
            stop_mesh_watch = watch_mesh_peers(mesh, settings.mesh_service, _pod_namespace(settings.mesh_namespace),
                                               settings.kubeconfig)
    status = start_status_lease(settings, relay, mesh) if settings.status_lease else None
    metrics = await serve_metrics(build_registry(relay), settings.metrics_host, settings.metrics_port)
    metrics_addr = metrics.sockets[0].getsockname()
    logger.bind(
        component="relay",
        tcp=_addr(relay.address),
        wss=_addr(relay.wss_address),
        stun=_addr(relay.stun_address),
        nat_probe=_addr(relay.nat_probe_address),
        metrics=f"{metrics_addr[0]}:{metrics_addr[1]}",
        authorize_peers=settings.authorize_peers,
        mesh=_addr(mesh.address) if mesh is not None else "",
        replica=mesh.id.hex()[:8] if mesh is not None else "",
    ).info("relay ready")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    if mesh is not None and mesh.links:  # another replica can take the clients: hand them over
        logger.bind(component="relay").info("signal received: draining (clients told to reconnect elsewhere)")
        await relay.drain()
    else:
        logger.bind(component="relay").info("signal received, shutting down")
    if status is not None:
        await status.close(delete=True)
    if stop_watch is not None:
        stop_watch()
    if stop_mesh_watch is not None:
        stop_mesh_watch()
    metrics.close()
    await relay.close()
    if mesh is not None:
        await mesh.close()


def _addr(addr: tuple[str, int] | None) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else ""


@console_script("wirekube-relay")
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except UsageError as e:
        parser.exit(2, f"wirekube-relay: {e}\n")
    configure_logging(settings.log_format, settings.log_level)
    try:
        uvloop.run(serve(settings))
    except StartupError as e:
        logger.error("{}", e)
        return 2
    except OSError as e:
        logger.error("cannot start the relay: {}", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
