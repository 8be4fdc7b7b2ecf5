#!/usr/bin/env python3
"""Control-plane scale: one agent's view of 100..1,000 peers, and the relay with 1,000 clients.

Writes ``bench/results/scale.json``:

* agent: for N peers in the real API server (created through it, like real agents would),
  a fresh process syncs the informers and runs a full plan+diff against an empty node; then one
  peer changes and the agent re-plans. Reported: wall and CPU seconds of the full reconcile and
  of the reaction to one change, and the process's peak RSS, for each N (growth 100 -> 1,000).
  Goal: full reconcile of 1,000 peers <= 2 s CPU and <= 150 MB RSS.
* relay: 1,000 clients each proving key ownership on one relay on 127.0.0.1: handshakes per
  second and the relay's RSS. Goal: <= 200 MB RSS.

    python bench/scale_bench.py [--sizes 100,300,1000] [--relay-clients 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.fixtures.keys import public_key  # noqa: E402
from wirekube import ipam, k8s  # noqa: E402
from wirekube.lab.cluster import ControlPlane  # noqa: E402

AGENT_VIEW = textwrap.dedent("""
    import ipaddress, json, resource, sys, time
    from wirekube import k8s
    from wirekube.agent import plan as planner
    from wirekube.agent.plan import LinkState, NodeFacts, Observed
    from wirekube.agent.source import KubeSource
    from wirekube.agent.wg.base import WgDeviceState

    kubeconfig, changed = sys.argv[1], sys.argv[2]
    kube = k8s.Kube.from_kubeconfig(kubeconfig)
    src = KubeSource(kube, "bench-node").start()
    t0, c0 = time.monotonic(), time.process_time()
    src.peers.wait_synced(120); src.meshes.wait_synced(120)
    while src.snapshot() is None: time.sleep(0.05)
    synced = (time.monotonic() - t0, time.process_time() - c0)
    facts = NodeFacts(name="bench-node", public_key="x" * 43 + "=", addresses=(ipaddress.ip_address("192.0.2.1"),))
    empty = Observed(LinkState(False), WgDeviceState(), (), ())

    def reconcile():
        snap = src.snapshot()
        desired = planner.plan(snap.mesh, snap.peers, facts, {})
        return planner.diff(desired, empty, time.time())

    t0, c0 = time.monotonic(), time.process_time()
    ops = reconcile()
    full = (time.monotonic() - t0, time.process_time() - c0)
    rv = src.peers.cache[changed]["metadata"]["resourceVersion"]
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # the parent changes one peer now
    while src.peers.cache[changed]["metadata"]["resourceVersion"] == rv: time.sleep(0.01)
    t0, c0 = time.monotonic(), time.process_time()
    ops2 = reconcile()
    one = (time.monotonic() - t0, time.process_time() - c0)
    print(json.dumps({"peers": len(src.snapshot().peers), "ops": len(ops), "sync_s": synced[0], "sync_cpu_s": synced[1],
                      "full_reconcile_s": full[0], "full_reconcile_cpu_s": full[1],
                      "one_change_s": one[0], "one_change_cpu_s": one[1],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    src.stop()
""")


def peer_body(i: int) -> dict[str, Any]:
    name = f"node-{i:05d}"
    ip = ipam.mesh_ip(name, "10.255.0.0/16")
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer",
            "metadata": {"name": name, "labels": {"wirekube.io/node": name}},
            "spec": {"publicKey": public_key(), "endpoint": f"198.51.{i // 250}.{i % 250 + 1}:51820",
                     "allowedIPs": [f"{ip}/32", f"10.{100 + i // 256}.{i % 256}.0/24"]}}


def agent_scale(sizes: list[int]) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlane(Path(tmp) / "cluster").up()
        try:
            kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
            kube.create(k8s.MESHES, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeMesh",
                                     "metadata": {"name": "default"}, "spec": {}})
            created = 0
            for n in sizes:
                started = time.monotonic()
                while created < n:
                    kube.create(k8s.PEERS, peer_body(created))
                    created += 1
                create_s = time.monotonic() - started
                proc = subprocess.Popen([sys.executable, "-c", AGENT_VIEW, cp.kubeconfig, "node-00000"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert proc.stdin and proc.stdout
                assert json.loads(proc.stdout.readline())["ready"]
                kube.patch_merge(k8s.PEERS, "node-00000", {"spec": {"endpoint": f"203.0.113.{n % 250 + 1}:51820"}})
                proc.stdin.write("\n")
                proc.stdin.flush()
                row = json.loads(proc.stdout.readline())
                proc.wait(60)
                row["create_peers_s"] = round(create_s, 2)
                results.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
                print(f"agent view {n}: {results[-1]}", file=sys.stderr)
            kube.close()
        finally:
            cp.down()
    return results


RELAY_CLIENTS = textwrap.dedent("""
    import asyncio, json, resource, sys, time
    import uvloop
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from wirekube.relay.client import RelayClient
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    async def main():
        keys = [X25519PrivateKey.generate() for _ in range(n)]
        sem = asyncio.Semaphore(64)
        async def one(k):
            async with sem:
                return await RelayClient.connect(host, port, k)
        t0 = time.monotonic()
        clients = await asyncio.gather(*(one(k) for k in keys))
        took = time.monotonic() - t0
        print(json.dumps({"connected": len(clients), "seconds": took}), flush=True)
        sys.stdin.readline()
        for c in clients: await c.close()
    uvloop.run(main())
""")


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def relay_scale(n: int) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    relay = subprocess.Popen(
        [str(Path(sys.executable).parent / "wirekube-relay"), f"--listen=127.0.0.1:{port}",
         "--stun-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0", "--log-level=WARNING",
         f"--max-connections={n + 100}"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        idle = _rss_mb(relay.pid, "VmRSS")
        clients = subprocess.Popen([sys.executable, "-c", RELAY_CLIENTS, "127.0.0.1", str(port), str(n)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert clients.stdin and clients.stdout
        row = json.loads(clients.stdout.readline())
        held = _rss_mb(relay.pid, "VmRSS")
        peak = _rss_mb(relay.pid, "VmHWM")
        clients.stdin.write("\n")
        clients.stdin.flush()
        clients.wait(120)
    finally:
        relay.terminate()
        relay.wait(20)
    return {"clients": row["connected"], "handshake_seconds": round(row["seconds"], 2),
            "handshakes_per_second": round(row["connected"] / row["seconds"], 1),
            "relay_rss_idle_mb": round(idle, 1), "relay_rss_with_clients_mb": round(held, 1),
            "relay_peak_rss_mb": round(peak, 1), "goal_rss_mb": 200}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,300,1000")
    p.add_argument("--relay-clients", type=int, default=1000)
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    out = {"description": "control-plane scale: one agent's view of N peers in the real API server (informer "
                          "sync, then plan+diff against an empty node: the CPU of deciding, not of netlink/UAPI "
                          "writes); the relay holding N authenticated clients",
           "agent": agent_scale(sizes), "relay": relay_scale(args.relay_clients),
           "goals": {"full_reconcile_cpu_s_at_1000": 2.0, "agent_rss_mb_at_1000": 150, "relay_rss_mb_at_1000": 200}}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scale.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
