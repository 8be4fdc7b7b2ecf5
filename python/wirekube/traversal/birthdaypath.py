"""The birthday attack's I/O: where the own NAT maps new flows, the probing round, the won path's proxy.

* :func:`measure_ports`: a few fresh UDP sockets ask STUN for their mapping (the samples
  :func:`wirekube.traversal.birthday.own_window` turns into the published window).
* :class:`Prober`: one round. Opens ``sockets`` UDP sockets, sends authenticated pings (the
  62-byte probe of :mod:`wirekube.traversal.probe`, nonce = round + flow number) along the
  :func:`~wirekube.traversal.birthday.send_schedule`, answers the peer's pings, and settles on one
  flow: the leader sends CHOOSE over the first flow that proved itself (a ping or a pong from the
  peer arrived on it), the follower answers CHOSEN and adopts the flow at once; the leader adopts
  it on CHOSEN. Each side then keeps that one socket and closes the rest. Datagrams that are not
  probes arriving on the adopted flow before the proxy takes over (the peer's WireGuard switched
  first) are kept and handed to WireGuard by the proxy: nothing is lost in the switch. Hard limits:
  ``settings.sockets`` sockets, ``settings.max_probes`` datagrams,
  ``settings.budget`` seconds after notBefore (checked on every loop pass; :class:`ProbeStats`
  reports what was used).
* :class:`WonPathProxy`: the won socket cannot be WireGuard's listen socket (that one has its own
  NAT mapping), so WireGuard's endpoint for the peer becomes ``127.0.0.1:<won socket's port>`` and
  this proxy, reading the won socket itself, forwards WireGuard's datagrams to the peer's mapped
  address and the peer's datagrams to WireGuard; anything from elsewhere is dropped. A repeated
  CHOOSE from the peer (its CHOSEN was lost) is answered by the proxy (:func:`chosen_answerer`),
  not forwarded.

Probing never touches WireGuard or the relay: while a round runs, the peer's traffic keeps using
the relay path.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aioice import stun
from loguru import logger

from wirekube.models import FWMARK
from wirekube.traversal import birthday, probe
from wirekube.traversal.rawudp import SO_MARK, StunTarget

ALL_KINDS = (probe.PING, probe.PONG, probe.CHOOSE, probe.CHOSEN)


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; keeps the probes out of the tunnel
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, FWMARK)
    sock.bind(("0.0.0.0", 0))  # noqa: S104 - an ephemeral probe socket on the node's routes
    sock.setblocking(False)
    return sock


def measure_ports(targets: Sequence[StunTarget], samples: int, *, timeout: float = 2.0,
                  attempts: int = 3) -> list[int]:
    """Mapped ports of ``samples`` fresh sockets (socket i asks ``targets[i % n]``), in socket order."""
    if not targets:
        return []
    socks = [_udp_socket() for _ in range(samples)]
    try:
        requests = {}
        for i in range(len(socks)):
            msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
            requests[i] = (msg.transaction_id, bytes(msg), targets[i % len(targets)])
        mapped: dict[int, int] = {}
        for _ in range(attempts):
            for i, (_, raw, t) in requests.items():
                if i not in mapped:
                    with contextlib.suppress(OSError):
                        socks[i].sendto(raw, (t.ip, t.port))
            window_end = time.monotonic() + timeout / attempts
            while len(mapped) < len(socks) and time.monotonic() < window_end:
                ready, _, _ = select.select(socks, [], [], max(0.0, window_end - time.monotonic()))
                for sock in ready:
                    i = socks.index(sock)
                    with contextlib.suppress(OSError):
                        data = sock.recv(2048)
                        try:
                            response = stun.parse_message(data)
                        except (ValueError, struct.error, IndexError):
                            continue
                        if response.transaction_id != requests[i][0]:
                            continue
                        addr = (response.attributes.get("XOR-MAPPED-ADDRESS")
                                or response.attributes.get("MAPPED-ADDRESS"))
                        if addr:
                            mapped[i] = int(addr[1])
            if len(mapped) == len(socks):
                break
        return [mapped[i] for i in sorted(mapped)]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class ProbeStats:
    sockets: int = 0
    flows: int = 0
    probes_sent: int = 0
    pings_received: int = 0
    pongs_received: int = 0
    elapsed: float = 0.0
    """Seconds from notBefore to the end of the round."""


MAX_PENDING = 64
"""Datagrams kept for WireGuard between adopting the flow and the proxy taking over, at most."""


@dataclass
class ProbeResult:
    won: bool
    stats: ProbeStats
    sock: socket.socket | None = None
    remote: tuple[str, int] | None = None
    detail: str = ""
    pending: list[bytes] = field(default_factory=list)
    """Non-probe datagrams from the peer on the won flow, in arrival order (for WireGuard)."""


_Flow = tuple[int, tuple[str, int]]
"""A flow of the round: (own socket index, the peer's address)."""


@dataclass
class _Round:
    """One run's bookkeeping: its sockets and schedule, and the settling on one flow."""

    socks: list[socket.socket]
    schedule: list[tuple[float, int, int]]
    flow_id: dict[tuple[int, int], int]
    index: dict[int, int]  # socket fileno -> socket index
    due: int = 0  # the schedule's next ping
    proven: list[_Flow] = field(default_factory=list)  # the leader's flows the peer's probes arrived on
    choice: _Flow | None = None  # the leader's CHOOSE in flight
    choice_sent: int = 0
    choice_at: float = 0.0
    choices: int = 0
    won: _Flow | None = None
    pending: dict[_Flow, list[bytes]] = field(default_factory=dict)
    replies: int = 0


@dataclass
class Prober:
    """One birthday round toward one peer (blocking; run it on its own thread)."""

    settings: birthday.BirthdaySettings
    round: int
    leader: bool
    own_public: bytes
    peer_public: bytes
    secret: bytes
    peer_ip: str
    targets: Sequence[Sequence[int]]
    clock: Callable[[], float] = time.time
    cancelled: Callable[[], bool] = lambda: False
    socket_factory: Callable[[], socket.socket] = _udp_socket
    stats: ProbeStats = field(default_factory=ProbeStats)

    def _nonce(self, flow: int) -> bytes:
        return struct.pack("!II", self.round & 0xFFFFFFFF, flow & 0xFFFFFFFF)

    def _send(self, sock: socket.socket, kind: int, nonce: bytes, addr: tuple[str, int]) -> None:
        if self.stats.probes_sent >= self.settings.max_probes:
            return
        self.stats.probes_sent += 1
        with contextlib.suppress(OSError):  # a full buffer or an ICMP error: the next pass tries again
            sock.sendto(probe.encode(kind, self.own_public, nonce, self.secret), addr)

    def run(self, start_at: float) -> ProbeResult:
        """Wait for ``start_at`` (wall clock), probe, and return the won socket or nothing."""
        if not self._wait_for(start_at):
            return ProbeResult(False, self.stats, detail="cancelled")
        r = self._open_round()
        deadline = start_at + self.settings.budget
        try:
            while True:
                now = self.clock()
                if now >= deadline or self.cancelled():
                    break
                if r.won is not None:
                    break
                self._send_due_pings(r, start_at, now)
                if self.leader:
                    self._lead_choice(r, now)
                next_due = start_at + r.schedule[r.due][0] if r.due < len(r.schedule) else now + 0.05
                wait = max(0.0, min(next_due - now, 0.02, deadline - now))
                ready, _, _ = select.select(r.socks, [], [], wait)
                for sock in ready:
                    self._receive(r, sock)
        finally:
            self.stats.elapsed = max(0.0, self.clock() - start_at)
            keep = r.socks[r.won[0]] if r.won is not None else None
            for sock in r.socks:
                if sock is not keep:
                    sock.close()
        if r.won is None:
            return ProbeResult(False, self.stats, detail="cancelled" if self.cancelled() else "no aligned flow")
        assert keep is not None
        keep.setblocking(False)
        return ProbeResult(True, self.stats, keep, r.won[1], pending=r.pending.get(r.won, []))

    def _wait_for(self, start_at: float) -> bool:
        """Sleep until ``start_at`` (wall clock); False: cancelled meanwhile."""
        while self.clock() < start_at:
            if self.cancelled():
                return False
            time.sleep(min(0.05, max(0.0, start_at - self.clock())))
        return True

    def _open_round(self) -> _Round:
        """The round's sockets and ping schedule (counted in the stats)."""
        schedule = birthday.send_schedule(self.settings, self.targets)
        socks = [self.socket_factory() for _ in range(min(self.settings.sockets, len(self.targets)))]
        self.stats.sockets = len(socks)
        self.stats.flows = len({(i, port) for _, i, port in schedule})
        flow_id = {(i, port): n for n, (i, port) in enumerate(dict.fromkeys((i, p) for _, i, p in schedule))}
        return _Round(socks, schedule, flow_id, {sock.fileno(): i for i, sock in enumerate(socks)})

    def _send_due_pings(self, r: _Round, start_at: float, now: float) -> None:
        """Every ping of the schedule whose time has come."""
        while r.due < len(r.schedule) and start_at + r.schedule[r.due][0] <= now:
            _, i, port = r.schedule[r.due]
            self._send(r.socks[i], probe.PING, self._nonce(r.flow_id[(i, port)]), (self.peer_ip, port))
            r.due += 1

    def _lead_choice(self, r: _Round, now: float) -> None:
        """The leader's side of settling on a flow: CHOOSE over the first proven flow, retried, and
        the next proven one when it is never confirmed."""
        s = self.settings
        if r.choice is not None and r.choice_sent >= s.choose_attempts and now - r.choice_at >= s.choose_interval:
            r.choice = None  # never confirmed: try the next proven flow
        if r.choice is None and r.proven and r.choices < s.max_choices:
            r.choice, r.choice_sent, r.choices = r.proven.pop(0), 0, r.choices + 1
        if r.choice is not None and r.choice_sent < s.choose_attempts and now - r.choice_at >= s.choose_interval:
            self._send(r.socks[r.choice[0]], probe.CHOOSE, self._nonce(0), r.choice[1])
            r.choice_sent, r.choice_at = r.choice_sent + 1, now

    def _receive(self, r: _Round, sock: socket.socket) -> None:
        """Everything the socket holds: the peer's probes are handled, its other datagrams on the
        won or chosen flow kept for WireGuard, anything else dropped."""
        i = r.index[sock.fileno()]
        while True:
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # e.g. ICMP port unreachable from an unaligned flow
            if addr[0] != self.peer_ip:
                continue
            flow = (i, (addr[0], addr[1]))
            msg = probe.decode(data, lambda k: self.secret if k == self.peer_public else None, ALL_KINDS)
            if msg is None:
                kept = r.pending.setdefault(flow, []) if flow in (r.won, r.choice) else None
                if kept is not None and len(kept) < MAX_PENDING:
                    kept.append(data)  # the peer's WireGuard already uses this flow
                continue
            if struct.unpack("!I", msg.nonce[:4])[0] != self.round & 0xFFFFFFFF:
                continue
            self._handle(r, sock, flow, msg)

    def _handle(self, r: _Round, sock: socket.socket, flow: _Flow, msg: probe.Probe) -> None:
        """One probe of this round from the peer: answer a ping, note a proven flow, settle on a flow."""
        if msg.kind == probe.PING:
            self.stats.pings_received += 1
            if r.replies < self.settings.max_replies:
                r.replies += 1
                self._send(sock, probe.PONG, msg.nonce, flow[1])
            if self.leader and flow not in r.proven and flow != r.choice:
                r.proven.append(flow)
        elif msg.kind == probe.PONG:
            self.stats.pongs_received += 1
            if self.leader and flow not in r.proven and flow != r.choice:
                r.proven.append(flow)
        elif msg.kind == probe.CHOOSE and not self.leader and r.won is None:
            self._send(sock, probe.CHOSEN, msg.nonce, flow[1])
            r.won = flow  # adopted at once; the proxy answers a repeated CHOOSE
        elif msg.kind == probe.CHOSEN and self.leader and flow == r.choice:
            r.won = flow


class _ProxyProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: WonPathProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        p, t = self.proxy, self.transport
        if t is None:
            return
        source = (addr[0], addr[1])
        if source == p.remote:
            if p.control is not None and len(data) == probe.LENGTH and data.startswith(probe.MAGIC):
                reply = p.control(data)
                if reply is not None:
                    t.sendto(reply, p.remote)
                return
            p.from_peer += 1
            t.sendto(data, ("127.0.0.1", p.wireguard_port))
        elif source == ("127.0.0.1", p.wireguard_port):
            p.to_peer += 1
            t.sendto(data, p.remote)
        else:
            p.dropped += 1

    def error_received(self, exc: Exception) -> None:
        logger.debug("birthday proxy on port {}: {}", self.proxy.port, exc)


@dataclass(eq=False)
class WonPathProxy:
    """WireGuard <-> 127.0.0.1:<port> = the won socket <-> the peer's mapped address."""

    sock: socket.socket
    remote: tuple[str, int]
    wireguard_port: int
    control: Callable[[bytes], bytes | None] | None = None
    """Answers the peer's probe-format datagrams (a repeated CHOOSE); they never reach WireGuard."""
    pending: Sequence[bytes] = ()
    """Delivered to WireGuard first (what arrived before the proxy took over)."""
    from_peer: int = 0
    to_peer: int = 0
    dropped: int = 0
    port: int = 0
    _transport: asyncio.DatagramTransport | None = None

    def __post_init__(self) -> None:
        self.port = int(self.sock.getsockname()[1])

    async def open(self) -> int:
        """Start forwarding (on the running loop, which then owns the socket)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _ProxyProtocol(self), sock=self.sock)
        self._transport = transport
        for data in self.pending:
            self.from_peer += 1
            transport.sendto(data, ("127.0.0.1", self.wireguard_port))
        self.pending = ()
        return self.port

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        else:
            self.sock.close()


def chosen_answerer(round_: int, own_public: bytes, peer_public: bytes,
                    secret: bytes) -> Callable[[bytes], bytes | None]:
    """The won path's answer to the peer's CHOOSE of this round (its first CHOSEN was lost)."""

    def answer(data: bytes) -> bytes | None:
        msg = probe.decode(data, lambda k: secret if k == peer_public else None, (probe.CHOOSE,))
        if msg is None or struct.unpack("!I", msg.nonce[:4])[0] != round_ & 0xFFFFFFFF:
            return None
        return probe.encode(probe.CHOSEN, own_public, msg.nonce, secret)

    return answer
