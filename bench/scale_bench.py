#!/usr/bin/env python3
"""Control-plane scale: one agent's view of 100..1,000 peers, and the relay with 1,000 clients.

Writes ``bench/results/scale.json``:

* agent: for N peers in the real API server (created through it, like real agents would), a
  fresh process syncs the informers and runs the agent's real ``Reconciler`` against a node
  whose dataplane is kept in memory (so the figures are the CPU of deciding: informer cache ->
  snapshot -> plan -> diff -> status, not netlink/UAPI round trips):
  - full reconcile: the first pass, on an empty node (everything planned and written);
  - one change: the event-driven pass after one WireKubePeer changed (median of 5 changes of
    different peers), and its ratio to the full reconcile;
  - resync: the periodic full pass on the converged node (plans from scratch, diffs everything,
    applies nothing).
  Also the process's peak RSS.  Goals at 1,000 peers: full reconcile <= 2 s CPU and
  <= 150 MB RSS; one change well under 10 % of a full reconcile's CPU.
* relay: 1,000 clients each proving key ownership on one relay on 127.0.0.1: handshakes per
  second and the relay's RSS. Goal: <= 200 MB RSS.
* heartbeat: probe packets/s per node at 100 and 1,000 idle peers (the real heartbeat thread on a
  veth, plus the path MTU checks; bench/heartbeat_bench.py). Goal at 1,000: at most 10 % of the
  former fixed 2 Hz per peer.

    python bench/scale_bench.py [--sizes 100,300,1000] [--relay-clients 1000]
"""

from __future__ import annotations

