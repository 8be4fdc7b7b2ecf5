#!/usr/bin/env python3
"""Steady-state status writes per node in the default lab (issue 20, item 2).

Brings up the default lab (``wirekube.lab.orchestrate.up``, unique name, torn down afterwards),
waits until it has converged, then counts for ``--minutes`` every write the API server delivers
on the objects agents write about themselves: WireKubePeer (by name), WireKubeNodeReport (by
name) and WireKubePairSignal (by its ``wirekube.io/from`` label), and every ``TransportChanged``
Event (a path change, which legitimately causes a write). Goal: at most one status write per node
per 10 minutes without a path change.

Writes ``bench/results/writes.json``.

    python bench/writes_bench.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from wirekube import errors, k8s  # noqa: E402
from wirekube.lab import orchestrate  # noqa: E402
from wirekube.lab.topology import default_topology  # noqa: E402
from wirekube.models import LABEL_SIGNAL_FROM  # noqa: E402


def count_writes(kube: k8s.Kube, minutes: float) -> dict[str, Any]:
    stop = threading.Event()
    lock = threading.Lock()
    writes: dict[str, dict[str, int]] = {}
    fields: dict[str, dict[str, int]] = {}
    last: dict[tuple[str, str], dict[str, Any]] = {}

    def owner(res: k8s.Resource, obj: dict[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        if res is k8s.PAIR_SIGNALS:
            return str((meta.get("labels") or {}).get(LABEL_SIGNAL_FROM, "?"))
        return str(meta.get("name", "?"))

    def run(res: k8s.Resource) -> None:
        try:
            items, rv = kube.list(res)
        except errors.NotFound:
            return
        for obj in items:
            last[(res.plural, obj["metadata"]["name"])] = obj
        while not stop.is_set():
            try:
                for ev in kube.watch(res, rv, timeout_seconds=int(minutes * 60) + 30):
                    obj, etype = ev.object, ev.type
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if stop.is_set() or etype == "BOOKMARK":
                        continue
                    who = owner(res, obj)
                    key = (res.plural, obj["metadata"]["name"])
                    before = last.get(key, {})
                    changed = sorted(k for k in set(before.get("status") or {}) | set(obj.get("status") or {})
                                     if (before.get("status") or {}).get(k) != (obj.get("status") or {}).get(k))
                    if before.get("spec") != obj.get("spec"):
                        changed.append("spec")
                    last[key] = obj
                    with lock:
                        writes.setdefault(who, {}).setdefault(res.kind, 0)
                        writes[who][res.kind] += 1
                        for f in changed or ["(metadata only)"]:
                            fields.setdefault(res.kind, {}).setdefault(f, 0)
                            fields[res.kind][f] += 1
            except errors.Temporary:
                time.sleep(0.5)

    started = dt.datetime.now(dt.UTC)
    threads = [threading.Thread(target=run, args=(r,), daemon=True)
               for r in (k8s.PEERS, k8s.NODE_REPORTS, k8s.PAIR_SIGNALS)]
    for t in threads:
        t.start()
    time.sleep(minutes * 60)  # the measurement window itself, not a wait for a condition
    stop.set()
    events, _ = kube.list(k8s.EVENTS, "default")
    since = started.strftime("%Y-%m-%dT%H:%M:%S")
    changes = [e for e in events if e.get("reason") == "TransportChanged" and str(e.get("eventTime") or "") >= since]
    with lock:
        return {"writes_by_node": writes, "changed_fields": fields,
                "transport_changes": [e.get("note", "") for e in changes]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--settle", type=float, default=60.0, help="seconds after convergence before counting")
    args = p.parse_args()
    name = f"wr{uuid.uuid4().hex[:5]}"
    try:
        orchestrate.up(default_topology(), name, wait=180)
        state = orchestrate.state(name)
        _, kube, _ = orchestrate.attach(name)
        time.sleep(args.settle)  # let the first discovery rounds and probes finish before counting
        result = count_writes(kube, args.minutes)
        kube.close()
    finally:
        orchestrate.down(name)
    nodes = sorted(result["writes_by_node"])
    total = {n: sum(result["writes_by_node"][n].values()) for n in nodes}
    per_10 = {n: round(v * 10 / args.minutes, 2) for n, v in total.items()}
    out = {"description": "steady-state writes per node in the default lab after convergence (+settle), counted "
                          "from watch events on WireKubePeer, WireKubeNodeReport and WireKubePairSignal",
           "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "load_average": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
           "converged": state.get("converged"), "minutes": args.minutes, "settle_seconds": args.settle,
           "writes_per_node_per_10_min": per_10, "max_per_node_per_10_min": max(per_10.values(), default=0),
           "goal_per_node_per_10_min": 1, **result}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "writes.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
