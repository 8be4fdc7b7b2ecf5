"""``wirekube-lab``: whole clusters of nodes behind real NATs on one Linux machine.

    wirekube-lab up [NAME|FILE] [--name N]       # network, API server, relay, agents, gateway, pods
    wirekube-lab topologies                      # the built-in topologies (NAME for `up`)
    wirekube-lab status [--json] [--name N]      # nodes, every pair, gateways and the four planes
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
import time
from pathlib import Path
from typing import Any

from wirekube.entrypoint import console_script, fail
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


def _topologies(args: argparse.Namespace) -> int:
    from wirekube.lab.topology import BUILTIN_DESCRIPTIONS

    width = max(map(len, BUILTIN_DESCRIPTIONS))
    for name, description in BUILTIN_DESCRIPTIONS.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from wirekube.lab import orchestrate, scenario
    from wirekube.lab.topology import TopologyError, UnknownTopology, resolve_topology

    try:
        topology = resolve_topology(args.topology)
    except UnknownTopology as e:
        return fail("wirekube-lab up", e, 2)
    except TopologyError as e:  # every problem on its own line, each message on one line
        count = len(e.problems)
        print(f"wirekube-lab up: {e.source}: {count} problem{'s' if count != 1 else ''}:", file=sys.stderr)
        for path, message in e.problems:
            print(f"  {path + ': ' if path else ''}{' '.join(message.split())}", file=sys.stderr)
        return 2
    started = time.monotonic()
    if topology.kubernetes == "kubelet":  # real kubelet nodes; WireKube is what `helm install` made
        return _up_kubelet(topology, args, time.monotonic())
    h = scenario.up(topology, args.name, wait=args.wait)
    lab, kube, _ = orchestrate.attach(args.name)
    data = _full_status(lab, kube, planes_timeout=60)
    print(_render(data, lab))
    elapsed = time.monotonic() - started
    st = orchestrate.state(args.name)
    since_agents = f"{time.time() - st['agents_started_at']:.0f}s after the agents started, " \
        if st.get("agents_started_at") else ""
    converged = f"; the mesh converged in {st['convergence_seconds']:.0f}s" if st.get("convergence_seconds") else ""
    ok = all(p["result"] != "fail" for p in data["planes"])
    nodes = sorted(lab.nodes)
    a, b = nodes[0], nodes[-1]
    print(f"{'all four planes pass' if ok else 'NOT every plane passes (see above)'}: "
          f"checked {since_agents}{elapsed:.0f}s after `up` began{converged}\n"
          f"explore:  wirekube-lab exec {a} -- ip -br addr     wirekube-lab ping {a} {b}\n"
          f"          KUBECONFIG={h.admin_kubeconfig} wirekubectl status\n"
          f"remove:   wirekube-lab down" + ("" if args.name == DEFAULT_NAME else f" --name {args.name}"))
    return 0 if ok else 1


def _up_kubelet(topology: Any, args: argparse.Namespace, started: float) -> int:
    from wirekube.lab import orchestrate

    h = orchestrate.up(topology, args.name, wait=max(args.wait, 240.0))
    lab, kube, _ = orchestrate.attach(args.name)
    data = orchestrate.collect(lab, kube)
    kube.close()
    print(orchestrate.render_status(data, lab.log_dir))
    st = orchestrate.state(args.name)
    usage = ", ".join(f"{n} {u['rss_mb']:.0f} MB" for n, u in (st.get("usage") or {}).items())
    print(f"{'converged' if st.get('converged') else 'NOT converged'} {time.monotonic() - started:.0f}s after `up` "
          f"began (nodes Ready after {st.get('nodes_ready_seconds')}s); kubelet+containerd RSS per node: {usage}\n"
          f"explore:  KUBECONFIG={h.admin_kubeconfig} kubectl -n wirekube-system get pods -o wide\n"
          f"          KUBECONFIG={h.admin_kubeconfig} helm test wirekube -n wirekube-system\n"
          f"remove:   wirekube-lab down" + ("" if args.name == DEFAULT_NAME else f" --name {args.name}"))
    return 0 if st.get("converged") else 1


def _full_status(lab: Any, kube: Any, planes_timeout: float = 0.0) -> dict[str, Any]:
    """Nodes, pairs, gateways and planes; ``planes_timeout`` > 0 waits that long for the planes
    to pass (right after `up`, a pod path may still be settling)."""
    from wirekube.lab import orchestrate, scenario

    data = orchestrate.collect(lab, kube)
    planes = scenario.check_planes(lab, kube, data["pairs"])
    if planes_timeout > 0 and not all(p.ok or p.total == 0 for p in planes):
        planes = scenario.wait_planes(lab, kube, planes_timeout)
    data["gateways"] = scenario.collect_gateways(kube)
    data["planes"] = [p.to_json() for p in planes]
    return data


def _render(data: dict[str, Any], lab: Any) -> str:
    from wirekube.lab import orchestrate, scenario

    out = orchestrate.render_status(data, lab.log_dir)
    gateways = scenario.render_gateways(data["gateways"])
    planes = scenario.render_planes([scenario.Plane(p["name"], p["path"], p["total"], p["passed"], p["rttMs"],
                                                    p["failures"]) for p in data["planes"]])
    return out + ("\n" + gateways if gateways else "") + "\n" + planes


def _status(args: argparse.Namespace) -> int:
    from wirekube.lab import orchestrate

    lab, kube, _ = orchestrate.attach(args.name)
    data = _full_status(lab, kube)
    if args.json:
        print(json.dumps({"nodes": [{k: n[k] for k in ("name", "site", "natType", "meshIP")} for n in data["nodes"]],
                          "pairs": [{k: p[k] for k in ("from", "to", "transport", "rttMs")} for p in data["pairs"]],
                          "gateways": data["gateways"], "planes": data["planes"],
                          "logs": str(lab.log_dir)}, indent=2))
    else:
        print(_render(data, lab), end="")
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


def _lab_name(text: str) -> str:
    from wirekube.lab.plan import check_lab_name

    try:
        check_lab_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wirekube-lab", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def named(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", default=DEFAULT_NAME, type=_lab_name, help="lab name (default %(default)s)")
        return p

    up = named(sub.add_parser("up", help="bring the whole lab up and wait for convergence"))
    up.add_argument("topology", nargs="?", default="default", metavar="NAME|FILE",
                    help="a built-in topology (`wirekube-lab topologies`) or a topology YAML file "
                         "(default: %(default)s)")
    up.add_argument("--wait", type=float, default=120.0, help="seconds to wait for convergence")
    up.set_defaults(func=_up)
    tp = sub.add_parser("topologies", help="list the built-in topologies, one line each")
    tp.set_defaults(func=_topologies)
    st = named(sub.add_parser("status", help="nodes, every ordered pair, gateways and the four planes"))
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


@console_script("wirekube-lab")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ControlPlaneError, WireKubeError) as e:
        print(f"wirekube-lab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
