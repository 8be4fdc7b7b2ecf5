"""Direct-path probes from the WireGuard port, beside the relayed traffic.

A relayed peer retries direct every ``directRetryIntervalSeconds``. Pointing WireGuard at the
direct endpoint to "try" would drop traffic whenever direct still does not work, so instead the
two agents exchange small probes *from their WireGuard ports* (raw sockets, see
:mod:`wirekube.traversal.rawudp`): a ping that reaches the peer proves our NAT mapping and the
peer's filter let it in; the pong that comes back proves the reverse. Only then does the agent
move WireGuard's endpoint. The same exchange punches the holes for port-restricted cones.

Probe datagram (62 bytes)::

    b"WKDP" | version (1) | kind (1: ping, 2: pong, 3: choose, 4: chosen) | sender public key (32) | nonce (8)
    | HMAC-SHA256(X25519(own private, peer public), header + key + nonce)[:16]

The MAC uses the static-static X25519 secret both peers can compute from the keys they already
publish, so nobody else can fake a pong and lure a peer onto a dead path.

The listener's raw socket carries a classic BPF filter so the kernel copies to user space only
UDP datagrams to the WireGuard port that start with "WK" (probes, the relay's NAT probes) or carry
the STUN magic cookie, never the tunnel's own traffic.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from loguru import logger

from wirekube.traversal.rawudp import PortSocket, parse_ipv4_udp

MAGIC = b"WKDP"
VERSION = 1
PING, PONG = 1, 2
CHOOSE, CHOSEN = 3, 4  # birthday attack: the leader settles on one proven flow, the peer confirms
LENGTH = 62
_HEADER = struct.Struct("!4sBB")
STUN_COOKIE = 0x2112A442
NAT_PROBE_MAGIC = b"WKNP"


@dataclass(frozen=True)
class Probe:
    kind: int
    sender: bytes
    nonce: bytes


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()[:16]


def shared_secret(own: X25519PrivateKey, peer_public: bytes) -> bytes:
    return own.exchange(X25519PublicKey.from_public_bytes(peer_public))


def encode(kind: int, sender: bytes, nonce: bytes, secret: bytes) -> bytes:
    body = _HEADER.pack(MAGIC, VERSION, kind) + sender + nonce
    return body + _mac(secret, body)


def decode(payload: bytes, secret_for: Callable[[bytes], bytes | None],
           kinds: tuple[int, ...] = (PING, PONG)) -> Probe | None:
    """A verified probe of one of ``kinds``, or None (not a probe, unknown sender, bad MAC)."""
    if len(payload) != LENGTH or not payload.startswith(MAGIC):
        return None
    _, version, kind = _HEADER.unpack_from(payload)
    if version != VERSION or kind not in kinds:
        return None
    sender, nonce, mac = payload[6:38], payload[38:46], payload[46:]
    secret = secret_for(sender)
    if secret is None or not hmac.compare_digest(mac, _mac(secret, payload[:46])):
        return None
    return Probe(kind, sender, nonce)


# ---- the kernel-side filter ----------------------------------------------------------------------


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


SO_ATTACH_FILTER = 26
_LDXB_MSH, _LDH_IND, _LDW_IND, _JEQ, _RET = 0xB1, 0x48, 0x40, 0x15, 0x06


def bpf_program(port: int) -> list[tuple[int, int, int, int]]:
    """cBPF over an IPv4 packet: dst port == ``port`` and payload starts with "WK" or has the STUN cookie."""
    return [
        (_LDXB_MSH, 0, 0, 0),  # X = IP header length
        (_LDH_IND, 0, 0, 2),  # A = UDP dst port
        (_JEQ, 0, 5, port),  # != port -> drop
        (_LDH_IND, 0, 0, 8),  # A = first two payload bytes
        (_JEQ, 2, 0, 0x574B),  # "WK" -> accept
        (_LDW_IND, 0, 0, 12),  # A = payload bytes 4..7
        (_JEQ, 0, 1, STUN_COOKIE),  # STUN -> accept, else drop
        (_RET, 0, 0, 0xFFFF),
        (_RET, 0, 0, 0),
    ]


def attach_filter(sock: socket.socket, port: int) -> None:
    prog = bpf_program(port)
    arr = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    bytes(ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog))))


# ---- the listener ---------------------------------------------------------------------------------


class ProbeListener:
    """Answers peers' pings, completes our own pings, records the relay's NAT probes.

    Runs one daemon thread reading a filtered raw socket. ``known_peer(key)`` tells whether a
    sender is a mesh peer (unknown senders are ignored: no reflection to strangers).
    """

    def __init__(self, private_key: X25519PrivateKey, public_key: bytes, wg_port: int,
                 known_peer: Callable[[bytes], bool], on_ping: Callable[[bytes], None] | None = None) -> None:
        self._key = private_key
        self.public_key = public_key
        self.port = wg_port
        self._known = known_peer
        self._on_ping = on_ping
        """Told the sender of every ping answered: a relayed peer probing us means its NAT has just
        opened toward us, so probing back now succeeds even through a port-restricted cone."""
        self._secrets: dict[bytes, bytes] = {}
        self._rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        attach_filter(self._rx, wg_port)
        self._rx.settimeout(0.5)
        self._tx = PortSocket(wg_port)
        self._waiting: dict[bytes, tuple[bytes, threading.Event]] = {}
        self.nat_probes_seen: set[int] = set()
        self.pings_answered = 0
        self.packets_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe-listener", daemon=True)

    def start(self) -> ProbeListener:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._rx.close()
        self._tx.close()

    def _secret(self, peer: bytes) -> bytes | None:
        if not self._known(peer):
            return None
        secret = self._secrets.get(peer)
        if secret is None:
            secret = self._secrets[peer] = shared_secret(self._key, peer)
        return secret

    def ping(self, peer: bytes, ip: str, port: int, *, timeout: float = 1.0, attempts: int = 3) -> bool:
        """True when ``peer`` answered a ping sent from our WireGuard port to ``ip:port``."""
        secret = self._secret(peer)
        if secret is None:
            return False
        nonce = os.urandom(8)
        done = threading.Event()
        self._waiting[nonce] = (peer, done)
        try:
            for _ in range(attempts):
                self._tx.send(ip, port, encode(PING, self.public_key, nonce, secret))
                if done.wait(timeout / attempts):
                    return True
            return False
        finally:
            self._waiting.pop(nonce, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self._rx.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.packets_read += 1
            parsed = parse_ipv4_udp(packet)
            if parsed is None or parsed[3] != self.port:
                continue
            src_ip, src_port, _, _, payload = parsed
            if payload.startswith(NAT_PROBE_MAGIC) and len(payload) == 6:
                self.nat_probes_seen.add(payload[5])
                continue
            probe = decode(payload, self._secret)
            if probe is None:
                continue
            if probe.kind == PING:
                secret = self._secret(probe.sender)
                if secret is not None:
                    self._tx.send(src_ip, src_port, encode(PONG, self.public_key, probe.nonce, secret))
                    self.pings_answered += 1
                    if self._on_ping is not None:
                        try:
                            self._on_ping(probe.sender)
                        except Exception:  # noqa: BLE001 - the listener must keep answering
                            logger.exception("probe listener: on_ping callback failed")
            else:
                entry = self._waiting.get(probe.nonce)
                if entry is not None and entry[0] == probe.sender:
                    entry[1].set()
        logger.debug("probe listener on port {} stopped", self.port)
