"""UDP from the port WireGuard holds: raw sockets for STUN and path probes.

NAT traversal only works if STUN sees the *same* mapping WireGuard's own packets get, so the
Binding requests must leave from WireGuard's listen port, which the engine (kernel module or
wireguard-go) has bound. A raw ``IPPROTO_UDP`` socket lets us send a datagram with any source
port (we build the UDP header; the kernel builds the IP header), and a second raw socket
receives a copy of every inbound UDP datagram, from which we pick the answers by port and STUN
transaction ID. WireGuard keeps its socket throughout (it sees the answers too and ignores them
as invalid). Needs CAP_NET_RAW. Packets carry WireGuard's fwmark so that policy routing sends
them outside the tunnel, exactly like WireGuard's own.

Measured on these machines (environment-notes.md): behind a masquerade router this returns the
router's address with port 51822, the very mapping WireGuard's packets use.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aioice import stun

from wirekube.models import FWMARK
from wirekube.traversal.nat import StunSample

SO_MARK = 36


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def udp_packet(src_ip: str, dst_ip: str, src_port: int, dst_port: int, payload: bytes) -> bytes:
    """A UDP header + payload with a correct checksum over the IPv4 pseudo-header."""
    length = 8 + len(payload)
    header = struct.pack("!HHHH", src_port, dst_port, length, 0)
    pseudo = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    csum = checksum(pseudo + header + payload) or 0xFFFF
    return struct.pack("!HHHH", src_port, dst_port, length, csum) + payload


def parse_ipv4_udp(packet: bytes) -> tuple[str, int, str, int, bytes] | None:
    """(src_ip, src_port, dst_ip, dst_port, payload) of a raw IPv4 packet, or None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_UDP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    src_port, dst_port, length = struct.unpack_from("!HHH", packet, ihl)
    payload = packet[ihl + 8 : ihl + length]
    return socket.inet_ntoa(packet[12:16]), src_port, socket.inet_ntoa(packet[16:20]), dst_port, payload


def source_address_for(dst_ip: str, mark: int = FWMARK) -> str:
    """The source address the kernel picks toward ``dst_ip`` for packets carrying ``mark``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        with contextlib.suppress(OSError):
            probe.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        probe.connect((dst_ip, 9))  # no packet is sent
        return str(probe.getsockname()[0])


class PortSocket:
    """Send from, and receive to, ``local_port`` without owning it."""

    def __init__(self, local_port: int, *, mark: int = FWMARK) -> None:
        self.local_port = local_port
        self.mark = mark
        self._tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self._rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self._tx.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self._rx.setblocking(False)

    def close(self) -> None:
        self._tx.close()
        self._rx.close()

    def __enter__(self) -> PortSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, dst_ip: str, dst_port: int, payload: bytes) -> None:
        src_ip = source_address_for(dst_ip, self.mark)
        self._tx.sendto(udp_packet(src_ip, dst_ip, self.local_port, dst_port, payload), (dst_ip, 0))

    def recv(self, timeout: float) -> tuple[str, int, bytes] | None:
        """The next datagram addressed to ``local_port`` within ``timeout`` s: (src_ip, src_port, payload)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._rx], [], [], left)
            if not ready:
                return None
            try:
                packet = self._rx.recv(65535)
            except BlockingIOError:
                continue
            parsed = parse_ipv4_udp(packet)
            if parsed and parsed[3] == self.local_port:
                return parsed[0], parsed[1], parsed[4]


@dataclass(frozen=True)
class StunTarget:
    label: str  # host:port as configured
    ip: str
    port: int


def resolve(servers: Iterable[str]) -> list[StunTarget]:
    out = []
    for text in servers:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        try:
            ip = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
        except (OSError, ValueError, IndexError):
            continue
        out.append(StunTarget(text, str(ip), int(port)))
    return out


def stun_probe(
    targets: Sequence[StunTarget], local_port: int, *, timeout: float = 2.0, attempts: int = 3
) -> list[StunSample]:
    """Binding requests to every target from ``local_port``; the answers in target order.

    Each request is retransmitted up to ``attempts`` times within ``timeout``; a target that never
    answers is simply absent from the result.
    """
    requests = {}
    for t in targets:
        msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        requests[msg.transaction_id] = (t, bytes(msg))
    answers: dict[str, StunSample] = {}
    with PortSocket(local_port) as sock:
        for _ in range(attempts):
            for t, raw in requests.values():
                if t.label not in answers:
                    sock.send(t.ip, t.port, raw)
            window_end = time.monotonic() + timeout / attempts
            while len(answers) < len(requests) and time.monotonic() < window_end:
                got = sock.recv(window_end - time.monotonic())
                if got is None:
                    break
                _, _, payload = got
                try:
                    response = stun.parse_message(payload)
                except (ValueError, struct.error, IndexError):
                    continue
                entry = requests.get(response.transaction_id)
                if entry is None or response.message_class != stun.Class.RESPONSE:
                    continue
                mapped = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get("MAPPED-ADDRESS")
                if mapped:
                    answers[entry[0].label] = StunSample(entry[0].label, str(mapped[0]), int(mapped[1]))
            if len(answers) == len(requests):
                break
    return [answers[t.label] for t in targets if t.label in answers]
