"""A STUN probe for checking a lab site's NAT from inside it: one UDP socket, many questions.

One shot (prints one JSON object)::

    python -m wirekube.lab.stunprobe --bind 0.0.0.0:40000 --server 198.18.0.2:3478 \\
        --server 198.18.0.3:3478 [--timeout 2]
    {"local": "0.0.0.0:40000", "results": [{"server": "198.18.0.2:3478",
     "mapped": "198.18.2.2:40000"}, ...]}

Interactive (``--interactive``): reads one JSON command per line on stdin and answers one JSON
line on stdout, all on the same UDP socket, so a test can ask for a mapping, have something
sent to it from elsewhere, and ask again:

- ``{"op": "stun", "server": "H:P", "timeout": 2}`` -> ``{"mapped": "H:P", "from": "H:P"}``
  or ``{"error": "timeout"}`` (requests are retransmitted every 250 ms until the timeout);
- ``{"op": "tcp", "to": "H:P"}`` -> ``{"connected": "LOCAL:PORT"}`` or ``{"error": ...}``;
- ``{"op": "send", "to": "H:P", "data": "text"}`` -> ``{"sent": N}``;
- ``{"op": "recv", "timeout": 2}`` -> ``{"from": "H:P", "data": "text"}`` or
  ``{"error": "timeout"}`` (non-STUN datagrams, including ones that arrived earlier);
- ``{"op": "drain"}`` -> ``{"datagrams": [{"from", "data"}...]}`` (everything non-STUN so far).

Pure standard library plus ``aioice.stun`` for the wire format; blocking sockets.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
from collections import deque
from typing import Any

from aioice import stun

RETRANSMIT_S = 0.25


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _request() -> stun.Message:
    return stun.Message(stun.Method.BINDING, stun.Class.REQUEST)


def _mapped(message: stun.Message) -> str | None:
    addr = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get("MAPPED-ADDRESS")
    return _fmt(addr) if addr else None


class Probe:
    def __init__(self, bind: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.other: deque[tuple[str, str]] = deque()  # (from, data) of non-STUN datagrams

    @property
    def local(self) -> str:
        return _fmt(self.sock.getsockname())

    def _receive(self, timeout: float) -> tuple[bytes, tuple[str, int]] | None:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return None
        return self.sock.recvfrom(65535)

    def stun(self, server: tuple[str, int], timeout: float) -> dict[str, Any]:
        request = _request()
        payload = bytes(request)
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                try:
                    self.sock.sendto(payload, server)
                except OSError as e:  # e.g. EPERM from a local firewall
                    return {"error": f"send: {e}"}
                next_send = now + RETRANSMIT_S
            got = self._receive(min(next_send, deadline) - time.monotonic())
            if got is None:
                continue
            data, source = got
            try:
                message = stun.parse_message(data)
            except ValueError:
                self.other.append((_fmt(source), data.decode("utf-8", "replace")))
                continue
            if message.transaction_id == request.transaction_id:
                return {"mapped": _mapped(message), "from": _fmt(source)}
        return {"error": "timeout"}

    def recv(self, timeout: float) -> dict[str, Any]:
        if self.other:
            sender, text = self.other.popleft()
            return {"from": sender, "data": text}
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self._receive(left)
            if got is None:
                break
            data, source = got
            try:
                stun.parse_message(data)
                continue  # a late STUN answer
            except ValueError:
                return {"from": _fmt(source), "data": data.decode("utf-8", "replace")}
        return {"error": "timeout"}

    def drain(self) -> dict[str, Any]:
        while (got := self._receive(0)) is not None:
            data, source = got
            try:
                stun.parse_message(data)
            except ValueError:
                self.other.append((_fmt(source), data.decode("utf-8", "replace")))
        out = [{"from": s, "data": d} for s, d in self.other]
        self.other.clear()
        return {"datagrams": out}

    def send(self, to: tuple[str, int], data: str) -> dict[str, Any]:
        return {"sent": self.sock.sendto(data.encode(), to)}


def tcp_connect(server: tuple[str, int], timeout: float) -> dict[str, Any]:
    """Open (and close) one TCP connection: does TCP get out?"""
    try:
        with socket.create_connection(server, timeout=timeout) as conn:
            return {"connected": _fmt(conn.getsockname())}
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _command(probe: Probe, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    timeout = float(cmd.get("timeout", 2.0))
    if op == "stun":
        server = _hostport(cmd["server"])
        return probe.stun(server, timeout)
    if op == "tcp":
        return tcp_connect(_hostport(cmd["to"]), timeout)
    if op == "send":
        return probe.send(_hostport(cmd["to"]), str(cmd.get("data", "")))
    if op == "recv":
        return probe.recv(timeout)
    if op == "drain":
        return probe.drain()
    return {"error": f"unknown op {op!r}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wirekube.lab.stunprobe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default="0.0.0.0:0", type=_hostport, help="local ADDRESS:PORT")
    parser.add_argument("--server", action="append", default=[], type=_hostport)
    parser.add_argument("--tcp", action="store_true",
                        help="only open a TCP connection to each server (does TCP get out?)")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--interactive", action="store_true")
    args = parser.parse_args(argv)
    probe = Probe(args.bind)
    if args.interactive:
        print(json.dumps({"local": probe.local}), flush=True)
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(_command(probe, json.loads(line))), flush=True)
        return 0
    results = []
    for server in args.server:
        result = tcp_connect(server, args.timeout) if args.tcp else probe.stun(server, args.timeout)
        results.append({"server": _fmt(server), **result})
    print(json.dumps({"local": probe.local, "results": results}))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
