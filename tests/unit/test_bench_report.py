from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
assert spec and spec.loader
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_report_tables_and_plots(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "failover.json").write_text(json.dumps({"gaps_ms": [900, 1200], "max_gap_ms": 1200,
                                                        "ratio_to_reference": 0.3}))
    (results / "relay.json").write_text(json.dumps({"cases": {"1400": {"relay": {"mbit_s": 800},
                                                                        "socat": {"mbit_s": 900}, "ratio": 0.88}}}))
    (results / "broken.json").write_text("{nope")
    text = report.build(results, tmp_path / "REPORT.md")
    assert "## failover" in text and "| ratio_to_reference | 0.3 |" in text
    assert "| cases.1400.ratio | 0.88 |" in text
    assert "unreadable" in text
    assert (tmp_path / "failover-gaps.png").stat().st_size > 1000
    assert (tmp_path / "relay-throughput.png").stat().st_size > 1000
    assert text.index("ratio") < text.index("max_gap_ms")  # ratios first
