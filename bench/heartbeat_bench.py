#!/usr/bin/env python3
"""Heartbeat cost per node at N idle peers: the agent's real heartbeat thread and ticker, counted
on the wire.

Two network namespaces joined by a veth pair (prefix ``wkhb-<pid>``): in the first, a
``Traversal`` with N peers (mesh IPs in 10.255.0.0/16, routed over the veth) runs its real
heartbeat thread (raw ICMP socket) and ticker; the second answers every echo to 10.255.0.0/16
(a ``local`` route), as each peer's kernel does.  The only stand-in is the WireGuard engine's
counters (no tunnel here): per peer they are exactly the heartbeat packets the raw socket saw
(``HEARTBEAT_WIRE_BYTES`` each), i.e. idle peers.  Packets/s is the veth's tx packet count over a
measuring window after a warm-up (the first seconds prove every path at the fast rate).

Baseline, from the same formula the issue names: the former fixed 2 Hz heartbeat to every peer
(2 x N packets/s).  WireGuard keepalives add nothing here: the persistent keepalive (25 s) is
reset by every packet sent, and an idle peer gets a heartbeat every 10 s.

Run by ``make bench-scale`` (bench/scale_bench.py puts the result under ``heartbeat`` in
bench/results/scale.json); alone, it updates that key of the file:

    python bench/heartbeat_bench.py [--sizes 100,1000] [--seconds 30] [--warmup 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

CHILD = textwrap.dedent("""
    import ipaddress, json, sys, threading, time
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from loguru import logger
    from wirekube.agent.traversal import Traversal, TraversalSettings
    from wirekube.agent.pathstate import Discovery, View
    from wirekube.agent.wg.base import WgDeviceState, WgPeerConfig, WgPeerState
    from wirekube.models import Endpoint, Mesh, MeshSpec, NatType, Peer, PeerSpec, PeerStatus, RelaySpec
    from wirekube.traversal import nat
    from wirekube.traversal.liveness import HEARTBEAT_WIRE_BYTES
    from tests.fixtures.keys import public_key

    logger.remove()
    n, warmup, seconds, dev = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    peers = []
    for i in range(n):
        ip = ipaddress.ip_address("10.255.0.0") + 10 + i
        peers.append(Peer(f"p{i}", PeerSpec(public_key(), Endpoint(ipaddress.ip_address("203.0.113.1"), 51820 + i),
                                             (ipaddress.ip_network(f"{ip}/32"),)),
                          PeerStatus(nat_type=NatType.OPEN)))
    keys = {p.name: p.spec.public_key for p in peers}
    holder = {}

    def engine():
        t = holder["t"]
        with t._lock:
            beats = {name: t.heartbeat.beats(name) for name in keys}
        out = {}
        for name, key in keys.items():
            b = beats.get(name)
            tx = HEARTBEAT_WIRE_BYTES * (b.sent + b.requests) if b else 0
            rx = HEARTBEAT_WIRE_BYTES * (b.answered + b.requests) if b else 0
            out[key] = WgPeerState(WgPeerConfig(key, None, ()), rx_bytes=rx, tx_bytes=tx)
        return WgDeviceState(peers=out)

    t = Traversal("me", X25519PrivateKey.generate(), public_key(), engine_state=engine, wake=lambda: None,
                  settings=TraversalSettings())
    holder["t"] = t
    t._view = View(Mesh("default", MeshSpec(relay=RelaySpec(handshake_timeout_seconds=600))),
                   {p.name: p for p in peers}, ("192.0.2.1",))
    t.discoverer.found = Discovery(nat=nat.Classification(NatType.OPEN, "192.0.2.1", 51820))
    t._sync_peers()
    t._spawn(t.heartbeat.run, "heartbeat")
    t._spawn(t.failover.run, "tick")

    def tx_packets():
        return int(open(f"/sys/class/net/{dev}/statistics/tx_packets").read())

    time.sleep(warmup)  # a bench's settling period, not a test's wait
    established = sum(1 for s in t._peers.values() if s.path.established)
    before, started = tx_packets(), time.monotonic()
    time.sleep(seconds)
    pps = (tx_packets() - before) / (time.monotonic() - started)
    t._stop.set()
    print(json.dumps({"peers": n, "established": established, "heartbeat_pps": round(pps, 2)}))
