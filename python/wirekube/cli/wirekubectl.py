"""``wirekubectl``: operator commands.

    wirekubectl status [-o table|json|yaml] [--require-connected --timeout S]
    wirekubectl doctor [NODE] [-o table|json]
    wirekubectl doctor --local [--interface wire_kube] [--agent-url http://127.0.0.1:9090] [--netns NS]
    wirekubectl cleanup [--interface wire_kube]     # on a node: remove WireKube's dataplane

``status`` and ``doctor`` use the user's kubeconfig like kubectl does (``--kubeconfig``,
``$KUBECONFIG``, ``~/.kube/config``, or the in-cluster service account).  ``doctor --local``
needs no API server: it inspects the node it runs on (or the network namespace ``--netns``) for
stale WireKube state (see :mod:`wirekube.cli.nodestate`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wirekube.entrypoint import console_script
from wirekube.errors import WireKubeError


def _kube(args: argparse.Namespace) -> Any:
    from wirekube import k8s

    return k8s.Kube.auto(args.kubeconfig)


def _status(args: argparse.Namespace) -> int:
    from wirekube.cli import status

    return status.run(_kube(args), output=args.output, require_connected=args.require_connected, timeout=args.timeout)


def _tcp_probe(target: str, timeout: float = 3.0) -> str | None:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except (OSError, ValueError) as e:
        return f"TCP connect failed: {e}"


def _stun_probe(target: str, timeout: float = 2.0) -> str | None:
    from aioice import stun

    host, _, port = target.rpartition(":")
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(bytes(request), (host.strip("[]"), int(port)))
            reply = stun.parse_message(s.recvfrom(2048)[0])
    except (OSError, ValueError) as e:
        return f"no STUN answer: {e}"
    if reply.transaction_id != request.transaction_id:
        return "STUN answer for another transaction"
    return None


def _doctor(args: argparse.Namespace) -> int:
    from wirekube import errors, k8s
    from wirekube.cli import doctor

    if args.local:
        return _doctor_local(args)
    kube = _kube(args)
    from wirekube import reports

    peers = reports.list_peers(kube)
    gateways, _ = kube.list(k8s.GATEWAYS)
    nodes, _ = kube.list(k8s.NODES)
    try:
        mesh: dict[str, Any] | None = kube.get(k8s.MESHES, "default")
    except errors.NotFound:
        mesh = None
    try:
        grants, _ = kube.list(k8s.ROUTE_GRANTS)
    except errors.NotFound:  # CRDs from before route grants: nothing is granted
        grants = []
    from wirekube.agent.main import resolve_host

    findings = doctor.run_static(mesh, peers, gateways, nodes, node=args.node, now=dt.datetime.now(dt.UTC),
                                 grants=grants, api_server_ips=resolve_host(kube.host))
    spec = (mesh or {}).get("spec") or {}
    relay = spec.get("relay") or {}
    relays = list(((mesh or {}).get("status") or {}).get("relay", {}).get("endpoints") or [])
    if relay.get("provider") == "external" and (relay.get("external") or {}).get("endpoint"):
        relays = [relay["external"]["endpoint"]]
    if relay.get("mode") != "never":
        if not relays:
            findings.append(doctor.Finding("relay-reachable", doctor.WARN, "mesh", "no relay address is known",
                                           "deploy the relay (provider managed) or set relay.external.endpoint"))
        findings += doctor.check_reachability("relay-reachable", relays, _tcp_probe,
                                              "check the relay Service / LoadBalancer and TCP egress to it")
    stun_servers = list(spec.get("stunServers") or relays)
    findings += doctor.check_reachability("stun-reachable", stun_servers, _stun_probe,
                                          "allow UDP to the STUN servers; without STUN, nodes cannot find their "
                                          "public endpoints and pairs fall back to the relay")
    return doctor.print_findings(findings, args.output)


def _doctor_local(args: argparse.Namespace) -> int:
    from wirekube.cli import doctor, nodestate

    if args.node:
        print("wirekubectl doctor: --local inspects the node it runs on; drop NODE", file=sys.stderr)
        return 2
    state = nodestate.inspect(args.interface, agent_url=args.agent_url, netns=args.netns, socket_dir=args.socket_dir)
    return doctor.print_findings(doctor.check_local(state), args.output)


def _cleanup(args: argparse.Namespace) -> int:
    from wirekube.agent.cleanup import cleanup

    try:
        report = cleanup(args.interface, args.socket_dir)
    except WireKubeError as e:
        print(f"wirekubectl cleanup: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**asdict(report), "changed": report.changed}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from wirekube.agent.wg.userspace import SOCKET_DIR

    parser = argparse.ArgumentParser(prog="wirekubectl", description="Operate a WireKube mesh.")
    parser.add_argument("--kubeconfig", help="kubeconfig path (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    sub = parser.add_subparsers(dest="command", required=True)

    st = sub.add_parser("status", help="nodes, the pair matrix (direct/relay/down) and gateways")
    st.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    st.add_argument("--require-connected", action="store_true", help="exit 1 unless every peer reports connected")
    st.add_argument("--timeout", type=float, default=0.0, help="with --require-connected: wait up to this long")
    st.set_defaults(func=_status)

    dr = sub.add_parser("doctor", help="diagnose the mesh: a verdict and a fix per check; exit 1 on failure")
    dr.add_argument("node", nargs="?", help="limit per-peer checks to this node")
    dr.add_argument("-o", "--output", choices=["table", "json"], default="table")
    dr.add_argument("--local", action="store_true",
                    help="inspect this node instead of the API: WireKube's link, rules, table 22347 and nft "
                         "table, and whether an agent runs here (stale state when none does)")
    dr.add_argument("--interface", default="wire_kube", help="with --local: the WireGuard interface name")
    dr.add_argument("--agent-url", default="http://127.0.0.1:9090",
                    help="with --local: the agent's --metrics-listen, for /healthz and /readyz")
    dr.add_argument("--netns", default=None,
                    help="with --local: inspect this network namespace (a name in /run/netns or a path)")
    dr.add_argument("--socket-dir", type=Path, default=SOCKET_DIR, help=argparse.SUPPRESS)
    dr.set_defaults(func=_doctor)

    clean = sub.add_parser(
        "cleanup", help="remove WireKube's interface, rules, table 22347 routes and nft table from this node")
    clean.add_argument("--interface", default="wire_kube", help="WireGuard interface name (mesh spec.interfaceName)")
    clean.add_argument("--socket-dir", type=Path, default=SOCKET_DIR, help=argparse.SUPPRESS)
    clean.set_defaults(func=_cleanup)
    return parser


@console_script("wirekubectl")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except WireKubeError as e:
        print(f"wirekubectl {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
