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
import matplotlib.pyplot as plt  # noqa: E402

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
        if key.endswith(("mbit_s", "mbit_per_s", "mbps")) and ".runs." not in f".{key}." and not key.startswith("summary"):
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


def section(name: str, data: dict[str, Any], out_dir: Path) -> list[str]:
    lines = [f"## {name}", ""]
    if data.get("description"):
        lines += [str(data["description"]), ""]
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
