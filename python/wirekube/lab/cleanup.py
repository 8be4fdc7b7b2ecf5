"""Removing a lab: its processes, namespaces and files, from its state file and the namespace prefix.

Used by ``Lab.up`` (leftovers of a crashed run first, and what a failed ``up`` made), ``Lab.down``
and ``Lab.destroy``.  Processes are ended by PID only (see :mod:`wirekube.lab.procs`); files are
removed only where the lab made them (see :mod:`wirekube.lab.net` for the workdir's layout).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from wirekube.lab import procs
from wirekube.lab.netbase import DEFAULT_ROOT, NETNS_DIR, PRIVATE_DIR, LabError, LabState, lab_namespaces, run
from wirekube.lab.plan import netns_prefix
from wirekube.lab.procs import ProcessRecord


def cleanup(name: str, workdir: Path, *, keep_logs: bool, remove_workdir: bool = True,
            children: Mapping[int, subprocess.Popen[Any]] | None = None) -> None:
    """Remove what lab ``name`` made, from its state file and the namespace prefix."""
    state = LabState(workdir)
    data = state.read() if workdir.exists() else None
    records = [ProcessRecord.from_json(r) for r in (data or {}).get("processes", [])]
    # Workloads first (they may use the management path or the holders), holders last.
    order = {"spawn": 0, "apiproxy": 1, "holder": 2}
    for role in sorted({r.role for r in records}, key=lambda r: order.get(r, 0)):
        procs.terminate([r for r in records if r.role == role], children=children)

    namespaces = sorted(set((data or {}).get("namespaces", [])) | set(lab_namespaces(name)))
    namespaces = [n for n in namespaces if n.startswith(netns_prefix(name))]
    strays = _end_strays(name, namespaces, children)
    for netns in namespaces:
        result = run(["ip", "netns", "delete", netns], check=False)
        if result.returncode != 0 and (NETNS_DIR / netns).exists():
            raise LabError(f"could not delete namespace {netns}", ["ip", "netns", "delete", netns],
                           result.stderr)

    if not workdir.exists():
        return
    _remove_files(workdir, state, data, keep_logs=keep_logs, remove_workdir=remove_workdir)
    if data is not None or namespaces:
        logger.info("lab {}: removed {} namespaces and {} processes", name, len(namespaces),
                    sum(1 for r in records) + len(strays))


def _end_strays(name: str, namespaces: list[str],
                children: Mapping[int, subprocess.Popen[Any]] | None) -> list[ProcessRecord]:
    """End the processes still running inside the lab's namespaces (daemons started through
    ``exec``), by PID; returns their records."""
    inodes = set()
    for netns in namespaces:
        with contextlib.suppress(FileNotFoundError):
            inodes.add(os.stat(NETNS_DIR / netns).st_ino)
    strays = []
    for pid in procs.pids_in_netns(inodes) if inodes else []:
        started = procs.start_time(pid)
        if started is not None:
            comm = Path(f"/proc/{pid}/comm").read_text().strip() if os.path.exists(
                f"/proc/{pid}/comm") else "?"
            logger.warning("lab {}: ending pid {} ({}) still running inside its namespaces",
                           name, pid, comm)
            strays.append(ProcessRecord(pid, started, "stray", "", (comm,)))
    procs.terminate(strays, children=children)
    return strays


def _remove_files(workdir: Path, state: LabState, data: Mapping[str, Any] | None, *, keep_logs: bool,
                  remove_workdir: bool) -> None:
    """The state file, ``<workdir>/net`` and, unless ``keep_logs``, the logs of processes the lab
    started; then the logs directory and the workdir if they are empty."""
    state.path.unlink(missing_ok=True)
    state.path.with_name(state.path.name + ".tmp").unlink(missing_ok=True)
    shutil.rmtree(workdir / PRIVATE_DIR, ignore_errors=True)
    legacy = workdir / "run"  # where the first version kept the holders' files
    for path in [*legacy.glob("holder-*"), legacy / "holders.log"]:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        legacy.rmdir()
    if not keep_logs:
        # Only logs of processes this lab started, and only inside the workdir: the workdir may
        # be shared (the orchestrator keeps its own files there), and a log path elsewhere was
        # the caller's choice.
        logs_dir = workdir / "logs"
        for log in (data or {}).get("logs", []):
            path = Path(log)
            if path.parent == logs_dir:
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            logs_dir.rmdir()
    if remove_workdir:
        with contextlib.suppress(OSError):
            workdir.rmdir()  # only if empty: never remove files the lab did not make
        if workdir.parent == DEFAULT_ROOT:
            with contextlib.suppress(OSError):
                DEFAULT_ROOT.rmdir()
