"""Processes the lab starts: identified by PID *and* start time, ended by PID only.

A PID alone can be reused after a crash, so every record carries the process's start time (field
22 of ``/proc/PID/stat``, in clock ticks since boot); a record whose PID now belongs to a
different process is treated as gone and never signalled.  Every process the lab starts leads its
own session (``start_new_session=True``), so its process group id equals its PID and ending the
group reaches helpers it forked, without ever selecting processes by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from loguru import logger

POLL_S = 0.02


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_time: int
    role: str  # holder | mgmt-proxy | spawn
    target: str  # exec target it runs in ("" for the host namespace)
    argv: tuple[str, ...]
    log: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            role=str(data["role"]),
            target=str(data["target"]),
            argv=tuple(data["argv"]),
            log=data.get("log"),
        )


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The start time of a live (non-zombie) process, or None if there is none."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def record_for(popen: subprocess.Popen[Any], role: str, target: str, argv: Iterable[str],
               log: str | None = None) -> ProcessRecord:
    started = start_time(popen.pid)
    if started is None:  # already exited: keep a record that can never match a live process
        started = -1
    return ProcessRecord(popen.pid, started, role, target, tuple(argv), log)


def is_alive(record: ProcessRecord) -> bool:
    """The recorded process still runs (same PID and same start time)."""
    return record.start_time >= 0 and start_time(record.pid) == record.start_time


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (a no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal(record: ProcessRecord, sig: signal.Signals) -> None:
    if not is_alive(record):
        return
    try:
        if os.getpgid(record.pid) == record.pid:
            os.killpg(record.pid, sig)
        else:
            os.kill(record.pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(records: Iterable[ProcessRecord], timeout: float,
              children: Mapping[int, subprocess.Popen[Any]] | None = None) -> list[ProcessRecord]:
    """Wait until every process is gone or the deadline passes; return those still alive."""
    pending = list(records)
    deadline = time.monotonic() + timeout
    while True:
        still = []
        for record in pending:
            popen = (children or {}).get(record.pid)
            if popen is not None:
                popen.poll()
            else:
                _reap(record.pid)
            if is_alive(record):
                still.append(record)
        pending = still
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(POLL_S)


def terminate(records: Iterable[ProcessRecord], grace: float = 3.0,
              children: Mapping[int, subprocess.Popen[Any]] | None = None) -> None:
    """SIGTERM each live process (its group), then SIGKILL whatever outlives ``grace``."""
    records = [r for r in records if is_alive(r)]
    for record in records:
        logger.debug("ending pid {} ({} in {}): {}", record.pid, record.role,
                     record.target or "host", " ".join(record.argv)[:200])
        _signal(record, signal.SIGTERM)
    left = wait_gone(records, grace, children)
    for record in left:
        logger.warning("pid {} ignored SIGTERM for {} s; killing it", record.pid, grace)
        _signal(record, signal.SIGKILL)
    left = wait_gone(left, 5.0, children)
    for record in left:
        logger.error("pid {} survived SIGKILL", record.pid)


def pids_in_netns(inodes: set[int]) -> list[int]:
    """PIDs of processes whose network namespace is one of ``inodes``."""
    found = []
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if inode in inodes:
            found.append(int(entry))
    return found
