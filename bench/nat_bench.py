#!/usr/bin/env python3
"""NAT traversal benchmarks on the default lab (real NATs, relay, agents, wireguard-go).

Writes three result files:

* ``convergence.json``: seconds from all agents started to every ordered pair passing traffic
  over the transport the NAT matrix predicts (default topology, 8 nodes, 56 pairs).
* ``failover.json``: the longest gap of a 10/s ping across a direct pair when UDP between
  their routers is cut, over N cuts (goal <= 2000 ms; the reference tolerates ~4000 ms), and how
  long the pair took to return to direct after each cut was lifted.
* ``relay_throughput.json``: iperf3 through the same pair (ec2-a -> ec2-b) direct and relayed
  (mesh relay.mode switched to always and back), runs interleaved, 1 and 4 streams; the ratio
  relayed/direct is the figure (goal >= 0.8 with one stream, >= 0.75 with four).

    python bench/nat_bench.py [--cuts 10] [--seconds 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from wirekube import k8s  # noqa: E402
from wirekube.lab import orchestrate  # noqa: E402
from wirekube.lab.topology import default_topology  # noqa: E402

RESULTS = HERE / "results"


def wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def mesh_ip(lab: Any, kube: k8s.Kube, node: str) -> str:
    return next(n["meshIP"] for n in orchestrate.collect_nodes(lab, kube) if n["name"] == node)


def transport(kube: k8s.Kube, a: str, b: str) -> str:
    return ((kube.get(k8s.PEERS, a).get("status") or {}).get("peerTransports") or {}).get(b, "")


def longest_gap(output: str) -> float:
    stamps = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.M)]
    return max((b - a for a, b in zip(stamps, stamps[1:], strict=False)), default=float("inf"))


def failover(lab: Any, kube: k8s.Kube, cuts: int) -> dict[str, Any]:
    a, b = "fullcone-1", "prc-1"
    dst = mesh_ip(lab, kube, b)
    wan = str(lab.routers["prc"].wan_ip)
    gaps, recoveries = [], []
    for i in range(cuts):
        wait_for(lambda: transport(kube, a, b) == "direct", 120, f"cut {i}: direct before the cut")
        pinger = lab.spawn(a, ["ping", "-D", "-n", "-i", "0.1", "-W", "1", "-w", "8", dst], pipe=True)
        head: list[str] = []
        deadline = time.monotonic() + 15
        while sum("bytes from" in ln for ln in head) < 15:
            line = pinger.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"cut {i}: no steady ping replies before the cut: {''.join(head)[-300:]}")
            head.append(line)
        lab.cut("fullcone", "udp", peer=wan)
        rest, _ = pinger.communicate(timeout=30)
        gaps.append(round(longest_gap("".join(head) + rest) * 1000, 1))
        lab.restore("fullcone")
        lifted = time.monotonic()
        wait_for(lambda: transport(kube, a, b) == "direct", 120, f"cut {i}: back to direct")
        recoveries.append(round(time.monotonic() - lifted, 2))
        print(f"cut {i + 1}/{cuts}: gap {gaps[-1]} ms, back to direct after {recoveries[-1]} s", file=sys.stderr)
    return {
        "description": "longest gap of a 10/s ping fullcone-1 -> prc-1 when UDP between their routers is cut",
        "cuts": cuts, "gaps_ms": gaps, "max_gap_ms": max(gaps), "median_gap_ms": statistics.median(gaps),
        "goal_ms": 2000, "reference_tolerance_ms": 4000, "ratio_to_reference": round(max(gaps) / 4000, 3),
        "recovery_seconds": recoveries, "direct_retry_interval_seconds": 10,
    }


def iperf(lab: Any, src: str, dst_ip: str, seconds: int, streams: int) -> dict[str, float]:
    out = lab.exec(src, ["iperf3", "-c", dst_ip, "-t", str(seconds), "-P", str(streams), "-J"],
                   timeout=seconds + 30, check=True).stdout
    data = json.loads(out)["end"]
    return {"mbit_s": round(data["sum_received"]["bits_per_second"] / 1e6, 1),
            "retransmits": data["sum_sent"].get("retransmits", 0)}


def set_relay_mode(kube: k8s.Kube, mode: str) -> None:
    kube.patch_merge(k8s.MESHES, "default", {"spec": {"relay": {"mode": mode}}})


def throughput(lab: Any, kube: k8s.Kube, seconds: int, rounds: int) -> dict[str, Any]:
    a, b = "ec2-a", "ec2-b"
    dst = mesh_ip(lab, kube, b)
    server = lab.spawn(b, ["iperf3", "-s", "-B", dst])
    wait_for(lambda: f"{dst}:5201" in lab.exec(b, ["ss", "-Hltn"]).stdout, 15, "iperf3 server listening")
    runs: dict[str, dict[int, list[float]]] = {"direct": {1: [], 4: []}, "relay": {1: [], 4: []}}
    try:
        for r in range(rounds):
            for mode, want in (("auto", "direct"), ("always", "relay")):
                set_relay_mode(kube, mode)
                wait_for(lambda: transport(kube, a, b) == want and orchestrate.ping(lab, a, dst) is not None,
                         90, f"{want} before iperf")
                for streams in (1, 4):
                    res = iperf(lab, a, dst, seconds, streams)
                    runs[want][streams].append(res["mbit_s"])
                    print(f"round {r + 1} {want} P{streams}: {res['mbit_s']} Mbit/s", file=sys.stderr)
    finally:
        set_relay_mode(kube, "auto")
        lab.stop(server)
    out: dict[str, Any] = {"description": "iperf3 ec2-a -> ec2-b over wire_kube (wireguard-go), direct vs relayed, "
                                          "interleaved in one run", "seconds_per_run": seconds, "rounds": rounds}
    for streams in (1, 4):
        d, rl = statistics.median(runs["direct"][streams]), statistics.median(runs["relay"][streams])
        out[f"streams_{streams}"] = {"direct": {"mbit_s": d, "runs": runs["direct"][streams]},
                                     "relay": {"mbit_s": rl, "runs": runs["relay"][streams]},
                                     "ratio": round(rl / d, 3) if d else None}
    out["goals"] = {"streams_1_ratio": 0.8, "streams_4_ratio": 0.75}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuts", type=int, default=10)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    name = f"bench{uuid.uuid4().hex[:4]}"
    overrides = {"relay": {"handshakeTimeoutSeconds": 10, "directRetryIntervalSeconds": 10}}
    try:
        started = time.monotonic()
        orchestrate.up(default_topology(), name, wait=120, mesh_overrides=overrides)
        st = orchestrate.state(name)
        lab, kube, _ = orchestrate.attach(name)
        (RESULTS / "convergence.json").write_text(json.dumps({
            "description": "agents started -> every ordered pair on its predicted transport (default lab)",
            "nodes": len(lab.nodes), "pairs": len(lab.nodes) * (len(lab.nodes) - 1),
            "convergence_seconds": st.get("convergence_seconds"), "goal_seconds": 30,
            "lab_up_total_seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
        (RESULTS / "failover.json").write_text(json.dumps(failover(lab, kube, args.cuts), indent=2) + "\n")
        (RESULTS / "relay_throughput.json").write_text(
            json.dumps(throughput(lab, kube, args.seconds, args.rounds), indent=2) + "\n")
        kube.close()
    finally:
        orchestrate.down(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
