"""``wirekube-lab``: whole clusters of nodes behind real NATs on one Linux machine.

    wirekube-lab up [TOPOLOGY.yaml] [--name N]   # network + real API server + relay + agents
    wirekube-lab status [--json] [--name N]      # nodes (NAT, mesh IP) and every pair (transport, RTT)
    wirekube-lab exec NAME -- CMD...             # NAME: a node, SITE-router, internet, a host or pod
    wirekube-lab ping FROM TO                    # mesh IP to mesh IP
    wirekube-lab down [--name N]                 # removes everything; safe to run twice
    wirekube-lab cluster up|down                 # only the real kube-apiserver + etcd

Every lab lives under /run/wirekube-lab/<name> (logs in its logs/ directory, named by `status`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from wirekube.errors import WireKubeError
from wirekube.lab.cluster import ControlPlane, ControlPlaneError

DEFAULT_NAME = "default"


def lab_root() -> Path:
    return Path(os.environ.get("WIREKUBE_LAB_DIR", "/tmp/wirekube-lab"))


def lab_dir(name: str) -> Path:
    return lab_root() / name


def _cluster_up(args: argparse.Namespace) -> int:
    cp = ControlPlane(lab_dir(args.name) / "cluster", bind_address=args.bind).up()
    print(cp.kubeconfig)
    print(f"# export KUBECONFIG={cp.kubeconfig}; kubectl get crd", file=sys.stderr)
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    workdir = lab_dir(args.name) / "cluster"
    if (workdir / "cluster.json").exists():
        ControlPlane.load(workdir).down()
        print(f"cluster {args.name!r} stopped and removed", file=sys.stderr)
    else:
        print(f"cluster {args.name!r} is not running (nothing to do)", file=sys.stderr)
    return 0


def _up(args: argparse.Namespace) -> int:
    from wirekube.lab import orchestrate
    from wirekube.lab.topology import default_topology, load_topology

    topology = load_topology(args.topology) if args.topology else default_topology()
    h = orchestrate.up(topology, args.name, wait=args.wait)
    lab, kube, _ = orchestrate.attach(args.name)
    print(orchestrate.render_status(orchestrate.collect(lab, kube), lab.log_dir))
    print(f"explore:  wirekube-lab exec prc-1 -- ip -br addr     wirekube-lab ping prc-1 sym1-1\n"
          f"          KUBECONFIG={h.admin_kubeconfig} wirekubectl status\n"
          f"remove:   wirekube-lab down" + ("" if args.name == DEFAULT_NAME else f" --name {args.name}"))
    return 0


def _status(args: argparse.Namespace) -> int:
    from wirekube.lab import orchestrate

    lab, kube, _ = orchestrate.attach(args.name)
    data = orchestrate.collect(lab, kube)
    if args.json:
        print(json.dumps({"nodes": [{k: n[k] for k in ("name", "site", "natType", "meshIP")} for n in data["nodes"]],
                          "pairs": [{k: p[k] for k in ("from", "to", "transport", "rttMs")} for p in data["pairs"]],
                          "logs": str(lab.log_dir)}, indent=2))
    else:
        print(orchestrate.render_status(data, lab.log_dir), end="")
    return 0


def _exec(args: argparse.Namespace) -> int:
    from wirekube.lab.net import Lab

    argv = args.argv[1:] if args.argv and args.argv[0] == "--" else args.argv
    if not argv:
        print("wirekube-lab exec: give a command after --", file=sys.stderr)
        return 2
    # Replace this process, so interactive commands (a shell) get the terminal.
    full = Lab.attach(args.name).command(args.target, argv)
    os.execvp(full[0], full)
    return 127  # pragma: no cover - execvp does not return


def _ping(args: argparse.Namespace) -> int:
    from wirekube.lab import orchestrate

    lab, kube, _ = orchestrate.attach(args.name)
    nodes = {n["name"]: n for n in orchestrate.collect_nodes(lab, kube)}
    if args.dst not in nodes or not nodes[args.dst]["meshIP"]:
        print(f"wirekube-lab ping: no mesh IP for {args.dst!r}", file=sys.stderr)
        return 2
    result = lab.exec(args.src, ["ping", "-c", str(args.count), "-W", "1", nodes[args.dst]["meshIP"]],
                      timeout=args.count + 10)
    sys.stdout.write(result.stdout)
    return result.returncode


def _down(args: argparse.Namespace) -> int:
    from wirekube.lab import orchestrate

    orchestrate.down(args.name)
    print(f"lab {args.name!r} removed", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wirekube-lab", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def named(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", default=DEFAULT_NAME, help="lab name (default %(default)s)")
        return p

    up = named(sub.add_parser("up", help="bring the whole lab up and wait for convergence"))
    up.add_argument("topology", nargs="?", help="topology YAML (default: the built-in EKS Hybrid picture)")
    up.add_argument("--wait", type=float, default=120.0, help="seconds to wait for convergence")
    up.set_defaults(func=_up)
    st = named(sub.add_parser("status", help="nodes and every ordered pair with transport and RTT"))
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)
    ex = named(sub.add_parser("exec", help="run a command inside a lab namespace"))
    ex.add_argument("target")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ex.set_defaults(func=_exec)
    pg = named(sub.add_parser("ping", help="ping TO's mesh IP from FROM"))
    pg.add_argument("src")
    pg.add_argument("dst")
    pg.add_argument("-c", "--count", type=int, default=3)
    pg.set_defaults(func=_ping)
    dn = named(sub.add_parser("down", help="remove every namespace, process and file of the lab"))
    dn.set_defaults(func=_down)

    cluster = sub.add_parser("cluster", help="only the real kube-apiserver + etcd on this machine")
    csub = cluster.add_subparsers(dest="action", required=True)
    cup = csub.add_parser("up", help="start etcd + kube-apiserver, install the CRDs, print a kubeconfig path")
    cup.add_argument("--name", default="wk", help="cluster name (default %(default)s)")
    cup.add_argument("--bind", default="127.0.0.1", help="address the API server listens on")
    cup.set_defaults(func=_cluster_up)
    cdown = csub.add_parser("down", help="stop the servers and remove their files")
    cdown.add_argument("--name", default="wk")
    cdown.set_defaults(func=_cluster_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ControlPlaneError, WireKubeError) as e:
        print(f"wirekube-lab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