import argparse
import json
import os
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
    import base64, ipaddress, json, resource, statistics, sys, time
    from dataclasses import replace
    from loguru import logger
    from wirekube import k8s
    from wirekube.agent import reconcile as R
    from wirekube.agent.keys import KeyPair
    from wirekube.agent.plan import LinkState
    from wirekube.agent.source import KubeSource
    from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgDeviceState, WgPeerConfig, WgPeerState
    from wirekube.models import PeerStatus

    logger.remove()  # the agent's log lines are I/O, not deciding
    kubeconfig, changes = sys.argv[1], sys.argv[2].split(",")
    MY_KEY = base64.b64encode(bytes([1]) * 32).decode()

    class Dataplane:
        # The node's link, rules, table 22347 and WireGuard device, in memory: the passes below
        # pay for deciding, not for netlink/UAPI round trips.
        name, ifname = "memory", "wire_kube"
        def __init__(self):
            self.link, self.rule_list, self.route_set, self.wg = LinkState(False), [], {}, WgDeviceState()
        def node_addresses(self, ifname):
            return (ipaddress.ip_address("192.0.2.1"),), (ipaddress.ip_network("192.0.2.0/24"),)
        def link_state(self, ifname, sysctls): return self.link
        def rules(self): return tuple(self.rule_list)
        def routes(self, table): return tuple(self.route_set)
        def set_mtu(self, ifname, mtu): self.link = replace(self.link, mtu=mtu)
        def set_up(self, ifname): self.link = replace(self.link, up=True)
        def add_address(self, ifname, a): self.link = replace(self.link, addresses=self.link.addresses | {a})
        def del_address(self, ifname, a): self.link = replace(self.link, addresses=self.link.addresses - {a})
        def set_sysctl(self, ifname, n, v): self.link = replace(self.link, sysctls={**self.link.sysctls, n: v})
        def add_route(self, r): self.route_set[r] = None
        def del_route(self, r): self.route_set.pop(r, None)
        def add_rule(self, r): self.rule_list.append(r)
        def del_rule(self, r): self.rule_list.remove(r)
        def ensure_device(self):
            if self.link.exists:
                return False
            self.link = LinkState(True, 1500)
            return True
        def get(self): return self.wg
        def apply(self, ops, private_key):
            peers, s = dict(self.wg.peers), self.wg
            for op in ops:
                if isinstance(op, SetDevice):
                    s = replace(s, public_key=MY_KEY, listen_port=op.listen_port or s.listen_port,
                                fwmark=op.fwmark or s.fwmark)
                elif isinstance(op, PutPeer):
                    old = peers.get(op.config.public_key)
                    cur = old.config if old is not None else WgPeerConfig(op.config.public_key, None, ())
                    peers[cur.public_key] = WgPeerState(WgPeerConfig(
                        cur.public_key, op.config.endpoint if op.set_endpoint else cur.endpoint,
                        op.config.allowed_ips if op.set_allowed_ips else cur.allowed_ips,
                        op.config.persistent_keepalive if op.set_keepalive else cur.persistent_keepalive))
                elif isinstance(op, RemovePeer):
                    peers.pop(op.public_key, None)
            self.wg = replace(s, peers=peers)
        def set_on_restart(self, callback): pass
        def close(self): pass

    class View:
        # The API-server source minus its writes (registration, status, Events).
        def __init__(self, src): self.src = src
        def snapshot(self): return self.src.snapshot()
        def register(self, public_key): pass
        def publish(self, status, skipped): pass
        def own_status(self): return PeerStatus()
        def report_refusals(self, refusals): pass

    kube = k8s.Kube.from_kubeconfig(kubeconfig)
    src = KubeSource(kube, "bench-node").start()
    t0, c0 = time.monotonic(), time.process_time()
    src.peers.wait_synced(120); src.meshes.wait_synced(120)
    while src.snapshot() is None: time.sleep(0.05)
    synced = (time.monotonic() - t0, time.process_time() - c0)
    dp = Dataplane()
    R.select_engine = lambda *a: dp
    rec = R.Reconciler(R.ReconcilerSettings("bench-node", resync_seconds=3600), KeyPair("unused", MY_KEY),
                       View(src), dp)

    def timed(**kw):
        t0, c0 = time.monotonic(), time.process_time()
        result = rec.reconcile_once(**kw)
        return result, time.monotonic() - t0, time.process_time() - c0

    first, full_s, full_cpu = timed()
    assert first.full
    again, _, _ = timed()
    assert not again.full and again.ops == (), again.ops
    samples = []
    for name in changes:
        rv = src.peers.cache[name]["metadata"]["resourceVersion"]
        print(json.dumps({"change": name}), flush=True)
        sys.stdin.readline()  # the parent has changed peer `name` now
        while src.peers.cache[name]["metadata"]["resourceVersion"] == rv: time.sleep(0.01)
        result, wall, cpu = timed()
        assert not result.full, "an event-driven pass was expected"
        samples.append((cpu, wall, len(result.ops)))
    resync, resync_s, resync_cpu = timed(full=True)
    assert resync.full and resync.ops == (), resync.ops
    cpu = statistics.median(s[0] for s in samples)
    print(json.dumps({"peers": len(src.snapshot().peers), "ops": len(first.ops),
                      "sync_s": synced[0], "sync_cpu_s": synced[1],
                      "full_reconcile_s": full_s, "full_reconcile_cpu_s": full_cpu,
                      "one_change_s": statistics.median(s[1] for s in samples), "one_change_cpu_s": cpu,
                      "one_change_cpu_max_s": max(s[0] for s in samples),
                      "one_change_ops": max(s[2] for s in samples),
                      "one_change_cpu_ratio": cpu / full_cpu,
                      "resync_s": resync_s, "resync_cpu_s": resync_cpu, "resync_ops": len(resync.ops),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    src.stop()
""")
CHANGES = 5
"""One-peer changes per size (the median is reported: one sub-millisecond sample is noisy)."""


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
                changed = [f"node-{i * n // CHANGES:05d}" for i in range(CHANGES)]
                proc = subprocess.Popen([sys.executable, "-c", AGENT_VIEW, cp.kubeconfig, ",".join(changed)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert proc.stdin and proc.stdout
                for k, name in enumerate(changed):
                    assert json.loads(proc.stdout.readline()) == {"change": name}
                    kube.patch_merge(k8s.PEERS, name, {"spec": {"endpoint": f"203.0.113.{(n + k) % 250 + 1}:51820"}})
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                row = json.loads(proc.stdout.readline())
                assert proc.wait(60) == 0
                row["create_peers_s"] = round(create_s, 2)
                results.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
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
    p.add_argument("--parts", default="agent,relay,watch,conditions,heartbeat",
                   help="which parts to run (agent, relay, watch, conditions, heartbeat); parts not run keep "
                        "their last results")
    p.add_argument("--sizes", default="100,300,1000")
    p.add_argument("--relay-clients", type=int, default=1000)
    p.add_argument("--watch-sizes", default="100,1000,5000",
                   help="N for the watch fan-out part (from 5,000 on, split runs lean: see bench/watch_scale.py)")
    p.add_argument("--watchers", type=int, default=30, help="real watching agents (W) per run")
    p.add_argument("--wave-nodes", type=int, default=30, help="nodes whose convergence-wave writes are sampled")
    p.add_argument("--layouts", default="v1alpha1,split",
                   help="v1alpha1 = the old all-on-WireKubePeer status; split = issue 20's layout")
    p.add_argument("--watch-rows-from", default="",
                   help="comma-separated stderr logs of earlier runs: their 'watch <layout> <N>: {...}' rows are "
                        "kept beside this run's (a row measured now replaces the same layout and N)")
    p.add_argument("--old-layout-max-nodes", type=int, default=1000,
                   help="largest N run with the v1alpha1 layout (its objects grow with N^2: at 5,000 ~2.2 GB of "
                        "etcd, beyond etcd's 2 GB quota, and an API server of ~30 GB RSS, beyond this machine's "
                        "24 GiB; larger N are extrapolated from the two largest runs)")
    p.add_argument("--populate-threads", type=int, default=6,
                   help="concurrent writers while creating the N nodes' objects (bounded, with retries)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    path = HERE / "results" / "scale.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if "agent" in parts:
        sizes = [int(x) for x in args.sizes.split(",")]
        agent = agent_scale(sizes)
        out["agent"] = agent
        # The same figures keyed by size (the report flattens mappings, not lists).
        out["agent_summary"] = {str(row["peers"]): {k: row[k] for k in (
            "one_change_cpu_ratio", "full_reconcile_cpu_s", "one_change_cpu_s", "resync_cpu_s", "peak_rss_mb")}
            for row in agent}
    if "relay" in parts:
        out["relay"] = relay_scale(args.relay_clients)
    if "watch" in parts:
        out["watch"] = watch_part(args)
    if "conditions" in parts:
        from bench import watch_scale

        with tempfile.TemporaryDirectory() as tmp:
            out["relay_condition"] = watch_scale.relay_condition_probe(Path(tmp))
    if "heartbeat" in parts:
        sys.path.insert(0, str(HERE))
        import heartbeat_bench

        out["heartbeat"] = heartbeat_bench.heartbeat_cost([100, 1000])
    out["description"] = (
        "control-plane scale: one agent's view of N peers in the real API server (informer "
        "sync, then the agent's Reconciler against an in-memory node: a full reconcile of an "
        "empty node, the event-driven pass after one peer changed (median of 5), and a periodic "
        "full resync of the converged node; the CPU of deciding, not of netlink/UAPI I/O); "
        "the relay holding N authenticated clients; watch: the bytes every watching agent receives "
        "for one status change and for a convergence wave, today's layout against issue 20's, "
        "in the same run (see bench/watch_scale.py)")
    if isinstance(out.get("watch"), dict) and out["watch"].get("rows"):
        out["description"] += ". Watch at N = 5,000: " + watch_note(out["watch"])
    rc = out.get("relay_condition")
    if isinstance(rc, dict) and rc.get("peer_object_bytes"):
        sz, ev = rc["peer_object_bytes"], rc["watch_event_bytes_per_agent"]
        where = rc.get("written_to", "WireKubePeer")
        out["description"] += (
            f" Not in the bench's objects: the agent's RelayUnreachable condition (set in a full relay outage, "
            f"False after it, and kept), written where the agent writes it ({where}), leaves the WireKubePeer at "
            f"{sz['relay_unreachable_true']} B while True and {sz['relay_unreachable_false_stays']} B after "
            f"({sz['bench_shape']} B before); its two writes send {ev['true']} + {ev['false']} B to every agent, "
            f"so a relay outage and its recovery at {rc['nodes']:,} nodes cost {rc['outage_and_recovery_watch_gb']} GB "
            f"of watch traffic (part conditions, one node against the real API server).")
    out["goals"] = {"full_reconcile_cpu_s_at_1000": 2.0, "agent_rss_mb_at_1000": 150, "relay_rss_mb_at_1000": 200,
                    "one_change_cpu_ratio_at_1000": 0.1, "peer_object_bytes_at_5000": 2048,
                    "one_change_bytes_per_agent_at_5000": 2048, "wave_watch_gb_at_5000": 20}
    (HERE / "results").mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


def old_layout_at(rows: list[dict[str, Any]], target: int) -> dict[str, Any]:
    """Why the v1alpha1 layout is not run at ``target`` here: its etcd size and API server memory,
    estimated from its largest measured run (its objects' bytes grow with N^2; the API server's
    RSS above its empty baseline is taken to grow the same way)."""
    old = sorted((r for r in rows if r["layout"] == "v1alpha1"), key=lambda r: r["nodes"])
    if not old:
        return {}
    r, base = old[-1], old[0]
    k = (target / r["nodes"]) ** 2
    base_rss = base["apiserver_rss_mb_populated"]
    rss = base_rss + (r["apiserver_rss_mb_populated"] - base_rss) * k
    return {"from_nodes": r["nodes"], "etcd_db_mb_estimate": round(r["etcd_db_mb"] * k),
            "etcd_quota_mb": 2048, "apiserver_rss_mb_estimate": round(rss),
            "machine_memory_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)}


def watch_note(watch: dict[str, Any]) -> str:
    """One sentence for the report: what at N = 5,000 was measured, how, and at what load."""
    at = watch.get("at_5000") or {}
    split, old = at.get("split") or {}, at.get("v1alpha1") or {}
    five = next((r for r in watch.get("rows", []) if r["layout"] == "split" and r["nodes"] == 5000), None)
    parts = []
    if five is not None and split.get("measured"):
        d = five.get("during_run", {})
        lean = (f"lean: only the {five['wave_sample']['nodes']} sampled nodes have reports and send signals, "
                "everything agents watch is complete; ") if five.get("lean") else ""
        parts.append(f"N = 5,000 with the split layout is measured ({lean}{five['populate_s']} s to create the "
                     f"objects, {five.get('retries', 0)} retried writes; API server RSS at most "
                     f"{d.get('apiserver_rss_mb_peak')} MB, etcd {d.get('etcd_rss_mb_peak')} MB; load average "
                     f"(1 min) {d.get('load_1m_min')}-{d.get('load_1m_max')}, mean {d.get('load_1m_mean')})")
    else:
        parts.append("N = 5,000 is extrapolated for both layouts")
    why = old.get("not_run_because") or {}
    if old and not old.get("measured") and why:
        parts.append(f"the old layout at 5,000 is extrapolated from its measured {old.get('from_nodes')} runs "
                     f"(not run: ~{why['etcd_db_mb_estimate']} MB of etcd against a {why['etcd_quota_mb']} MB quota, "
                     f"and an API server of ~{why['apiserver_rss_mb_estimate']} MB RSS on a "
                     f"{why['machine_memory_mb']} MB machine, from its {why['from_nodes']}-node run)")
    return "; ".join(parts) + "."


def watch_part(args: argparse.Namespace) -> dict[str, Any]:
    import datetime

    from bench import watch_scale

    sizes = [int(x) for x in args.watch_sizes.split(",") if x]
    rows = []
    logged = []
    for log in filter(None, args.watch_rows_from.split(",")):
        for line in Path(log).read_text().splitlines():
            if line.startswith("watch ") and ": {" in line:
                row = json.loads(line.split(": ", 1)[1])
                row["from_log"] = Path(log).name
                logged.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            run = [n for n in sizes if layout != "v1alpha1" or n <= args.old_layout_max_nodes]
            rows += watch_scale.run_layout(layout, run, args.watchers, args.wave_nodes, Path(tmp),
                                           threads=args.populate_threads)
    measured = {(r["layout"], r["nodes"]) for r in rows}
    rows = [r for r in logged if (r["layout"], r["nodes"]) not in measured] + rows
    # A wave whose signals reached no watching agent within the 1 s grace (a loaded machine) left
    # their size unmeasured: take it from a run that measured it (a signal's size does not depend on N).
    known = [r["wave_total"]["event_bytes_mean"]["signals"] for r in rows
             if r["wave_total"]["event_bytes_mean"].get("signals")]
    for r in rows:
        wt = r["wave_total"]
        if wt["writes_per_node"].get("signals") and not wt["event_bytes_mean"].get("signals") and known:
            wt["event_bytes_mean"]["signals"] = max(known)
            wt["signal_event_bytes_from_another_run"] = True
            wt["watch_bytes"] = round(r["nodes"] * wt["writes_per_node"]["signals"] * max(known)
                                      + r["nodes"] * wt["writes_per_node"]["peers"] * r["nodes"]
                                      * wt["event_bytes_mean"]["peers"])
            wt["watch_gb"] = round(wt["watch_bytes"] / 1e9, 3)
    load = Path("/proc/loadavg").read_text().split()[:3]
    at = watch_scale.projection(rows, 5000)
    split = at.get("split", {})
    old_at = at.get("v1alpha1", {})
    if old_at and not old_at.get("measured"):
        old_at["not_run_because"] = old_layout_at(rows, 5000)
    acceptance = {}
    if split:
        acceptance = {
            "peer_object_bytes_at_5000": split["peer_object_bytes"],
            "peer_object_at_most_2kb": split["peer_object_bytes"] <= 2048,
            "one_transport_change_bytes_per_agent_at_5000": split["one_change_bytes_per_agent"],
            "one_transport_change_at_most_2kb": split["one_change_bytes_per_agent"] <= 2048,
            "wave_watch_gb_at_5000": split["wave_watch_gb"],
            "wave_at_most_20gb": split["wave_watch_gb"] <= 20,
            "wave_watch_gb_at_5000_v1alpha1": old_at.get("wave_watch_gb"),
            "v1alpha1_at_5000_measured": old_at.get("measured", False),
            "measured_at_5000": split.get("measured", False)}
        five = next((r for r in rows if r["layout"] == "split" and r["nodes"] == 5000), None)
        if five is not None:
            acceptance["measured_at_5000_lean"] = bool(five.get("lean"))
            acceptance["load_1m_during_5000_run"] = {k: five.get("during_run", {}).get(k)
                                                     for k in ("load_1m_min", "load_1m_mean", "load_1m_max")}
    return {"when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_average": [float(x) for x in load],
            "watchers": args.watchers, "wave_nodes_sampled": args.wave_nodes,
            "rows": rows, "at_5000": at, "acceptance": acceptance,
            # keyed by layout and N, for bench/report.py (it flattens mappings, not lists)
            "summary": {f"{r['layout']}_{r['nodes']}": {
                "peer_object_bytes": r["peer_object_bytes_max"],
                "one_change_bytes_per_agent": r["one_change"]["bytes_per_agent_max"],
                "wave_watch_gb": r["wave_total"]["watch_gb"],
                "wave_apiserver_cpu_s_per_node": round(r["wave_sample"]["apiserver_cpu_s"]
                                                       / r["wave_sample"]["nodes"], 4)} for r in rows}}


if __name__ == "__main__":
    sys.exit(main())
