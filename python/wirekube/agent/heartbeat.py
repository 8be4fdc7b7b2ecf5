"""The traversal's heartbeat: ICMP echoes through the tunnel that keep every peer's rx moving.

See :data:`wirekube.agent.pathstate.DIRECT_KEEPALIVE` for why, and
:mod:`wirekube.traversal.liveness` for the rate.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from wirekube.agent.pathstate import urgent
from wirekube.models import RelayMode
from wirekube.traversal import liveness, rawudp

if TYPE_CHECKING:
    from wirekube.agent.traversal import Traversal

HEARTBEAT_POLL_SECONDS = 0.05
HEARTBEAT_PAYLOAD = b"wirekube-heartbeat"
AGENT_PROBE_PREFIX = b"wirekube-"  # the agent's other echo probes (path MTU) start so


class Heartbeat:
    """Owns the heartbeat thread's raw ICMP socket and the per-peer counts of heartbeats sent and
    answered (:class:`~wirekube.traversal.liveness.Beats`), which the ticker reads."""

    def __init__(self, owner: Traversal) -> None:
        self._t = owner
        self._beats: dict[str, liveness.Beats] = {}  # by peer name, written under the owner's lock

    def beats(self, name: str) -> liveness.Beats:
        """What was counted for ``name`` so far (call with the owner's lock held)."""
        return self._beats.get(name, liveness.Beats())

    def run(self) -> None:
        """ICMP echo through wire_kube to each peer's mesh IP when its liveness says one is due;
        counts the heartbeat packets each peer sends and answers (see HEARTBEAT_POLL_SECONDS)."""
        t = self._t
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as e:
            t._log.warning("no ICMP heartbeat ({}); failover relies on keepalives", e)
            return
        sock.setblocking(False)
        ident, seq = os.getpid() & 0xFFFF, 0
        packet = b""
        while not t._stop.wait(HEARTBEAT_POLL_SECONDS):
            with t._lock:
                by_ip = {str(p.mesh_ip): n for n, p in t._view.peers.items() if p.mesh_ip is not None}
            targets = self.due(time.monotonic(), by_ip, _drain_heartbeats(sock, by_ip))
            seq = (seq + 1) & 0xFFFF
            if targets:
                packet = icmp_echo(ident, seq)
            for ip in targets:
                with contextlib.suppress(OSError):
                    sock.sendto(packet, (ip, 0))
        sock.close()

    def due(self, now: float, by_ip: Mapping[str, str], seen: Mapping[str, liveness.Beats]) -> list[str]:
        """Count the agents' echo packets received (``seen``, per peer name) and return the mesh IPs
        a heartbeat is due to now (counted as sent)."""
        t = self._t
        targets: list[str] = []
        with t._lock:
            # Only relay.mode auto proves paths and fails over; in never/always nothing is urgent.
            auto = t._view.mesh is not None and t._view.mesh.spec.relay.mode is RelayMode.AUTO
            for ip, name in by_ip.items():
                b, got = self._beats.get(name, liveness.Beats()), seen.get(name, liveness.Beats())
                state = t._peers.get(name)
                due = state is not None and liveness.due(state.live, now, auto and urgent(state))
                if state is not None and due:
                    state.live = liveness.beat(state.live, now)
                    targets.append(ip)
                self._beats[name] = liveness.Beats(b.sent + int(due), b.answered + got.answered,
                                                   b.requests + got.requests, b.probe_bytes + got.probe_bytes)
            for name in list(self._beats):
                if name not in t._peers:
                    del self._beats[name]
        return targets


def _drain_heartbeats(sock: socket.socket, by_ip: Mapping[str, str], limit: int = 4096) -> dict[str, liveness.Beats]:
    """Read what the raw ICMP socket holds: per peer name, the agents' own echo traffic from that
    peer's mesh IP (``answered``/``requests``: heartbeats; ``probe_bytes``: other probes such as
    path MTU's, each counted with its answer).  Anything else (users' pings) is traffic."""
    out: dict[str, liveness.Beats] = {}
    for _ in range(limit):
        try:
            data, (src, _port) = sock.recvfrom(65535)
        except OSError:  # BlockingIOError: drained
            break
        name = by_ip.get(src)
        ihl = (data[0] & 0x0F) * 4 if data else 0
        if name is None or len(data) < ihl + 8 or data[ihl] not in (0, 8):
            continue
        payload = data[ihl + 8:]
        b = out.get(name, liveness.Beats())
        if payload == HEARTBEAT_PAYLOAD:
            b = replace(b, answered=b.answered + 1) if data[ihl] == 0 else replace(b, requests=b.requests + 1)
        elif payload.startswith(AGENT_PROBE_PREFIX):
            b = replace(b, probe_bytes=b.probe_bytes + 2 * liveness.wire_size(len(data)))
        else:
            continue
        out[name] = b
    return out


def icmp_echo(ident: int, seq: int, payload: bytes = HEARTBEAT_PAYLOAD) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = rawudp.checksum(header + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload
