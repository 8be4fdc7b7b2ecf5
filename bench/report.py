#!/usr/bin/env python3
"""Write bench/REPORT.md (and PNG plots) from bench/results/*.json.

Every benchmark writes one JSON file; this report does not run anything. Each file becomes a
section with its headline figures (every numeric value, flattened to dotted keys, with the
baseline ratio first when there is one) and, where the data has the shape for it, a plot:

* throughput: any mapping of case -> {"mbit_s": ...} or lists of {"mbit_s"} under "cases";
* gaps: any list of numbers under a key ending in "gaps_ms" (failover blackouts).

    python bench/report.py [--results bench/results] [--out bench/REPORT.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent


def flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(data, bool):
        return
    if isinstance(data, int | float):
        yield prefix, float(data)
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))


def find_lists(data: Any, suffix: str, prefix: str = "") -> Iterator[tuple[str, list[float]]]:
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k.endswith(suffix) and isinstance(v, list) and all(isinstance(x, int | float) for x in v):
                yield key, [float(x) for x in v]
            else:
                yield from find_lists(v, suffix, key)


def throughput_points(data: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in flatten(data):
        if (key.endswith(("mbit_s", "mbit_per_s", "mbps")) and ".runs." not in f".{key}."
                and not key.startswith("summary")):
            yield key.rsplit(".", 1)[0] or key, value


def plot_bars(points: list[tuple[str, float]], title: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(points) + 1.5))
    labels = [p[0] for p in points]
    ax.barh(labels, [p[1] for p in points], color="#3b7dd8")
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gaps(series: list[tuple[str, list[float]]], title: str, path: Path, goal_ms: float = 2000) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, values in series:
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.axhline(goal_ms, color="#c0392b", linestyle="--", linewidth=1, label=f"goal {goal_ms:.0f} ms")
    ax.set_xlabel("cut #" if goal_ms == 2000 else "round #")
    ax.set_ylabel("longest ping gap (ms)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_watch(rows: list[dict[str, Any]], at: dict[str, Any], path: Path) -> None:
    """Bytes one status change delivers to each watching agent, and a whole convergence wave's
    watch traffic, against N, one line per layout (issue 20)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for layout, color in (("v1alpha1", "#d8553b"), ("split", "#3b7dd8")):
        pts = sorted((r["nodes"], r) for r in rows if r["layout"] == layout)
        if not pts:
            continue
        ns = [n for n, _ in pts]
        for ax, get, extra in ((left, lambda r: r["one_change"]["bytes_per_agent_max"], "one_change_bytes_per_agent"),
                               (right, lambda r: r["wave_total"]["watch_gb"], "wave_watch_gb")):
            ys = [max(get(r), 1e-3 if ax is right else 1) for _, r in pts]
            ax.plot(ns, ys, "o-", color=color, label=f"{layout} (measured)")
            proj = at.get(layout) or {}
            if proj and not proj.get("measured") and 5000 not in ns:
                ax.plot([ns[-1], 5000], [ys[-1], max(float(proj[extra]), 1e-3 if ax is right else 1)], "o--",
                        color=color, alpha=0.5, label=f"{layout} (extrapolated)")
    left.set(xscale="log", yscale="log", xlabel="nodes N", ylabel="bytes per watching agent (0 drawn at 1)",
             title="one node's transport change")
    left.axhline(2048, color="grey", linestyle=":", label="goal 2 KB")
    right.set(xscale="log", yscale="log", xlabel="nodes N", ylabel="GB of watch traffic, N agents (0 at 0.001)",
              title="a convergence wave (3 transport writes per node)")
    right.axhline(20, color="grey", linestyle=":", label="goal 20 GB at 5,000")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def watch_lines(watch: dict[str, Any]) -> list[str]:
    rows = watch.get("rows") or []
    lines = ["### Watch fan-out by layout (issue 20)", "",
             "| layout | N | peer object B | one transport change B/agent | one fact change B/agent "
             "| wave GB (N agents) | API server CPU s / wave node | API server RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["layout"], r["nodes"])):
        lean = " (lean)" if r.get("lean") else ""
        lines.append(f"| {r['layout']} | {r['nodes']}{lean} | {r['peer_object_bytes_max']} | "
                     f"{r['one_change']['bytes_per_agent_max']} | {r['one_fact_change']['bytes_per_agent_max']} | "
                     f"{r['wave_total']['watch_gb']:.4g} | "
                     f"{r['wave_sample']['apiserver_cpu_s'] / max(1, r['wave_sample']['nodes']):.3g} | "
                     f"{r['wave_sample']['apiserver_rss_mb']} |")
    lines.append("")
    for layout, proj in sorted((watch.get("at_5000") or {}).items()):
        how = "measured" if proj.get("measured") else f"extrapolated from N = {proj.get('from_nodes')}"
        lines.append(f"* at N = 5,000, {layout} ({how}): peer object {proj['peer_object_bytes']} B, one transport "
                     f"change {proj['one_change_bytes_per_agent']} B per agent, a wave {proj['wave_watch_gb']} GB")
    if watch.get("acceptance"):
        lines += ["", "Acceptance: " + ", ".join(f"{k} = {v}" for k, v in watch["acceptance"].items())]
    return lines + [""]


def section(name: str, data: dict[str, Any], out_dir: Path) -> list[str]:
    lines = [f"## {name}", ""]
    if data.get("description"):
        lines += [str(data["description"]), ""]
    watch = data.get("watch")
    if isinstance(watch, dict) and watch.get("rows"):
        png = out_dir / f"{name}-watch.png"
        plot_watch(watch["rows"], watch.get("at_5000") or {}, png)
        lines += watch_lines(watch) + [f"![{name} watch fan-out]({png.name})", ""]
    figures = list(flatten(data))
    ratios = [f for f in figures if "ratio" in f[0]]
    rest = [f for f in figures if "ratio" not in f[0]]
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in ratios + rest[:60]]
    if len(rest) > 60:
        lines.append(f"| ... | {len(rest) - 60} more in the JSON |")
    lines.append("")
    points = list(throughput_points(data))
    if points:
        png = out_dir / f"{name}-throughput.png"
        plot_bars(points, f"{name}: throughput", "Mbit/s", png)
        lines += [f"![{name} throughput]({png.name})", ""]
    gaps = list(find_lists(data, "gaps_ms"))
    if gaps:
        png = out_dir / f"{name}-gaps.png"
        goal = data.get("goal_ms")
        plot_gaps(gaps, f"{name}: failover gaps", png, float(goal) if isinstance(goal, int | float) else 2000)
        lines += [f"![{name} gaps]({png.name})", ""]
    return lines


def build(results: Path, out: Path) -> str:
    files = sorted(results.glob("*.json"))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# WireKube benchmark report", "",
             f"Generated {stamp} by `make bench` from {len(files)} result file(s) in `bench/results/`.",
             "Figures are single runs on a shared 2-core machine: compare the ratios measured against a",
             "baseline in the same run, not absolute numbers across machines.", ""]
    for f in files:
        try:
            data = json.loads(f.read_text())
        except ValueError as e:
            lines += [f"## {f.stem}", "", f"unreadable: {e}", ""]
            continue
        lines += section(f.stem, data if isinstance(data, dict) else {"values": data}, out.parent)
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "REPORT.md")
    args = parser.parse_args()
    build(args.results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
