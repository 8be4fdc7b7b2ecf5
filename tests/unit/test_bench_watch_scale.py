"""The watch fan-out bench's own plumbing (bench/watch_scale.py, bench/scale_bench.py): retries
against an overloaded API server, the memory floor, and what it reports about N = 5,000."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import pytest

from wirekube import errors, k8s

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


watch_scale = _load("watch_scale")
scale_bench = _load("scale_bench")


class FlakyKube:
    """Answers like an overloaded API server: ``fail`` temporary errors first, then a conflict
    when ``conflict`` (a timed-out write that had gone through), then success."""

    def __init__(self, fail: int = 0, conflict: bool = False) -> None:
        self.fail, self.conflict, self.writes, self.rv = fail, conflict, [], 7

    def replace_status(self, res: k8s.Resource, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            self.fail -= 1
            raise errors.Temporary("Timeout: request did not complete within requested timeout", status=504)
        if self.conflict and body["metadata"]["resourceVersion"] != str(self.rv):
            raise errors.Conflict("the object has been modified", status=409)
        self.rv += 1
        self.writes.append(body["metadata"]["resourceVersion"])
        return {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}

    def get(self, res: k8s.Resource, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "resourceVersion": str(self.rv)}}


def bench_on(kube: FlakyKube) -> Any:
    b = object.__new__(watch_scale.Bench)
    b.layout, b.n, b.kube, b._lock = "split", 3, kube, threading.Lock()
    b.retries = b.conflicts = 0
    b.monitor = watch_scale.Monitor("split 3", {})
    b.objs = {(k8s.PEERS.plural, "node-00001"): {"metadata": {"name": "node-00001", "resourceVersion": "5"}}}
    return b


def test_overloaded_writes_are_retried_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_scale, "RETRY_PAUSES_S", (0, 0, 0))
    b = bench_on(FlakyKube(fail=2))
    rv, _ = b._put_status(k8s.PEERS, 1, {"connected": True})
    assert rv == 8 and b.retries == 2
    assert b.objs[(k8s.PEERS.plural, "node-00001")]["status"] == {"connected": True}

    b = bench_on(FlakyKube(fail=4))
    with pytest.raises(errors.Temporary, match="did not complete"):
        b._put_status(k8s.PEERS, 1, {"connected": True})
    assert b.retries == 3


def test_a_conflict_after_a_timeout_rewrites_on_the_latest_version() -> None:
    kube = FlakyKube(conflict=True)
    b = bench_on(kube)
    rv, _ = b._put_status(k8s.PEERS, 1, {"connected": True})
    assert kube.writes == ["7"] and rv == 8 and b.conflicts == 1


def test_the_memory_floor_stops_the_run() -> None:
    monitor = watch_scale.Monitor("split 5000", {}, floor_mb=10**9)
    monitor.phase = "populate 500/5000"
    monitor.sample()
    with pytest.raises(watch_scale.MemoryFloor, match=r"fell below the bench's floor .* during populate 500/5000"):
        monitor.check()
    summary = monitor.stop()
    assert summary["mem_available_mb_min"] > 0 and summary["load_1m_max"] >= summary["load_1m_min"]


def _row(layout: str, n: int, rss: float, etcd: float, **extra: Any) -> dict[str, Any]:
    return {"layout": layout, "nodes": n, "apiserver_rss_mb_populated": rss, "etcd_db_mb": etcd, **extra}


def test_the_old_layout_at_5000_is_estimated_from_its_largest_run() -> None:
    rows = [_row("v1alpha1", 100, 340.0, 2.9), _row("v1alpha1", 1000, 1540.0, 86.0), _row("split", 100, 1, 1)]
    why = scale_bench.old_layout_at(rows, 5000)
    assert why["etcd_db_mb_estimate"] == 2150 and why["etcd_quota_mb"] == 2048
    assert why["apiserver_rss_mb_estimate"] == 340 + 1200 * 25 and why["from_nodes"] == 1000

    five = _row("split", 5000, 500, 10, lean=True, populate_s=300.0, retries=2, wave_sample={"nodes": 29},
                during_run={"apiserver_rss_mb_peak": 800, "etcd_rss_mb_peak": 200, "load_1m_min": 3.0,
                            "load_1m_max": 6.5, "load_1m_mean": 4.2})
    note = scale_bench.watch_note({"rows": [*rows, five], "at_5000": {
        "split": {"measured": True}, "v1alpha1": {"measured": False, "from_nodes": [100, 1000],
                                                  "not_run_because": why}}})
    assert "split layout is measured (lean" in note and "load average (1 min) 3.0-6.5" in note
    assert "old layout at 5,000 is extrapolated from its measured [100, 1000] runs" in note


def test_the_agent_scale_shim_answers_every_call_the_reconciler_makes_on_its_source() -> None:
    """bench/scale_bench.py runs the real Reconciler over a stand-in for the API-server source
    (minus its writes); when the reconciler started calling ``source.report_refusals`` the
    stand-in lacked it and `make bench` crashed there.  Every ``self.source.<name>`` the
    reconciler uses must be a method of the stand-in."""
    import ast
    import re

    called = set(re.findall(r"self\.source\.(\w+)", (ROOT / "python/wirekube/agent/reconcile.py").read_text()))
    assert called, "the reconciler no longer calls its source: this test is stale"
    tree = ast.parse(scale_bench.AGENT_VIEW)
    shim = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "View")
    methods = {n.name for n in shim.body if isinstance(n, ast.FunctionDef)}
    assert called <= methods, f"bench/scale_bench.py's View lacks {sorted(called - methods)}"
