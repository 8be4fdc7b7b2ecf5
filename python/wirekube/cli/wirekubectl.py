"""``wirekubectl``: operator commands.  For now: ``cleanup`` (remove WireKube from this node)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from wirekube.agent.cleanup import cleanup
from wirekube.agent.wg.userspace import SOCKET_DIR
from wirekube.errors import WireKubeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wirekubectl")
    sub = parser.add_subparsers(dest="command", required=True)
    clean = sub.add_parser(
        "cleanup",
        help="remove WireKube's interface, rules, table 22347 routes and nft table from this node",
    )
    clean.add_argument("--interface", default="wire_kube", help="WireGuard interface name (mesh spec.interfaceName)")
    clean.add_argument("--socket-dir", type=Path, default=SOCKET_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        try:
            report = cleanup(args.interface, args.socket_dir)
        except WireKubeError as e:
            print(f"wirekubectl cleanup: {e}", file=sys.stderr)
            return 1
        print(json.dumps({**asdict(report), "changed": report.changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
