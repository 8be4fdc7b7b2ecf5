"""``wirekube-gateway``: the gateway controller.

    wirekube-gateway [--kubeconfig PATH] [--namespace wirekube-system] [--relay-service wirekube-relay]
                     [--metrics-listen 0.0.0.0:9090] [--leader-elect] [--aws-vpc-routes auto|off] [...]

Elects each WireKubeGateway's active peer with make-before-break handover, syncs pod CIDRs
into WireKubePeers, and publishes the relay's reachable addresses in the WireKubeMesh status.
For gateways with ``spec.awsVPCRoutes`` it points the AWS VPC route tables at the active peer's
ENI (credentials from botocore's default chain; region from the field, else ``$AWS_REGION``,
else the node's zone).
Runs until SIGTERM or SIGINT, then releases its Lease so a standby replica takes over at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from loguru import logger

from wirekube import k8s, logsetup
from wirekube.entrypoint import console_script
from wirekube.gateway.awsfollower import AWSSettings
from wirekube.gateway.controller import ControllerSettings, GatewayController
from wirekube.gateway.metrics import ControllerMetrics, MetricsServer
from wirekube.gateway.plan import PlanSettings

DEFAULT_METRICS = "0.0.0.0:9090"


@dataclass(frozen=True)
class Settings:
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    kubeconfig: str | None = None
    metrics_host: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod
    metrics_port: int = 9090
    log_format: str = "json"
    log_level: str = "INFO"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ':PORT' means every address


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wirekube-gateway", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "wirekube-system"),
                   help="namespace of the relay Service and the leader Lease (default $POD_NAMESPACE or "
                        "wirekube-system)")
    p.add_argument("--relay-service", default="wirekube-relay", help="name of the managed relay's Service")
    p.add_argument("--metrics-listen", type=parse_listen, default=DEFAULT_METRICS,
                   help="address serving /metrics, /healthz and /readyz (default 0.0.0.0:9090)")
    p.add_argument("--leader-elect", action="store_true", help="elect a leader through a Lease (for replicas > 1)")
    p.add_argument("--lease-name", default="wirekube-gateway")
    p.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default 15)")
    p.add_argument("--renew-deadline", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--retry-period", type=float, default=2.0, help="seconds between Lease renewals (default 2)")
    p.add_argument("--resync-period", type=float, default=30.0, help="seconds between full passes (default 30)")
    p.add_argument("--handover-timeout", type=float, default=10.0,
                   help="seconds a new gateway peer may take to confirm forwarding before clients move "
                        "anyway, when the old one is unhealthy (default 10)")
    p.add_argument("--failback-delay", type=float, default=30.0,
                   help="seconds a preferred peer must stay healthy before it takes over from a healthy "
                        "active peer (default 30)")
    p.add_argument("--aws-vpc-routes", choices=("auto", "off"),
                   default=os.environ.get("WIREKUBE_AWS_VPC_ROUTES", "auto"),
                   help="auto: follow spec.awsVPCRoutes of the gateways that have it (AWS is called only for "
                        "them); off: never call AWS (default $WIREKUBE_AWS_VPC_ROUTES or auto)")
    p.add_argument("--aws-endpoint-url", default=os.environ.get("WIREKUBE_AWS_ENDPOINT_URL", ""),
                   help="EC2 endpoint URL override, e.g. an emulator in tests (default $WIREKUBE_AWS_ENDPOINT_URL)")
    p.add_argument("--aws-verify-period", type=float, default=60.0,
                   help="seconds between checks that synced VPC routes are still right (default 60)")
    p.add_argument("--event-namespace", default="default", help="namespace for Events about cluster-scoped objects")
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.add_argument("--log-level", default="INFO")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.renew_deadline >= args.lease_duration:
        raise SystemExit("--renew-deadline must be shorter than --lease-duration")
    if args.aws_verify_period < 5:
        raise SystemExit("--aws-verify-period must be at least 5 seconds")
    host, port = args.metrics_listen if isinstance(args.metrics_listen, tuple) else parse_listen(args.metrics_listen)
    return Settings(
        controller=ControllerSettings(
            namespace=args.namespace,
            relay_service=args.relay_service,
            event_namespace=args.event_namespace,
            leader_elect=args.leader_elect,
            lease_name=args.lease_name,
            lease_duration=args.lease_duration,
            renew_deadline=args.renew_deadline,
            retry_period=args.retry_period,
            resync_period=args.resync_period,
            plan=PlanSettings(handover_timeout=args.handover_timeout, failback_after=args.failback_delay),
            aws=AWSSettings(
                enabled=args.aws_vpc_routes != "off",
                endpoint_url=args.aws_endpoint_url,
                default_region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "",
                verify_period=args.aws_verify_period,
            ),
        ),
        kubeconfig=args.kubeconfig,
        metrics_host=host,
        metrics_port=port,
        log_format=args.log_format,
        log_level=args.log_level.upper(),
    )


def configure_logging(fmt: str, level: str) -> None:
    logsetup.configure_logging(fmt, level)


def run(settings: Settings) -> int:
    kube = k8s.Kube.auto(settings.kubeconfig)
    metrics = ControllerMetrics()
    controller = GatewayController(kube, settings.controller, metrics=metrics)
    server = MetricsServer(settings.metrics_host, settings.metrics_port, metrics, controller.healthy,
                           lambda: controller.synced).start()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal {} received, shutting down", signum)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    controller.start()
    logger.bind(component="gateway-controller", api=kube.host, metrics="{}:{}".format(*server.address),
                namespace=settings.controller.namespace, leader_elect=settings.controller.leader_elect,
                ).info("gateway controller started")
    stopping.wait()
    controller.stop()
    server.stop()
    kube.close()
    return 0


@console_script("wirekube-gateway")
def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(build_parser().parse_args(argv))
    configure_logging(settings.log_format, settings.log_level)
    return run(settings)


if __name__ == "__main__":
    raise SystemExit(main())
