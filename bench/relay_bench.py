#!/usr/bin/env python3
"""Relay throughput and latency benchmark; writes bench/results/relay.json.

    .venv/bin/python bench/relay_bench.py --out bench/results/relay.json   (make bench-relay)

What it does, on 127.0.0.1 only:

* **Throughput.**  ``--pairs`` sender/receiver pairs, each side its own process (blocking
  sockets, no event loop), push fixed-size Data frames as fast as they can for ``--duration``
  seconds after a warm-up.  Each sender writes ~64 KiB blobs of prebuilt frames; the first frame
  of each blob carries a marker and a CLOCK_MONOTONIC stamp, which the receiver finds with
  ``bytes.find`` (no per-frame Python work on the generator side), giving a *loaded* one-way
  latency sample per blob.  Delivered frames/s and Mbit/s (datagram bytes) are counted at the
  receivers.  Every generator process reports its own CPU seconds in the measured window, so a
  reader can see which side saturated.
* **Baseline in the same run.**  The same generator drives socat (Debian package, a C byte
  forwarder with no framing work): one ``socat TCP-LISTEN TCP`` per pair, sender -> socat ->
  receiver.  Runs are interleaved relay/socat for ``--rounds`` rounds; ratio = relay / socat on
  the mean of the rounds.
* **Added latency.**  A paced run (``--latency-rate`` frames/s per pair, each frame stamped) through
  a direct connection, socat and the relay; added = target percentile - direct percentile.
* **WSS vs raw TCP** (issue 19, ``--wss-only`` runs just this).  One pair through one relay
  process whose WSS listener is on: both ends raw TCP, the sender over WebSocket over TLS, and
  both ends over WSS, interleaved; ``wss_over_tcp_ratio`` = sender-over-WSS / raw TCP at
  ``--cross-size`` bytes.  The WSS ends are the agent's own ``RelayClient`` (``wss://``, uvloop):
  the sender writes the same ~64 KiB blobs with ``send_frames`` (one WebSocket message each)
  while its flow control allows; every process's CPU per delivered frame is recorded, since on
  a 2-core machine the sender's TLS and masking compete with the relay for the same CPUs.
* **Relay cost.**  The relay runs as the real ``wirekube-relay`` process; its user and system CPU
  seconds in the window come from /proc/PID/stat and its peak RSS from VmHWM.
* **Where the time goes.**  One extra 100-byte run with the relay under cProfile (not counted in
  the figures above): the top functions by own time.

Packet size means the WireGuard datagram carried; a frame adds 37 bytes (length, type, key).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import platform
import pstats
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from wirekube.relay.auth import prove, public_bytes
from wirekube.relay.protocol import (
    FrameType,
    encode_auth,
    encode_data,
    encode_register,
)

LOCALHOST = "127.0.0.1"
FRAME_OVERHEAD = 4 + 1 + 32
MARKER = b"\xfeWKBENCH"  # 8 bytes, then an 8-byte big-endian monotonic_ns stamp
STAMP_LEN = len(MARKER) + 8
BLOB_TARGET = 64 * 1024
RECV_BUFFER = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
SOCAT_BUFFER = 65536  # socat's default is 8192; a bigger buffer makes the baseline stronger


# -- generator processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: float  # monotonic seconds: senders start
    measure: float  # measurement starts (after warm-up)
    end: float  # measurement and sending end


def _register_blocking(sock: Any, private_key: bytes) -> None:
    key = X25519PrivateKey.from_private_bytes(private_key)
    sock.sendall(encode_register(public_bytes(key)))
    header = _recv_exact(sock, 5)
    length, ftype = struct.unpack(">IB", header)
    body = _recv_exact(sock, length - 1)
    if ftype != FrameType.CHALLENGE:
        raise RuntimeError(f"expected Challenge, got {ftype}: {body!r}")
    sock.sendall(encode_auth(prove(key, body)))
    header = _recv_exact(sock, 5)
    length, ftype = struct.unpack(">IB", header)
    _recv_exact(sock, length - 1)
    if ftype != FrameType.REGISTERED:
        raise RuntimeError(f"expected Registered, got {ftype}")


def _recv_exact(sock: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during handshake")
        data += chunk
    return data


def _nodelay(sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wss_client(cfg: dict[str, Any], on_frames: Any = None, on_flow: Any = None) -> Any:
    """The agent's own relay client (``RelayClient`` over ``WsBridge`` over uvloop's TLS), registered
    over the relay's WSS listener: what a node behind a proxy runs."""
    from wirekube.relay.client import RelayClient, RelayClientSettings

    host, port = cfg["wss"]
    return RelayClient.connect_url(f"wss://{host}:{port}/", X25519PrivateKey.from_private_bytes(cfg["private_key"]),
                                   on_frames=on_frames or (lambda source, frames: None), on_flow=on_flow,
                                   settings=RelayClientSettings(ca_file=cfg["ca_file"], connect_timeout=20))


