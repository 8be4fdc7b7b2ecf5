"""``wirekube-lab``: the lab on one Linux machine.

    wirekube-lab cluster up [--name NAME] [--bind ADDRESS]   # prints the kubeconfig path
    wirekube-lab cluster down [--name NAME]

State lives under ``$WIREKUBE_LAB_DIR`` (default /tmp/wirekube-lab), one directory per lab name,
so two labs never collide and ``down`` from another shell finds what ``up`` started.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from wirekube.lab.cluster import ControlPlane, ControlPlaneError

DEFAULT_NAME = "wk"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wirekube-lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cluster = sub.add_parser("cluster", help="the real kube-apiserver + etcd on this machine")
    csub = cluster.add_subparsers(dest="action", required=True)
    up = csub.add_parser("up", help="start etcd + kube-apiserver, install the CRDs, print a kubeconfig path")
    up.add_argument("--name", default=DEFAULT_NAME, help="lab name (default %(default)s)")
    up.add_argument("--bind", default="127.0.0.1", help="address the API server listens on")
    up.set_defaults(func=_cluster_up)
    down = csub.add_parser("down", help="stop the servers and remove their files")
    down.add_argument("--name", default=DEFAULT_NAME)
    down.set_defaults(func=_cluster_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ControlPlaneError as e:
        print(f"wirekube-lab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
