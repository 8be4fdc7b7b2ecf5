"""The userspace engine: a supervised ``wireguard-go`` driven through its UAPI socket.

wireguard-go runs in the foreground (``WG_PROCESS_FOREGROUND=1``) as our child, in its own session
and with its output going to a log file, so that the agent exiting (SIGTERM or kill -9) leaves it
running and established traffic keeps flowing.  A restarted agent *adopts* the running daemon: it
finds the daemon's PID from the UAPI socket's peer credentials (SO_PEERCRED) and watches it through
a pidfd, exactly as it watches its own child.  When the daemon dies the watcher starts a new one
(which recreates the interface) and tells the reconciler, which writes the configuration again.

Only the process we found behind our interface's UAPI socket or started ourselves is ever
signalled, and only by :meth:`UserspaceEngine.stop_daemon` (used by cleanup and tests).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from wirekube.agent.wg import uapi
from wirekube.agent.wg.base import WgDeviceState, WgOp
from wirekube.errors import DataplaneError

SOCKET_DIR = Path("/var/run/wireguard")


@dataclass(frozen=True)
class UserspaceSettings:
    ifname: str
    binary: str = "wireguard-go"
    socket_dir: Path = SOCKET_DIR
    """Where wireguard-go puts IFNAME.sock (fixed in wireguard-go; configurable for tests)."""
    log_path: Path | None = None
    """wireguard-go's stdout/stderr; None = /dev/null.  Never a pipe: it must outlive us."""
    start_timeout: float = 10.0
    io_timeout: float = 5.0
    restart_backoff_max: float = 10.0


class UserspaceEngine:
    name = "userspace"
    reason = ""
    """Why this engine was picked (set by :func:`wirekube.agent.wg.select.select_engine`)."""

    def __init__(self, settings: UserspaceSettings) -> None:
        self.settings = settings
        self.ifname = settings.ifname
        self._lock = threading.RLock()
        self._child: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._on_restart: Callable[[], None] = lambda: None
        self._log = logger.bind(component="wireguard-go", interface=self.ifname)

    @property
    def socket_path(self) -> Path:
        return self.settings.socket_dir / f"{self.ifname}.sock"

    @property
    def daemon_pid(self) -> int | None:
        return self._pid

    def set_on_restart(self, callback: Callable[[], None]) -> None:
        self._on_restart = callback

    # ---------------------------------------------------------------- device lifecycle

    def ensure_device(self) -> bool:
        with self._lock:
            created = False
            pid = self.find_daemon_pid()
            if pid is None:
                pid = self._spawn()
                created = True
            elif pid != self._pid:
                self._log.info("adopted running wireguard-go pid={}", pid)
            self._pid = pid
            self._start_watcher()
            return created

    def find_daemon_pid(self) -> int | None:
        """The PID serving our UAPI socket, or None when no daemon answers."""
        try:
            with self._connect() as s:
                creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except (DataplaneError, OSError):
            return None
        pid: int = struct.unpack("3i", creds)[0]
        return pid

    def _spawn(self) -> int:
        self._reap_child()
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        out = open(self.settings.log_path, "ab") if self.settings.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            child = subprocess.Popen(
                [self.settings.binary, "-f", self.ifname],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise DataplaneError(f"cannot start {self.settings.binary}: {e}") from e
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        self._child = child
        self._wait_until_serving(child)
        self._log.info("started wireguard-go pid={}", child.pid)
        return child.pid

    def _wait_until_serving(self, child: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise DataplaneError(f"wireguard-go exited with {child.returncode} while starting")
            if self.find_daemon_pid() == child.pid:
                return
            time.sleep(0.02)
        child.kill()
        child.wait()
        raise DataplaneError(f"wireguard-go did not open {self.socket_path} within {self.settings.start_timeout}s")

    def _reap_child(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    # ---------------------------------------------------------------- supervision

    def _start_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name=f"wg-supervisor-{self.ifname}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            pid = self._pid
            if pid is not None and self._wait_for_exit(pid):
                continue
            if self._stop.is_set():
                return
            self._log.warning("wireguard-go pid={} exited ({}); restarting", pid, self._exit_status(pid))
            try:
                with self._lock:
                    self._pid = None
                    found = self.find_daemon_pid()
                    self._pid = found if found is not None else self._spawn()
                backoff = 0.5
            except DataplaneError as e:
                self._log.error("restart failed: {}; retrying in {:.1f}s", e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.restart_backoff_max)
                continue
            self._notify_restart()

    def _wait_for_exit(self, pid: int) -> bool:
        """Block until ``pid`` exits or stop is requested; True means "still alive, stop requested"."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.5)
                if ready:
                    return False
            return True
        finally:
            os.close(fd)

    def _exit_status(self, pid: int | None) -> str:
        child = self._child
        if child is not None and child.pid == pid:
            code = child.wait()
            self._child = None
            return f"exit code {code}"
        return "not our child"

    def _notify_restart(self) -> None:
        try:
            self._on_restart()
        except Exception:  # noqa: BLE001 - a callback bug must not kill supervision
            self._log.exception("restart callback failed")

    def close(self) -> None:
        """Stop watching; wireguard-go keeps running so the dataplane stays up."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)

    def stop_daemon(self, timeout: float = 5.0) -> None:
        """Terminate the daemon serving our interface (cleanup only; removes the interface)."""
        self.close()
        pid = self.find_daemon_pid() or self._pid
        if pid is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
            if not select.select([fd], [], [], timeout)[0]:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                select.select([fd], [], [], timeout)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
        if self._child is not None:
            self._child.wait()
            self._child = None

    # ---------------------------------------------------------------- UAPI

    def get(self) -> WgDeviceState:
        answer = self._request(uapi.GET_REQUEST)
        try:
            return uapi.parse_get(answer)
        except uapi.UapiProtocolError as e:
            raise DataplaneError(f"{self.socket_path}: {e}") from e

    def apply(self, ops: Sequence[WgOp], private_key: str) -> None:
        if not ops:
            return
        answer = self._request(uapi.encode_set(ops, private_key))
        errno = uapi.parse_errno(answer)
        if errno != 0:
            raise DataplaneError(f"wireguard-go rejected the configuration: errno={errno}")

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.settings.io_timeout)
        try:
            s.connect(str(self.socket_path))
        except OSError as e:
            s.close()
            raise DataplaneError(f"cannot connect to {self.socket_path}: {e}") from e
        return s

    def _request(self, request: bytes) -> bytes:
        with self._connect() as s:
            try:
                s.sendall(request)
                return _read_answer(s)
            except OSError as e:
                raise DataplaneError(f"UAPI exchange on {self.socket_path} failed: {e}") from e


MAX_ANSWER = 16 * 1024 * 1024


def _read_answer(s: socket.socket) -> bytes:
    buf = bytearray()
    while not (buf.endswith(b"\n\n") and b"errno=" in buf):
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("connection closed before the end of the answer")
        buf += chunk
        if len(buf) > MAX_ANSWER:
            raise OSError("answer larger than 16 MiB")
    return bytes(buf)