def wss_sender_main(ctl: Connection, cfg: dict[str, Any]) -> None:
    """:func:`sender_main` over WSS through the agent's client: the same blobs, written with
    ``send_frames`` (one WebSocket message each) while the client's flow control allows."""
    import asyncio

    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        writable = asyncio.Event()
        writable.set()
        client = await _wss_client(cfg, on_flow=lambda paused: writable.clear() if paused else writable.set())
        frame = encode_data(cfg["dest_key"], bytes(cfg["size"]))
        blob = bytearray(frame * max(1, BLOB_TARGET // len(frame)))
        blob[FRAME_OVERHEAD : FRAME_OVERHEAD + len(MARKER)] = MARKER
        stamp_at = FRAME_OVERHEAD + len(MARKER)
        ctl.send("ready")
        window = Window(*await loop.run_in_executor(None, ctl.recv))
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        sent = sent_in_window = 0
        cpu_start = None
        pack_into = struct.pack_into
        while True:
            now = time.monotonic()
            if now >= window.end:
                break
            if cpu_start is None and now >= window.measure:
                cpu_start = time.process_time()
            if not writable.is_set():
                await writable.wait()
                continue
            pack_into(">Q", blob, stamp_at, time.monotonic_ns())
            client.send_frames(blob)  # serialised (masked, encrypted) or copied before it returns
            sent += len(blob)
            if cpu_start is not None:
                sent_in_window += len(blob)
            await asyncio.sleep(0)
        cpu_end = time.process_time()
        ctl.send({"bytes_sent": sent, "bytes_sent_in_window": sent_in_window,
                  "cpu_s": cpu_end - (cpu_start if cpu_start is not None else cpu_end)})
        await loop.run_in_executor(None, ctl.recv)  # hold the connection until the receivers are done
        await client.close()

    uvloop.run(main())


def wss_receiver_main(ctl: Connection, cfg: dict[str, Any]) -> None:
    """:func:`receiver_main` over WSS through the agent's client (``on_frames``: views of the
    received Data frames in wire form, counted and searched for stamps)."""
    import asyncio

    import uvloop

    window: Window | None = None
    received_in_window = 0
    latencies: list[int] = []
    cpu_start: float | None = None

    def on_frames(source: bytes, frames: memoryview) -> None:
        nonlocal received_in_window, cpu_start
        now_ns = time.monotonic_ns()
        if window is None or not window.measure <= now_ns / 1e9 < window.end:
            return
        if cpu_start is None:
            cpu_start = time.process_time()
        received_in_window += len(frames)
        data = frames.tobytes()  # whole frames: a stamp never straddles two calls
        at = data.find(MARKER)
        while at >= 0:
            latencies.append(now_ns - int.from_bytes(data[at + len(MARKER) : at + STAMP_LEN], "big"))
            at = data.find(MARKER, at + STAMP_LEN)

    async def main() -> None:
        nonlocal window
        loop = asyncio.get_running_loop()
        client = await _wss_client(cfg, on_frames=on_frames)
        ctl.send("ready")
        window = Window(*await loop.run_in_executor(None, ctl.recv))
        await asyncio.sleep(max(0.0, window.end - time.monotonic()))
        cpu = time.process_time() - cpu_start if cpu_start is not None else 0.0
        ctl.send({"bytes_received_in_window": received_in_window, "cpu_s": cpu,
                  "latencies_ns": latencies[:: max(1, len(latencies) // 20000)]})
        await loop.run_in_executor(None, ctl.recv)
        await client.close()

    uvloop.run(main())


def _connect(cfg: dict[str, Any]) -> Any:
    """A raw TCP socket to ``cfg["connect"]``."""
    sock = socket.create_connection(cfg["connect"])
    _nodelay(sock)
    return sock


def sender_main(ctl: Connection, cfg: dict[str, Any]) -> None:
    """Connect (and register, for the relay), then send blobs until the window ends."""
    if cfg.get("wss"):
        return wss_sender_main(ctl, cfg)
    sock = _connect(cfg)
    if cfg["register"]:
        _register_blocking(sock, cfg["private_key"])
    frame = encode_data(cfg["dest_key"], bytes(cfg["size"]))
    per_blob = 1 if cfg["paced_rate"] else max(1, BLOB_TARGET // len(frame))
    blob = bytearray(frame * per_blob)
    blob[FRAME_OVERHEAD : FRAME_OVERHEAD + len(MARKER)] = MARKER
    stamp_at = FRAME_OVERHEAD + len(MARKER)
    ctl.send("ready")
    window = Window(*ctl.recv())
    _sleep_until(window.start)
    sent = sent_in_window = 0
    cpu_start = cpu_end = None
    interval = 1.0 / cfg["paced_rate"] if cfg["paced_rate"] else 0.0
    next_send = time.monotonic()
    pack_into = struct.pack_into
    while True:
        now = time.monotonic()
        if now >= window.end:
            break
        if cpu_start is None and now >= window.measure:
            cpu_start = time.process_time()
        if interval:
            next_send += interval
            if next_send > now:
                time.sleep(next_send - now)
        pack_into(">Q", blob, stamp_at, time.monotonic_ns())
        sock.sendall(blob)
        sent += len(blob)
        if cpu_start is not None:
            sent_in_window += len(blob)
    cpu_end = time.process_time()
    ctl.send({"bytes_sent": sent, "bytes_sent_in_window": sent_in_window,
              "cpu_s": cpu_end - (cpu_start if cpu_start is not None else cpu_end)})
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    ctl.recv()  # hold the socket until the receivers are done
    sock.close()


def receiver_main(ctl: Connection, cfg: dict[str, Any]) -> None:
    """Receive and count; find stamped frames with bytes.find; report the window's figures."""
    if cfg.get("wss"):
        return wss_receiver_main(ctl, cfg)
    if cfg["register"]:
        sock = _connect(cfg)
        _register_blocking(sock, cfg["private_key"])
    else:
        listener = socket.create_server((LOCALHOST, 0))
        ctl.send(listener.getsockname()[1])
        listener.settimeout(30)
        sock, _ = listener.accept()
        listener.close()
        _nodelay(sock)
    ctl.send("ready")
    window = Window(*ctl.recv())
    sock.settimeout(0.2)
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    carry = b""
    received_in_window = 0
    latencies: list[int] = []
    cpu_start = None
    recv_into = sock.recv_into
    find = buf.find
    while True:
        try:
            n = recv_into(view)
        except TimeoutError:
            n = -1
        now_ns = time.monotonic_ns()
        now = now_ns / 1e9
        if n == 0 or now >= window.end:
            break
        if n < 0 or now < window.measure:
            carry = b""
            continue
        if cpu_start is None:
            cpu_start = time.process_time()
        received_in_window += n
        # stamps across the previous chunk's end
        if carry:
            joint = carry + bytes(buf[: STAMP_LEN - 1])
            at = joint.find(MARKER)
            if 0 <= at < len(carry) and at + STAMP_LEN <= len(joint):
                latencies.append(now_ns - int.from_bytes(joint[at + len(MARKER) : at + STAMP_LEN], "big"))
        at = find(MARKER, 0, n)
        while at >= 0 and at + STAMP_LEN <= n:
            latencies.append(now_ns - int.from_bytes(buf[at + len(MARKER) : at + STAMP_LEN], "big"))
            at = find(MARKER, at + STAMP_LEN, n)
        carry = bytes(buf[max(0, n - STAMP_LEN + 1) : n])
    cpu = time.process_time() - cpu_start if cpu_start is not None else 0.0
    ctl.send({"bytes_received_in_window": received_in_window, "cpu_s": cpu,
              "latencies_ns": latencies[:: max(1, len(latencies) // 20000)]})
    ctl.recv()
    sock.close()


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- targets -------------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _peak_rss_kib(pid: int) -> int:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


class RelayProcess:
    """The real ``wirekube-relay`` console entry point, on loopback ports chosen by the kernel."""

    def __init__(self, profile_to: Path | None = None, extra: tuple[str, ...] = (), port: int = 0) -> None:
        import wirekube.relay.cli as cli_module

        # cProfile runs a script, not a module; the CLI module runs main() under __main__.
        entry = ["-m", "cProfile", "-o", str(profile_to), str(cli_module.__file__)] if profile_to else [
            "-m", "wirekube.relay.cli"]
        cmd = [sys.executable, *entry, "--listen", f"{LOCALHOST}:{port}", "--stun-listen", f"{LOCALHOST}:0",
               "--metrics-listen", f"{LOCALHOST}:0", "--log-format", "json", "--log-level", "INFO", *extra]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.wss_address = None
        self.address = self._wait_ready()
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()

    def _wait_ready(self) -> tuple[str, int]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 20
        for line in self.proc.stderr:
            with contextlib.suppress(ValueError, KeyError):
                record = json.loads(line)["record"]
                if record["message"] == "relay ready":
                    if record["extra"].get("wss"):
                        whost, wport = record["extra"]["wss"].rsplit(":", 1)
                        self.wss_address: tuple[str, int] | None = (whost, int(wport))
                    host, port = record["extra"]["tcp"].rsplit(":", 1)
                    mhost, mport = record["extra"]["metrics"].rsplit(":", 1)
                    self.metrics_address = (mhost, int(mport))
                    return host, int(port)
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("the relay did not report ready")

    def metrics_text(self) -> str:
        with socket.create_connection(self.metrics_address, timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    def gauge(self, name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+]+)$", self.metrics_text(), re.M)
        return float(m.group(1)) if m else 0.0

    def counters(self) -> dict[str, float]:
        """The relay's own forwarded/dropped counters, from its /metrics endpoint."""
        out = {}
        for line in self.metrics_text().splitlines():
            m = re.match(r"wirekube_relay_(forwarded_frames_total|dropped_frames_total)(\{[^}]*\})? ([0-9.e+]+)$",
                         line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: graceful, and lets cProfile write its file
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SocatPair:
    """One ``socat TCP-LISTEN TCP`` byte forwarder for one pair."""

    def __init__(self, receiver_port: int) -> None:
        with socket.create_server((LOCALHOST, 0)) as probe:
            port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            ["socat", "-b", str(SOCAT_BUFFER),
             f"TCP-LISTEN:{port},bind={LOCALHOST},reuseaddr,nodelay",
             f"TCP:{LOCALHOST}:{receiver_port},nodelay"],
            stderr=subprocess.DEVNULL,
        )
        self.address = (LOCALHOST, port)
        deadline = time.monotonic() + 10
        while not _listening(port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("socat did not start listening")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _listening(port: int) -> bool:
    hexport = f":{port:04X} "
    with open("/proc/net/tcp") as f:
        return any(hexport in line and line.split()[3] == "0A" for line in f)


# -- one run -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _processes(ctx: Any, n: int, target: Any, cfgs: list[dict[str, Any]]) -> Iterator[list[tuple[Any, Connection]]]:
    procs = []
    try:
        for cfg in cfgs[:n]:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=target, args=(child, cfg), daemon=True)
            p.start()
            procs.append((p, parent))
        yield procs
    finally:
        for _, conn in procs:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("bye")
        for p, _ in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def run_once(kind: str, size: int, pairs: int, warmup: float, duration: float,
             paced_rate: float = 0.0, profile_to: Path | None = None) -> dict[str, Any]:
    """One measurement through ``kind``: relay | relay-cross (two meshed replicas, every sender on
    the first, every receiver on the second) | relay-wss (the senders over WebSocket over TLS, the
    receivers over raw TCP) | relay-wss2 (both ends over WSS) | socat | direct."""
    ctx = mp.get_context("fork")
    keys = [(X25519PrivateKey.generate(), X25519PrivateKey.generate()) for _ in range(pairs)]
    if kind.startswith("relay-workers"):  # relay-workersN: N processes sharing the port
        relays = ReusePortWorkers(int(kind.removeprefix("relay-workers"))).relays
    else:
        relays = (_meshed_relays(2) if kind == "relay-cross" else [RelayProcess(profile_to)] if kind == "relay"
                  else [RelayProcess(extra=WSS_ARGS)] if kind.startswith("relay-wss") else [])
    relay = relays[-1] if relays else None  # where the receivers are (and whose counters are read)
    workers = kind.startswith("relay-workers")
    socats: list[SocatPair] = []
    try:
        wss = relay.wss_address if relay is not None and kind.startswith("relay-wss") else None
        rcfgs = [{"register": relay is not None, "connect": relay.address if relay else None,
                  "private_key": r.private_bytes_raw(), "wss": wss if kind == "relay-wss2" else None,
                  "ca_file": WSS_CA[0] if WSS_CA else None} for _, r in keys]
        with _processes(ctx, pairs, receiver_main, rcfgs) as receivers:
            if relay is not None:
                targets = [relays[0].address] * pairs
            else:
                ports = [conn.recv() for _, conn in receivers]
                if kind == "socat":
                    socats = [SocatPair(port) for port in ports]
                    targets = [s.address for s in socats]
                else:
                    targets = [(LOCALHOST, port) for port in ports]
            scfgs = [{"register": relay is not None, "connect": targets[i], "private_key": s.private_bytes_raw(),
                      "dest_key": public_bytes(r), "size": size, "paced_rate": paced_rate, "wss": wss,
                      "ca_file": WSS_CA[0] if WSS_CA else None}
                     for i, (s, r) in enumerate(keys)]
            with _processes(ctx, pairs, sender_main, scfgs) as senders:
                for _, conn in senders + receivers:
                    if not conn.poll(30):
                        raise RuntimeError(f"{kind}: a generator did not get ready")
                    assert conn.recv() == "ready"
                if workers:  # every worker knows where every receiver is (its own or over the mesh)
                    deadline = time.monotonic() + 10
                    while not all(r.gauge('wirekube_relay_connections\\{state="registered"\\}')
                                  + r.gauge("wirekube_relay_mesh_remote_keys") >= 2 * pairs for r in relays):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{kind}: the keys did not spread over the local mesh")
                        time.sleep(0.02)
                elif len(relays) > 1:  # the senders' replica has learned where every receiver is
                    deadline = time.monotonic() + 10
                    while relays[0].gauge("wirekube_relay_mesh_remote_keys") < pairs:
                        if time.monotonic() > deadline:
                            raise RuntimeError("relay-cross: the receivers' keys did not cross the mesh")
                        time.sleep(0.02)
                now = time.monotonic()
                window = Window(now + 0.2, now + 0.2 + warmup, now + 0.2 + warmup + duration)
                for _, conn in senders + receivers:
                    conn.send((window.start, window.measure, window.end))
                forwarder_pids = [pid for r in relays for pid in r.pids] if relays else [s.proc.pid for s in socats]
                _sleep_until(window.measure)
                cpu0 = {pid: _proc_cpu(pid) for pid in forwarder_pids}
                ours = {os.getpid(), *forwarder_pids, *(p.pid for p, _ in senders + receivers if p.pid)}
                machine0, others0 = _machine_cpu(), _other_process_ticks(ours)
                counters0 = relay.counters() if relay is not None and not workers else {}
                _sleep_until(window.end)
                cpu1 = {pid: _proc_cpu(pid) for pid in forwarder_pids}
                machine1, others1 = _machine_cpu(), _other_process_ticks(ours)
                counters1 = relay.counters() if relay is not None and not workers else {}
                rss = {pid: _peak_rss_kib(pid) for pid in forwarder_pids}
                for _, conn in senders + receivers:  # a forwarder that died leaves its generators waiting
                    if not conn.poll(30):
                        raise RuntimeError(f"{kind}: a generator did not report (its forwarder died?)")
                sender_results = [conn.recv() for _, conn in senders]
                receiver_results = [conn.recv() for _, conn in receivers]
    finally:
        for r in relays:
            r.stop()
        for s in socats:
            s.stop()
    machine = {k: round((machine1[k] - machine0[k]) / CLK_TCK / duration, 2) for k in machine1}
    machine["other_processes_cores"] = round(_ticks_delta(others0, others1) / CLK_TCK / duration, 2)
    result = _summarise(kind, size, pairs, duration, sender_results, receiver_results, cpu0, cpu1, rss,
                        machine)
    if counters1:
        # what the relay itself counted in the window: frames it read = forwarded + dropped
        delta = {k: v - counters0.get(k, 0.0) for k, v in counters1.items()}
        forwarded = delta.get("forwarded_frames_total", 0.0)
        dropped = sum(v for k, v in delta.items() if k.startswith("dropped_frames_total"))
        result["relay_counted"] = {
            "forwarded_frames_per_s": round(forwarded / duration),
            "dropped_frames_per_s": round(dropped / duration),
            "dropped_share": round(dropped / (forwarded + dropped), 3) if forwarded + dropped else 0.0,
            "dropped_by_reason": {k: v for k, v in delta.items() if k.startswith("dropped") and v},
        }
    return result


def _free_ports(count: int) -> list[int]:
    ports = []
    for _ in range(count):
        with socket.create_server((LOCALHOST, 0)) as probe:
            ports.append(probe.getsockname()[1])
    return ports


class MeshedReplicas:
    """Relay processes meshed over loopback on fixed ports, so one can be restarted in place."""

    def __init__(self, count: int) -> None:
        self.secret = Path(tempfile.mkdtemp(prefix="wk-relay-bench-")) / "mesh-secret"
        self.secret.write_text(os.urandom(24).hex())
        self.secret.chmod(0o600)
        self.mesh_ports = _free_ports(count)
        self.ports = _free_ports(count)
        self.relays: list[RelayProcess] = [self._start(i) for i in range(count)]
        self.wait_linked()

    def _start(self, index: int) -> RelayProcess:
        peers = ",".join(f"{LOCALHOST}:{p}" for p in self.mesh_ports)
        return RelayProcess(port=self.ports[index], extra=(
            f"--mesh-listen={LOCALHOST}:{self.mesh_ports[index]}", f"--mesh-peers={peers}",
            f"--mesh-secret-file={self.secret}", "--drain-timeout=5"))

    def restart(self, index: int) -> None:
        self.relays[index] = self._start(index)
        self.wait_linked()

    def wait_linked(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not all(r.gauge("wirekube_relay_mesh_links") == len(self.relays) - 1 for r in self.relays):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the relay replicas did not link")
            time.sleep(0.05)

    def stop(self) -> None:
        for r in self.relays:
            r.stop()


class ReusePortWorkers(MeshedReplicas):
    """``count`` relay processes on ONE address (SO_REUSEPORT: the kernel picks a process per
    connection), meshed over loopback: the ``--workers`` design under test."""

    def __init__(self, count: int) -> None:
        self.shared_port = _free_ports(1)[0]
        super().__init__(count)

    def _start(self, index: int) -> RelayProcess:
        peers = ",".join(f"{LOCALHOST}:{p}" for p in self.mesh_ports)
        return RelayProcess(port=self.shared_port, extra=(
            "--reuse-port", f"--mesh-listen={LOCALHOST}:{self.mesh_ports[index]}", f"--mesh-peers={peers}",
            f"--mesh-secret-file={self.secret}", "--drain-timeout=5"))


def _meshed_relays(count: int) -> list[RelayProcess]:
    """``count`` relay processes meshed over loopback (a shared secret in a temporary file)."""
    return MeshedReplicas(count).relays


def _machine_cpu() -> dict[str, int]:
    """Clock ticks of the whole machine so far, from /proc/stat: busy (all but idle and iowait),
    of which softirq+irq (interrupt work, such as loopback TCP delivery) and steal (taken by the
    hypervisor for other guests)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return {"busy_cores": f[0] + f[1] + f[2] + f[5] + f[6] + f[7], "irq_softirq_cores": f[5] + f[6],
            "steal_cores": f[7]}


def _other_process_ticks(ours: set[int]) -> dict[int, int]:
    """utime+stime of every other process (kernel threads such as ksoftirqd included)."""
    ticks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) in ours:  # a child of ours (the relay under cProfile, socat...)
            continue
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    return ticks


def _ticks_delta(before: dict[int, int], after: dict[int, int]) -> int:
    return sum(t - before.get(pid, 0) for pid, t in after.items() if pid in before)


def _summarise(kind: str, size: int, pairs: int, duration: float, senders: list[dict[str, Any]],
               receivers: list[dict[str, Any]], cpu0: dict[int, tuple[float, float]],
               cpu1: dict[int, tuple[float, float]], rss: dict[int, int],
               machine: dict[str, float]) -> dict[str, Any]:
    frame = size + FRAME_OVERHEAD
    received = sum(r["bytes_received_in_window"] for r in receivers)
    frames = received / frame
    user = sum(cpu1[p][0] - cpu0[p][0] for p in cpu0)
    system = sum(cpu1[p][1] - cpu0[p][1] for p in cpu0)
    latencies = sorted(x for r in receivers for x in r["latencies_ns"])
    forwarder_util = (user + system) / duration
    generator_cpu = sum(x["cpu_s"] for x in senders + receivers)
    busiest = max(x["cpu_s"] for x in senders + receivers) / duration
    ours = (user + system + generator_cpu) / duration
    return {
        "saturation": _saturation(kind, forwarder_util, busiest, {**machine, "ours_cores": ours}),
        "machine_cpu": {**machine, "forwarder_and_generator_cores": round(ours, 2),
                        # CPU the machine spent on anything but this run's processes (other
                        # tenants, including short-lived processes the per-process sum misses)
                        "disturbance_cores": round(max(0.0, machine["busy_cores"] - ours), 2)},
        "target": kind,
        "packet_bytes": size,
        "frame_bytes": frame,
        "pairs": pairs,
        "seconds": duration,
        "frames_per_s": round(frames / duration),
        "mbit_per_s": round(frames * size * 8 / duration / 1e6, 1),
        "latency_us": _percentiles(latencies),
        "forwarder": {
            "processes": len(cpu0),
            "cpu_s": round(user + system, 3),
            "user_cpu_s": round(user, 3),
            "system_cpu_s": round(system, 3),
            "cpu_utilisation": round((user + system) / duration, 3),
            "peak_rss_mib": round(max(rss.values()) / 1024, 1) if rss else None,
            "peak_rss_mib_sum": round(sum(rss.values()) / 1024, 1) if rss else None,
        },
        "generator": {
            "processes": len(senders) + len(receivers),
            "sender_cpu_s": [round(s["cpu_s"], 3) for s in senders],
            "receiver_cpu_s": [round(r["cpu_s"], 3) for r in receivers],
            "cpu_s": round(sum(s["cpu_s"] for s in senders) + sum(r["cpu_s"] for r in receivers), 3),
            "busiest_process_utilisation": round(
                max(x["cpu_s"] for x in senders + receivers) / duration, 3),
        },
    }


def _saturation(kind: str, forwarder_util: float, busiest_generator: float, machine: dict[str, float]) -> str:
    """Which side limited the run, as far as CPU accounting can tell."""
    cpus = os.cpu_count() or 1
    others = max(machine["other_processes_cores"], machine["busy_cores"] - machine["ours_cores"])
    note = f"; {others:.2f} cores went to other processes" if others >= 0.1 else ""
    if kind == "relay" and forwarder_util >= 0.85:
        return f"relay (its one thread is CPU-bound{note})"
    if busiest_generator >= 0.85:
        return f"generator (a generator process is CPU-bound{note})"
    if machine["busy_cores"] >= 0.9 * cpus:
        return f"machine (all {cpus} CPUs busy{note})"
    return f"unclear (nothing CPU-bound by process accounting{note})"


def _percentiles(values: list[int]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p99": None, "samples": 0}
    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] / 1000, 1)
    return {"p50": pick(0.50), "p99": pick(0.99), "samples": len(values)}


# -- the whole benchmark ------------------------------------------------------------------------


def _mean(runs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(v)
    return statistics.fmean(vals)


# Where the relay's time goes, by the function that spends it (cProfile "own" time).
_PROFILE_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("frame scan and key rewrite (the decoder: prefixes checked 64/16/4 frames per struct call, keys rewritten "
     "by map; 64-frame copies for small frames)",
     ("(_scan_run)", "(_block_run)", "'startswith'", "'pack_into'", "'unpack_from'", "'join' of 'bytes'",
      "'count' of 'tuple'", "'count' of 'list'", "(_block_struct)", "(_check_struct)")),
    ("writes to destinations (time in writelines, i.e. the writev syscalls)", ("(_flush)",)),
    ("event loop and reads (uvloop's own time, i.e. epoll and the recv syscalls)",
     ("runners.py", "run_until_complete", "(run)")),
    ("new receive chunks (allocating and zeroing, or refilling one nobody holds)", ("(_new_chunk)", "(_unshared)")),
    ("per-read and per-run bookkeeping (routing, budgets, header checks, pushback)",
     ("(buffer_updated)", "(get_buffer)", "(_forward_frames)", "(next_run)", "(_peek_header)",
      "(_check_header)", "(_accept)", "(_queued_bytes)", "'get_write_buffer_size'", "'time'", "(_hold)",
      "(_unhold)", "(_release_held)", "(pause_writing)", "(resume_writing)")),
]


def profile_relay(size: int, pairs: int, warmup: float, duration: float) -> dict[str, Any]:
    """One extra run with the relay under cProfile: its top functions and a grouped breakdown.

    cProfile makes every Python call dearer, so the shares overstate Python's part; they say
    where the time goes, not what it costs unprofiled."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "relay.prof"
        result = run_once("relay", size, pairs, warmup, duration, profile_to=out)
        stats = pstats.Stats(str(out))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(filename).name}:{line}({func})", "own_s": tt, "cumulative_s": ct,
                     "calls": nc})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    groups: dict[str, float] = {}
    for r in rows:
        name = next((g for g, needles in _PROFILE_GROUPS if any(n in r["function"] for n in needles)),
                    "other (start-up imports, handshakes, metrics)")
        groups[name] = groups.get(name, 0.0) + r["own_s"]
    for r in rows:
        r["own_share"] = round(r["own_s"] / total, 3) if total else None
        r["own_s"] = round(r["own_s"], 3)
        r["cumulative_s"] = round(r["cumulative_s"], 3)
    return {
        "profiled_run_frames_per_s": result["frames_per_s"],
        "relay_user_vs_system_cpu_s": [result["forwarder"]["user_cpu_s"], result["forwarder"]["system_cpu_s"]],
        "share_of_profiled_time": {g: round(t / total, 3) for g, t in sorted(groups.items(), key=lambda x: -x[1])},
        "top_functions_by_own_time": rows[:12],
    }


DISTURBED_CORES = 0.25
"""A throughput run during which more CPU than this went to other processes is run again."""
RETRIES = 1


def undisturbed_run(kind: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """A throughput run, repeated (at most ``RETRIES`` times) when other tenants of the machine
    took more than ``DISTURBED_CORES``; the last attempt is kept whatever it saw."""
    discarded = []
    for _ in range(RETRIES):
        r = run_once(kind, size, args.pairs, args.warmup, args.duration)
        if r["machine_cpu"]["disturbance_cores"] <= DISTURBED_CORES:
            break
        discarded.append({"frames_per_s": r["frames_per_s"], "machine_cpu": r["machine_cpu"]})
        print(f"{size:>5} B {kind}: {r['machine_cpu']['disturbance_cores']} cores went elsewhere; running again",
              file=sys.stderr)
        wait_for_quiet_machine(limit_s=30)
    else:
        r = run_once(kind, size, args.pairs, args.warmup, args.duration)
    r["discarded_disturbed_attempts"] = discarded
    return r


def latency_runs(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Paced runs through direct, socat and relay, interleaved for ``args.rounds`` rounds; the
    percentile of each target is the median over rounds, and added = target - direct."""
    kinds = ("direct", "socat", "relay")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rnd in range(args.rounds):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            runs[kind].append(run_once(kind, size, args.pairs, 0.5, args.latency_duration,
                                       paced_rate=args.latency_rate))
    one_way = {k: {q: statistics.median(r["latency_us"][q] for r in runs[k]) for q in ("p50", "p99")}
               for k in kinds}
    added = {k: {q: round(one_way[k][q] - one_way["direct"][q], 1) for q in ("p50", "p99")}
             for k in ("socat", "relay")}
    print(f"{size:>5} B latency added p50/p99 us: relay {added['relay']} socat {added['socat']}", file=sys.stderr)
    return {
        "rate_frames_per_s_per_pair": args.latency_rate,
        "one_way_us_median_of_rounds": {k: {q: round(v, 1) for q, v in one_way[k].items()} for k in kinds},
        "added_us": added,
        "one_way_us_per_round": {k: [r["latency_us"] for r in runs[k]] for k in kinds},
        "forwarder_cpu_s_per_round": {k: [r["forwarder"]["cpu_s"] for r in runs[k]] for k in ("socat", "relay")},
    }


def cross_replica_runs(args: argparse.Namespace) -> dict[str, Any]:
    """One pair through one relay replica vs the same pair with its ends on two meshed replicas
    (every frame crosses the mesh link once): throughput ratio and added one-way p50 latency, the
    two kinds interleaved for ``args.rounds`` rounds."""
    size, kinds = args.cross_size, ("relay", "relay-cross")
    tput: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    lat: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rnd in range(args.rounds):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            r = run_once(kind, size, 1, args.warmup, args.duration)
            tput[kind].append(r)
            print(f"{size:>5} B {kind:<11} round {rnd}: {r['frames_per_s']:>9} frames/s {r['mbit_per_s']:>8} Mbit/s",
                  file=sys.stderr)
            lat[kind].append(run_once(kind, size, 1, 0.5, args.latency_duration, paced_rate=args.latency_rate))
    one = _mean(tput["relay"], "frames_per_s")
    cross = _mean(tput["relay-cross"], "frames_per_s")
    p50 = {k: statistics.median(r["latency_us"]["p50"] for r in lat[k]) for k in kinds}
    added = round(p50["relay-cross"] - p50["relay"], 1)
    ratio = round(cross / one, 3) if one else None
    print(f"{size:>5} B cross-replica: throughput ratio {ratio}, added p50 {added} us", file=sys.stderr)
    return {
        "size": size, "pairs": 1,
        "one_replica": {"frames_per_s": round(one), "mbit_per_s": round(_mean(tput["relay"], "mbit_per_s"), 1)},
        "two_replicas": {"frames_per_s": round(cross),
                         "mbit_per_s": round(_mean(tput["relay-cross"], "mbit_per_s"), 1)},
        "ratio": ratio,
        "ratio_goal": 0.7,
        "one_way_p50_us": {k: round(v, 1) for k, v in p50.items()},
        "added_p50_us": added,
        "added_p50_goal_us": 200,
        "latency_run": f"{args.latency_rate:g} frames/s for {args.latency_duration:g} s, median of rounds",
        "runs": tput,
    }


WSS_ARGS: tuple[str, ...] = ()
"""The relay's WSS flags for the relay-wss kinds (set up by :func:`setup_wss`)."""
WSS_CA: list[str] = []


def setup_wss(directory: Path) -> None:
    """A CA and a certificate for 127.0.0.1 (``wirekube.lab.certs``), for the relay's WSS listener."""
    global WSS_ARGS
    from wirekube.lab.certs import make_server_cert

    cert = make_server_cert(directory, [], [LOCALHOST])
    WSS_ARGS = ("--wss-listen", f"{LOCALHOST}:0", "--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file))
    WSS_CA[:] = [str(cert.ca_file)]


def wss_runs(args: argparse.Namespace) -> dict[str, Any]:
    """Raw TCP vs WebSocket over TLS through the same relay (issue 19), interleaved for
    ``args.rounds`` rounds at ``args.cross_size`` bytes, one pair: ``relay`` (both ends raw TCP),
    ``relay-wss`` (the sender over WSS: what a node behind a proxy sends) and ``relay-wss2`` (both
    ends over WSS).  Each kind runs with the relay's WSS listener on, so only the transport differs."""
    size, kinds = args.cross_size, ("relay", "relay-wss", "relay-wss2")
    tput: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    loads: dict[str, list[float]] = {k: [] for k in kinds}
    for rnd in range(args.rounds):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            loads[kind].append(round(os.getloadavg()[0], 2))
            r = run_once(kind, size, 1, args.warmup, args.duration)
            tput[kind].append(r)
            print(f"{size:>5} B {kind:<11} round {rnd}: {r['frames_per_s']:>9} frames/s {r['mbit_per_s']:>8} Mbit/s"
                  f"  relay cpu {r['forwarder']['cpu_utilisation']}"
                  f"  generator busiest {r['generator']['busiest_process_utilisation']}"
                  f"  load {loads[kind][-1]}", file=sys.stderr)
    fps = {k: _mean(tput[k], "frames_per_s") for k in kinds}
    ratio = round(fps["relay-wss"] / fps["relay"], 3) if fps["relay"] else None
    both = round(fps["relay-wss2"] / fps["relay"], 3) if fps["relay"] else None
    print(f"{size:>5} B wss/tcp: {ratio} (sender over WSS), {both} (both ends over WSS)", file=sys.stderr)
    return {
        "size": size, "pairs": 1,
        "frames_per_s": {k: round(v) for k, v in fps.items()},
        "relay_cpu_us_per_delivered_frame": {k: _cpu_per_frame(tput[k]) for k in kinds},
        "sender_cpu_us_per_delivered_frame": {k: _cpu_per_frame(tput[k], "sender_cpu_s") for k in kinds},
        "receiver_cpu_us_per_delivered_frame": {k: _cpu_per_frame(tput[k], "receiver_cpu_s") for k in kinds},
        "frames_per_s_per_round": {k: [r["frames_per_s"] for r in tput[k]] for k in kinds},
        "load_average_1m_per_round": loads,
        "other_processes_cores_per_round": {k: [r["machine_cpu"]["disturbance_cores"] for r in tput[k]]
                                            for k in kinds},
        "mbit_per_s": {k: round(_mean(tput[k], "mbit_per_s"), 1) for k in kinds},
        "wss_over_tcp_ratio": ratio,
        "wss_both_ends_over_tcp_ratio": both,
        "ratio_goal": 0.7,
        "what": "one sender/receiver pair through one relay process; relay = both ends raw TCP; relay-wss = the "
                "sender over WebSocket over TLS (the agent's RelayClient over wss://, uvloop), the receiver raw TCP; "
                "relay-wss2 = both ends over WSS; means of the interleaved rounds. On this 2-core machine relay, "
                "sender and receiver share the CPUs, so frames/s follows the CPU all three spend per frame",
        "runs": tput,
    }


def _cpu_per_frame(runs: list[dict[str, Any]], generator: str = "") -> float | None:
    """The relay's (or with ``generator`` = sender_cpu_s | receiver_cpu_s, that generator's) CPU
    microseconds per delivered frame, median over runs: what the transport costs, less at the
    mercy of other processes than frames/s on a shared machine."""
    def cpu(r: dict[str, Any]) -> float:
        return float(sum(r["generator"][generator])) if generator else float(r["forwarder"]["cpu_s"])

    per = [cpu(r) * 1e6 / (r["frames_per_s"] * r["seconds"]) for r in runs if r["frames_per_s"]]
    return round(statistics.median(per), 2) if per else None


def multi_core_runs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--workers`` design measured before choosing it: one relay process vs N processes
    sharing the port (SO_REUSEPORT) meshed over loopback vs socat, ``args.pairs`` pairs, the
    kinds interleaved for ``args.rounds`` rounds; the load average is recorded beside each run."""
    kinds = ("relay", f"relay-workers{args.workers_experiment}", "socat")
    out: dict[str, Any] = {"workers": args.workers_experiment, "pairs": args.pairs,
                           "cpus_usable": len(os.sched_getaffinity(0))}
    for size in [int(x) for x in args.sizes.split(",")]:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        loads: list[float] = []
        failures: list[str] = []
        for rnd in range(args.rounds):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                loads.append(round(os.getloadavg()[0], 2))
                try:
                    r = run_once(kind, size, args.pairs, args.warmup, args.duration)
                except RuntimeError as e:  # recorded, not fatal: the other runs still tell
                    print(f"{size:>5} B {kind:<15} round {rnd}: failed: {e}", file=sys.stderr)
                    failures.append(f"{size} B {kind} round {rnd}: {e}")
                    continue
                runs[kind].append(r)
                print(f"{size:>5} B {kind:<15} round {rnd}: {r['frames_per_s']:>9} frames/s "
                      f"forwarder cpu {r['forwarder']['cpu_utilisation']} load {loads[-1]}", file=sys.stderr)
        fps = {k: _mean(runs[k], "frames_per_s") if runs[k] else 0.0 for k in kinds}
        out[f"{size}B"] = {
            "frames_per_s": {k: round(v) for k, v in fps.items()},
            "ratio_single_over_socat": round(fps["relay"] / fps["socat"], 3) if fps["socat"] else None,
            "ratio_workers_over_socat": round(fps[kinds[1]] / fps["socat"], 3) if fps["socat"] else None,
            "ratio_workers_over_single": round(fps[kinds[1]] / fps["relay"], 3) if fps["relay"] else None,
            "forwarder_cpu_utilisation": {k: [r["forwarder"]["cpu_utilisation"] for r in runs[k]] for k in kinds},
            "load_average_1m_per_run": loads,
            "failed_runs": failures,
        }
        print(f"{size:>5} B multi-core: {json.dumps({k: v for k, v in out[f'{size}B'].items() if 'ratio' in k})}",
              file=sys.stderr)
    return out


def failover_runs() -> dict[str, Any]:
    """Two meshed replicas behind a load balancer (a TCP proxy on 127.0.0.1 that picks a replica
    per connection), one relayed pair with its ends on different replicas, 10 datagrams/s; each
    end reconnects through the load balancer as the agent does (``backoff_delays``).  Measured:
    the longest gap at the receiver after kill -9 of the sender's replica, and over a rolling
    restart of both (SIGTERM: GoAway, the clients move before the replica closes)."""
    import asyncio
    import random

    import uvloop

    from wirekube.relay.client import RelayClient, RelayError, backoff_delays

    replicas = MeshedReplicas(2)

    async def main() -> dict[str, Any]:
        force: list[int] = [0, 1]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            index = force.pop(0) if force else random.randrange(2)
            try:
                up_r, up_w = await asyncio.open_connection(LOCALHOST, replicas.ports[index])
            except OSError:
                writer.close()
                return

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            with contextlib.suppress(asyncio.CancelledError):  # the load balancer closing at the end
                await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

        lb = await asyncio.start_server(handle, LOCALHOST, 0)
        lb_port = lb.sockets[0].getsockname()[1]
        arrivals: list[float] = []
        reconnects = [0]

        async def endpoint(key: X25519PrivateKey, on_data: Any) -> list[RelayClient]:
            holder = [await RelayClient.connect(LOCALHOST, lb_port, key, on_data=on_data)]

            async def keep() -> None:
                while True:
                    await holder[0].wait_closed()
                    for delay in backoff_delays():
                        await asyncio.sleep(delay)
                        with contextlib.suppress(OSError, RelayError, TimeoutError):
                            holder[0] = await RelayClient.connect(LOCALHOST, lb_port, key, on_data=on_data)
                            reconnects[0] += 1
                            break

            tasks.append(asyncio.get_running_loop().create_task(keep()))
            return holder

        tasks: list[asyncio.Task[None]] = []
        a_key, b_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        a = await endpoint(a_key, lambda *_: None)
        await endpoint(b_key, lambda *_: arrivals.append(time.monotonic()))
        b_pub = public_bytes(b_key)

        async def gap_during(seconds: float, action: Any) -> float:
            start = time.monotonic()
            arrivals.clear()
            acting: asyncio.Future[None] | None = None
            while time.monotonic() - start < seconds or (acting is not None and not acting.done()):
                if acting is None and time.monotonic() - start > 1.0:
                    acting = asyncio.get_running_loop().run_in_executor(None, action)  # pings go on meanwhile
                with contextlib.suppress(RelayError):
                    a[0].send(b_pub, b"ping")
                await asyncio.sleep(0.1)
            if acting is not None:
                await acting
            await asyncio.sleep(0.3)
            stamps = [start, *arrivals]
            return max(y - x for x, y in itertools.pairwise(stamps))

        def kill_9() -> None:
            replicas.relays[0].proc.kill()
            replicas.relays[0].proc.wait()

        kill_gap = await gap_during(5.0, kill_9)
        await asyncio.get_running_loop().run_in_executor(None, replicas.restart, 0)
        kill_reconnects = reconnects[0]

        def rolling() -> None:
            for i in range(2):
                replicas.relays[i].stop()  # SIGTERM: drain, then exit
                replicas.restart(i)

        roll_gap = await gap_during(3.0, rolling)
        for t in tasks:
            t.cancel()
        lb.close()
        return {"kill_9_longest_gap_s": round(kill_gap, 3), "kill_9_goal_s": 3.0,
                "kill_9_reconnects": kill_reconnects,
                "rolling_restart_longest_gap_s": round(roll_gap, 3), "rolling_restart_goal_s": 1.0,
                "rolling_restart_reconnects": reconnects[0] - kill_reconnects,
                "setup": "2 replicas on 127.0.0.1 behind a userspace TCP load balancer, 1 pair split "
                         "across them, 10 datagrams/s; the lab measures the same with nftables DNAT, real "
                         "agents and WireGuard (tests/integration/test_lab_e2e.py)"}

    try:
        result = uvloop.run(main())
    finally:
        replicas.stop()
    print(f"failover: kill -9 longest gap {result['kill_9_longest_gap_s']} s, rolling restart "
          f"{result['rolling_restart_longest_gap_s']} s", file=sys.stderr)
    return result


def _cross_summary(c: dict[str, Any]) -> dict[str, Any]:
    return {"cross_replica_ratio": c["ratio"], "goal": c["ratio_goal"], "met": (c["ratio"] or 0) >= c["ratio_goal"],
            "added_p50_us": c["added_p50_us"], "added_p50_goal_us": c["added_p50_goal_us"],
            "added_p50_met": c["added_p50_us"] <= c["added_p50_goal_us"],
            "one_replica_mbit_per_s": c["one_replica"]["mbit_per_s"],
            "two_replicas_mbit_per_s": c["two_replicas"]["mbit_per_s"]}


def wait_for_quiet_machine(limit_s: float = 60.0, busy_share: float = 0.3) -> float:
    """Wait (bounded) until the CPUs are mostly idle, so other work does not skew the figures;
    returns the busy share measured last."""
    deadline = time.monotonic() + limit_s
    while True:
        busy = _busy_share(1.0)
        if busy < busy_share or time.monotonic() > deadline:
            return busy
        print(f"machine {busy:.0%} busy; waiting for it to quieten", file=sys.stderr)


def _busy_share(interval: float) -> float:
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return idle, sum(fields)

    idle0, total0 = sample()
    time.sleep(interval)
    idle1, total1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/relay.json"))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--sizes", default="1400,100")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per throughput run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved relay/socat rounds per size")
    p.add_argument("--latency-rate", type=float, default=1000.0, help="frames/s per pair in the paced run")
    p.add_argument("--latency-duration", type=float, default=2.0)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--cross-size", type=int, default=1400, help="datagram size of the cross-replica comparison")
    p.add_argument("--cross-only", action="store_true",
                   help="run only the cross-replica comparison and update that part of --out")
    p.add_argument("--wss-only", action="store_true",
                   help="run only the raw TCP vs WSS comparison and update that part of --out")
    p.add_argument("--workers-experiment", type=int, default=0, metavar="N",
                   help="run only the multi-core comparison (one process vs N sharing the port vs socat) and "
                        "record it under multi_core_experiment in --out")
    args = p.parse_args(argv)
    if shutil.which("socat") is None:
        print("socat is missing: apt-get install -y socat", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    wss_dir = tempfile.TemporaryDirectory(prefix="wirekube-bench-wss-")
    setup_wss(Path(wss_dir.name))
    if args.wss_only:
        wait_for_quiet_machine()
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        load_before = os.getloadavg()[0]
        results["wss"] = wss_runs(args)
        results["wss"]["load_average_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        results["wss_over_tcp_ratio"] = results["wss"]["wss_over_tcp_ratio"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in results["wss"].items() if k != "runs"}, indent=2))
        return 0
    if args.workers_experiment:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        results["multi_core_experiment"] = multi_core_runs(args)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if args.cross_only:
        wait_for_quiet_machine()
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        load_before = os.getloadavg()[0]
        results["cross_replica"] = cross_replica_runs(args)
        results["cross_replica"]["load_average_1m_before_after"] = [round(load_before, 2),
                                                                    round(os.getloadavg()[0], 2)]
        results["cross_replica_ratio"] = results["cross_replica"]["ratio"]
        results["failover"] = failover_runs()
        results.setdefault("summary", {})["cross_replica"] = _cross_summary(results["cross_replica"])
        results["summary"]["failover"] = results["failover"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["summary"]["cross_replica"], indent=2))
        return 0
    busy_before = wait_for_quiet_machine()
    started = time.monotonic()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"throughput": {}, "added_latency": {}}

    for size in sizes:
        runs: dict[str, list[dict[str, Any]]] = {"relay": [], "socat": []}
        for rnd in range(args.rounds):
            order = ("socat", "relay") if rnd % 2 == 0 else ("relay", "socat")
            for kind in order:
                r = undisturbed_run(kind, size, args)
                runs[kind].append(r)
                print(f"{size:>5} B {kind:<5} round {rnd}: {r['frames_per_s']:>9} frames/s "
                      f"{r['mbit_per_s']:>8} Mbit/s  forwarder cpu {r['forwarder']['cpu_utilisation']}"
                      f"  generator busiest {r['generator']['busiest_process_utilisation']}", file=sys.stderr)
        relay_fps = _mean(runs["relay"], "frames_per_s")
        socat_fps = _mean(runs["socat"], "frames_per_s")
        results["throughput"][str(size)] = {
            "relay": {"frames_per_s": round(relay_fps), "mbit_per_s": round(_mean(runs["relay"], "mbit_per_s"), 1)},
            "socat": {"frames_per_s": round(socat_fps), "mbit_per_s": round(_mean(runs["socat"], "mbit_per_s"), 1)},
            "ratio": round(relay_fps / socat_fps, 3) if socat_fps else None,
            "runs": runs,
        }

    for size in sizes:
        results["added_latency"][str(size)] = latency_runs(size, args)

    results["cross_replica"] = cross_replica_runs(args)
    results["cross_replica_ratio"] = results["cross_replica"]["ratio"]
    results["wss"] = wss_runs(args)
    results["wss_over_tcp_ratio"] = results["wss"]["wss_over_tcp_ratio"]
    results["failover"] = failover_runs()

    if not args.no_profile:
        results["where_the_time_goes_profiled"] = {
            f"{size}B": profile_relay(size, args.pairs, args.warmup, min(args.duration, 4)) for size in sizes
        }

    results["summary"] = _summary(results, sizes)
    results["summary"]["cross_replica"] = _cross_summary(results["cross_replica"])
    results["summary"]["failover"] = results["failover"]
    results["goals"] = {
        f"{size}B": {"ratio_goal": goal, "ratio": results["throughput"][str(size)]["ratio"],
                     "met": (results["throughput"][str(size)]["ratio"] or 0) >= goal}
        for size, goal in ((1400, 0.8), (100, 0.1)) if size in sizes
    }
    results["setup"] = _setup(args, time.monotonic() - started)
    results["setup"]["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    results["setup"]["cpu_busy_share_before_start"] = round(busy_before, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    return 0


def _summary(results: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sizes:
        t = results["throughput"][str(size)]
        relay_runs = t["runs"]["relay"]
        socat_runs = t["runs"]["socat"]
        lat = results["added_latency"][str(size)]
        out[f"{size}B"] = {
            "relay_frames_per_s": t["relay"]["frames_per_s"],
            "relay_mbit_per_s": t["relay"]["mbit_per_s"],
            "socat_frames_per_s": t["socat"]["frames_per_s"],
            "socat_mbit_per_s": t["socat"]["mbit_per_s"],
            "ratio_relay_over_socat": t["ratio"],
            "relay_loaded_latency_us": relay_runs[-1]["latency_us"],
            "socat_loaded_latency_us": socat_runs[-1]["latency_us"],
            "relay_added_latency_us_at_light_load": lat["added_us"]["relay"],
            "socat_added_latency_us_at_light_load": lat["added_us"]["socat"],
            "relay_cpu_s_per_run": [r["forwarder"]["cpu_s"] for r in relay_runs],
            # CPU per delivered frame: unlike frames/s, barely moved by what else the machine runs
            "relay_cpu_us_per_delivered_frame": [_cpu_us_per_frame(r) for r in relay_runs],
            "socat_cpu_us_per_delivered_frame": [_cpu_us_per_frame(r) for r in socat_runs],
            "relay_over_socat_cpu_per_frame_median": round(
                statistics.median(_cpu_us_per_frame(r) for r in relay_runs)
                / statistics.median(_cpu_us_per_frame(r) for r in socat_runs), 3),
            "relay_cpu_utilisation": [r["forwarder"]["cpu_utilisation"] for r in relay_runs],
            "relay_user_vs_system_cpu_s": [[r["forwarder"]["user_cpu_s"], r["forwarder"]["system_cpu_s"]]
                                           for r in relay_runs],
            "relay_peak_rss_mib": max(r["forwarder"]["peak_rss_mib"] for r in relay_runs),
            "relay_dropped_share": [r.get("relay_counted", {}).get("dropped_share") for r in relay_runs],
            "relay_read_frames_per_s": [
                r["relay_counted"]["forwarded_frames_per_s"] + r["relay_counted"]["dropped_frames_per_s"]
                for r in relay_runs if "relay_counted" in r
            ],
            "saturation": {"relay_runs": [r["saturation"] for r in relay_runs],
                           "socat_runs": [r["saturation"] for r in socat_runs]},
            "machine_cpu": {"relay_runs": [r["machine_cpu"] for r in relay_runs],
                            "socat_runs": [r["machine_cpu"] for r in socat_runs]},
            "socat_cpu_utilisation_sum": [r["forwarder"]["cpu_utilisation"] for r in socat_runs],
            "generator_cpu_s_relay_runs": [r["generator"]["cpu_s"] for r in relay_runs],
            "generator_cpu_s_socat_runs": [r["generator"]["cpu_s"] for r in socat_runs],
            "generator_busiest_process_utilisation": {
                "relay_runs": [r["generator"]["busiest_process_utilisation"] for r in relay_runs],
                "socat_runs": [r["generator"]["busiest_process_utilisation"] for r in socat_runs],
            },
        }
    return out


def _cpu_us_per_frame(run: dict[str, Any]) -> float:
    frames = run["frames_per_s"] * run["seconds"]
    return round(run["forwarder"]["cpu_s"] / frames * 1e6, 3) if frames else float("nan")


def _setup(args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    socat_version = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout.splitlines()
    return {
        "command": "make bench-relay (.venv/bin/python bench/relay_bench.py --out bench/results/relay.json)",
        "pairs": args.pairs,
        "generator": "per pair one sender and one receiver process (blocking sockets; ~64 KiB blobs of "
                     "prebuilt frames; stamps found with bytes.find)",
        "throughput_seconds_per_run": args.duration,
        "warmup_seconds": args.warmup,
        "rounds": args.rounds,
        "latency_run": f"{args.latency_rate:g} frames/s per pair for {args.latency_duration:g} s, one-way, "
                       "CLOCK_MONOTONIC stamps, direct/socat/relay interleaved for the rounds; added = median "
                       "over rounds of the percentile minus the direct connection's",
        "loaded_latency": "one-way latency of the stamped frame of each blob during the throughput runs; "
                          "it includes time queued in the sender's socket buffer, so it is mostly queueing",
        "socat": f"{socat_version[1] if len(socat_version) > 1 else '?'}; one process per pair, -b {SOCAT_BUFFER}, "
                 "nodelay on both sides",
        "relay": "wirekube-relay console entry point (uvloop), one process",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "elapsed_seconds": round(elapsed, 1),
        "disturbed_runs": f"a throughput run during which more than {DISTURBED_CORES} cores went to other "
                          "processes (machine busy time minus this run's processes) is repeated, at most "
                          f"{RETRIES} time (see discarded_disturbed_attempts)",
        "limits": "Everything shares this machine's CPUs: relay (single-threaded), socat processes, "
                  "2 x pairs generator processes and the kernel's loopback TCP work.  Compare the ratio, "
                  "not the absolutes; see each run's saturation, forwarder and generator CPU to tell which "
                  "side saturated.  The load is open-loop (senders never slow down).  socat answers a slow "
                  "receiver by reading less; the relay drops what a full destination queue cannot take "
                  "(relay_dropped_share) and stops reading a sender whose frames all go to congested "
                  "destinations until one drains or --backpressure-hold (20 ms) passes, so it spends little "
                  "CPU on frames it would drop.  WireGuard carrying TCP backs off on drops; this generator "
                  "does not.  The relay is one thread; socat is one process per pair, so on these 2 CPUs "
                  "socat can use both and the relay at most one.",
        "bounded_by": "rounds x sizes x 2 targets x (warm-up + measured seconds + ~1.5 s set-up), at most one "
                      "repeat per disturbed run, paced latency runs, and two profiled runs: about 3 minutes",
    }


if __name__ == "__main__":
    sys.exit(main())
