"""The lab's long-running processes: started in their own session with their output in a log,
recorded in the state file (PID + start time) and ended by PID only (see :mod:`wirekube.lab.procs`)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from wirekube.lab import procs
from wirekube.lab.netbase import READY_TIMEOUT_S, LabError, LabState, locked
from wirekube.lab.procs import ProcessRecord


class Supervisor:
    """Starts and stops one lab's processes.  Owns ``children`` (our own Popen objects by PID, so
    their exit codes are collected) and the ``processes`` and ``logs`` lists of the state file."""

    def __init__(self, lab: str, workdir: Path, state: LabState) -> None:
        self.lab = lab
        self.workdir = workdir
        self.state = state
        self.children: dict[int, subprocess.Popen[Any]] = {}

    def popen(self, argv: Sequence[str], log: Path, *, role: str, target: str,
              env: Mapping[str, str] | None = None, stdin_pipe: bool = False,
              stdout_pipe: bool = False, text: bool = False) -> subprocess.Popen[Any]:
        """Start ``argv`` (stdout and stderr appended to ``log`` unless piped) and record it; the
        caller holds the workdir lock."""
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file: IO[str]
        with open(log, "a") as log_file:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log_file,
                stderr=log_file,
                text=text,
                bufsize=1 if text else -1,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self.children[popen.pid] = popen
        record = procs.record_for(popen, role, target, argv, str(log))

        def add(data: dict[str, Any]) -> None:
            data["processes"].append(record.to_json())
            if str(log) not in data.setdefault("logs", []):
                data["logs"].append(str(log))

        self.state.update(add)
        return popen

    def add_process(self, record: ProcessRecord) -> None:
        """Record a process started by other means (the namespace holders)."""
        self.state.update(lambda d: d["processes"].append(record.to_json()))

    def stop(self, proc: subprocess.Popen[Any] | int, grace: float = 3.0) -> int | None:
        """End one process this lab started (SIGTERM to its group, SIGKILL after ``grace``);
        returns its exit code when it was our child."""
        pid = proc if isinstance(proc, int) else proc.pid
        with locked(self.workdir):
            data = self.state.read() or {"processes": []}
            records = [ProcessRecord.from_json(r) for r in data.get("processes", [])]
            mine = [r for r in records if r.pid == pid]
            if not mine:
                raise LabError(f"pid {pid} was not started by lab {self.lab}")
            procs.terminate(mine, grace, self.children)
            data["processes"] = [r.to_json() for r in records if r.pid != pid]
            if self.state.read() is not None:
                self.state.write(data)
        popen = self.children.pop(pid, None)
        return popen.wait() if popen is not None else None


def wait_ready_line(popen: subprocess.Popen[Any], log: Path) -> None:
    """Wait for the "ready" line an API proxy prints once it listens."""
    assert popen.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    buffered = b""
    fd = popen.stdout.fileno()
    while b"ready" not in buffered:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LabError(f"the API proxy was not ready in {READY_TIMEOUT_S} s; see {log}")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                popen.wait()
                raise LabError(f"the API proxy exited with {popen.returncode}; see {log}")
            buffered += chunk
