"""The lab's network pieces that need no namespaces: the order netbuild applies a plan in, what
cleanup removes from a workdir (and what it leaves), and the supervisor's refusal to stop a
process the lab did not start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from wirekube.lab import netbuild
from wirekube.lab.cleanup import cleanup
from wirekube.lab.netbase import LabError, LabState
from wirekube.lab.plan import plan_lab
from wirekube.lab.supervisor import Supervisor
from wirekube.lab.topology import builtin_topology

LAB = "unit-netparts"  # no namespace of this lab exists: cleanup deletes none


def test_create_network_adds_namespaces_then_veths_then_links_then_routes_then_sysctls_and_nft(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = plan_lab(builtin_topology("default"), LAB)
    calls: list[tuple[list[str], str | None]] = []

    def fake_run(argv: list[str], input: str | None = None, **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append((list(argv), input))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(netbuild, "run", fake_run)
    netbuild.create_network(plan)

    def kind(argv: list[str], input: str | None) -> str:
        if argv[:3] == ["ip", "netns", "add"]:
            return "netns"
        if "veth" in argv:
            return "veth"
        if "-batch" in argv:
            assert input is not None
            return "routes" if input.startswith("route ") else "links"
        return "sysctl" if "sysctl" in argv else "nft"

    kinds = [kind(argv, input) for argv, input in calls]
    order = ["netns", "veth", "links", "routes"]
    firsts = [kinds.index(k) for k in order]
    lasts = [len(kinds) - 1 - kinds[::-1].index(k) for k in order]
    assert all(lasts[i] < firsts[i + 1] for i in range(len(order) - 1)), kinds
    assert kinds.count("netns") == len(plan.namespaces)
    assert kinds.count("veth") == len(plan.veths)
    assert set(kinds[lasts[-1] + 1:]) == {"sysctl", "nft"}
    assert kinds.count("nft") == sum(1 for n in plan.namespaces if n.nft)


def make_workdir(root: Path) -> Path:
    workdir = root / "wd"
    for sub in ("net", "logs", "run"):
        (workdir / sub).mkdir(parents=True)
    (workdir / "net" / "holder-a").write_text("1")
    (workdir / "run" / "holder-b").write_text("2")  # the first version's place for holder files
    (workdir / "logs" / "ours.log").write_text("x")
    (workdir / "logs" / "theirs.log").write_text("x")
    (workdir / "orchestrator.txt").write_text("not the lab's")
    dead = {"pid": 999_999_999, "start_time": 1, "role": "spawn", "target": "", "argv": ["x"], "log": None}
    (workdir / "state.json").write_text(json.dumps({
        "processes": [dead], "namespaces": [],
        "logs": [str(workdir / "logs" / "ours.log"), str(root / "elsewhere.log")],
    }))
    (root / "elsewhere.log").write_text("the caller's choice")
    return workdir


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("remove_workdir", [True, False])
def test_cleanup_removes_only_what_the_lab_made(tmp_path: Path, remove_workdir: bool) -> None:
    make_workdir(tmp_path)
    cleanup(LAB, tmp_path / "wd", keep_logs=False, remove_workdir=remove_workdir)
    # The workdir stays either way: it still holds a file the lab did not make.
    assert files(tmp_path) == ["elsewhere.log", "wd", "wd/logs", "wd/logs/theirs.log", "wd/orchestrator.txt"]


def test_cleanup_keeps_logs_when_asked(tmp_path: Path) -> None:
    make_workdir(tmp_path)
    cleanup(LAB, tmp_path / "wd", keep_logs=True)
    assert files(tmp_path) == ["elsewhere.log", "wd", "wd/logs", "wd/logs/ours.log", "wd/logs/theirs.log",
                               "wd/orchestrator.txt"]


def test_cleanup_removes_a_workdir_it_emptied(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path)
    (workdir / "orchestrator.txt").unlink()
    (workdir / "logs" / "theirs.log").unlink()
    cleanup(LAB, workdir, keep_logs=False)
    assert files(tmp_path) == ["elsewhere.log"]


def test_supervisor_stops_only_processes_of_its_lab(tmp_path: Path) -> None:
    state = LabState(tmp_path)
    state.write({"processes": []})
    supervisor = Supervisor(LAB, tmp_path, state)
    with pytest.raises(LabError, match=rf"^pid 4242 was not started by lab {LAB}$"):
        supervisor.stop(4242)