""")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def measure(n: int, warmup: float, seconds: float) -> dict[str, Any]:
    prefix = f"wkhb-{os.getpid()}"
    a, b = f"{prefix}-a", f"{prefix}-b"
    sh("ip", "netns", "add", a)
    try:
        sh("ip", "netns", "add", b)
        sh("ip", "-n", a, "link", "add", "hb0", "type", "veth", "peer", "name", "hb1", "netns", b)
        sh("ip", "-n", a, "addr", "add", "192.0.2.1/30", "dev", "hb0")
        sh("ip", "-n", b, "addr", "add", "192.0.2.2/30", "dev", "hb1")
        for ns, dev in ((a, "hb0"), (b, "hb1")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", a, "route", "add", "10.255.0.0/16", "via", "192.0.2.2")
        sh("ip", "-n", b, "route", "add", "local", "10.255.0.0/16", "dev", "lo")
        sh("ip", "netns", "exec", b, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
        env = dict(os.environ, PYTHONPATH=f"{HERE.parent / 'python'}:{HERE.parent}")
        out = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", CHILD, str(n), str(warmup),
                              str(seconds), "hb0"], check=True, capture_output=True, text=True, env=env,
                             timeout=warmup + seconds + 120)
        row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    row["baseline_2hz_pps"] = 2.0 * n
    row["ratio_over_2hz"] = round(row["heartbeat_pps"] / row["baseline_2hz_pps"], 4)
    # Path MTU checks are probes too (one echo per check): their rate at N idle peers, from the
    # agent's real schedule run over 10 simulated minutes (no packets needed to count them).
    row["pmtu_check_pps"] = pmtu_checks_per_second(n)
    row["probe_pps"] = round(row["heartbeat_pps"] + row["pmtu_check_pps"], 1)
    row["probe_ratio_over_2hz"] = round(row["probe_pps"] / row["baseline_2hz_pps"], 4)
    return row


def pmtu_checks_per_second(n: int, seconds: int = 600) -> float:
    sys.path.insert(0, str(HERE.parent / "python"))
    from wirekube.traversal.pmtu import Schedule

    schedule = Schedule()
    names = [f"p{i}" for i in range(n)]
    schedule.follow({name: f"198.51.100.1:{i + 1024}" for i, name in enumerate(names)}, idle=names)
    for name in names:
        schedule.searched(name, 1420, 0.0)
    checks = 0
    for now in range(1, seconds + 1):
        due = schedule.to_check(float(now))
        checks += len(due)
        for name, _ in due:
            schedule.checked(name, True, float(now))
    return round(checks / seconds, 1)


def heartbeat_cost(sizes: list[int], seconds: float = 30.0, warmup: float = 15.0) -> dict[str, Any]:
    rows = []
    for n in sizes:
        rows.append(measure(n, warmup, seconds))
        print(f"heartbeat {n} idle peers: {rows[-1]}", file=sys.stderr)
    return {"description": "heartbeat packets/s per node at N idle peers: the agent's heartbeat thread and ticker "
                           "sending real ICMP over a veth to a namespace answering for every mesh IP; baseline "
                           "is the former fixed 2 Hz per peer (2 x N); probe_pps adds the path MTU checks "
                           "(idle peers: one per 30 s) counted from the agent's schedule",
            "load_average": round(os.getloadavg()[0], 2),
            "idle": {str(r["peers"]): r for r in rows},
            "goals": {"probe_ratio_over_2hz_at_1000": 0.1}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = p.parse_args()
    out = heartbeat_cost([int(x) for x in args.sizes.split(",")], args.seconds, args.warmup)
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.exists() else {}
    data["heartbeat"] = out
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
