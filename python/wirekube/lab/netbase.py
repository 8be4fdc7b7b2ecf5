"""What every part of the lab shares: its errors, how it runs short commands, its workdir lock
and state file, and where its namespaces are (see :mod:`wirekube.lab.net` for the design)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from wirekube.errors import WireKubeError
from wirekube.lab.plan import netns_prefix

DEFAULT_ROOT = Path("/run/wirekube-lab")
NETNS_DIR = Path("/run/netns")
WIREGUARD_RUN = Path("/run/wireguard")
STATE_VERSION = 1
PRIVATE_DIR = "net"  # <workdir>/net: holders' ready files and log, proxies' ready files
READY_TIMEOUT_S = 10.0


class LabError(WireKubeError):
    """A lab operation failed; ``command`` and ``stderr`` say which and why when known."""

    def __init__(self, message: str, command: Sequence[str] = (), stderr: str = "") -> None:
        detail = f"\n  command: {' '.join(command)}" if command else ""
        detail += f"\n  stderr: {stderr.strip()}" if stderr.strip() else ""
        super().__init__(message + detail)
        self.command = tuple(command)
        self.stderr = stderr


class LabNotFound(LabError):
    """No lab of that name is up (no state file)."""


def run(argv: Sequence[str], input: str | None = None, check: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion; raise :class:`LabError` if it fails and ``check``."""
    logger.trace("run: {}", " ".join(argv))
    try:
        result = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                                timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"could not run {argv[0]}: {e}", argv) from e
    if check and result.returncode != 0:
        raise LabError(f"{argv[0]} failed with exit code {result.returncode}", argv,
                       result.stderr)
    return result


def default_workdir(name: str) -> Path:
    return DEFAULT_ROOT / name


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """An exclusive lock on the workdir (created if needed), safe against its removal."""
    while True:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(workdir).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
        finally:
            os.close(fd)


class LabState:
    """The state file: what exists, so that any process (or a later `up`) can remove it."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "state.json"

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning("unreadable lab state {}: {}; cleaning by name prefix", self.path, e)
            return None
        return data if isinstance(data, dict) else None

    def write(self, data: Mapping[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def update(self, change: Any) -> None:
        data = self.read()
        if data is None:
            raise LabNotFound(f"no lab state at {self.path}")
        change(data)
        self.write(data)


def lab_namespaces(name: str) -> list[str]:
    prefix = netns_prefix(name)
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []
