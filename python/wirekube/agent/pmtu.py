"""Path MTU per direct peer (``spec.mtu: auto``, issue 18): measure, apply, clamp, publish.

* Measure: ICMP echo requests with DF set (``IP_PMTUDISC_PROBE``: the kernel neither fragments
  them nor caps them at a route's MTU, only at the interface's) go through the WireGuard
  interface to each direct peer's mesh IP, so the outer WireGuard packet carries the size across
  the underlay; the peer's kernel answers.  The search and the schedule are pure
  (:mod:`wirekube.traversal.pmtu`): parallel rounds at first sight of a peer, when its WireGuard
  endpoint moves and every 10 min; a one-packet check at the current size every 3 s, two
  unanswered in a row start a new search; an answer below the full size is confirmed by a
  second search (the larger answer wins: lost probes only ever lower one).  Works the same with kernel WireGuard and
  wireguard-go (both only see inner packets).  Relayed peers are not measured: the relay is TCP
  and carries the full size.
* Apply: :meth:`PathMtu.wrap` adds the measured size to the peer's
  :class:`~wirekube.agent.plan.PeerPath` (the planner sets it as the MTU of the peer's routes in
  table 22347; the kernel then fragments or refuses larger packets locally and says so, instead
  of the path dropping them in silence).
* Clamp: an nftables table ``inet wirekube_mss`` rewrites the MSS of TCP SYNs leaving through the
  interface to the route's MTU (``rt mtu``), so TCP through this node (pods, forwarded traffic)
  never depends on ICMP reaching its sender.  ``wirekubectl cleanup`` removes it.
* Publish: :meth:`PathMtu.decorate` puts ``status.pathMTU`` (only peers below the interface MTU).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from loguru import logger

from wirekube.agent import nft as nftables
from wirekube.agent.plan import PeerPath, mesh_ip_claims
from wirekube.agent.wg.base import WgDeviceState
from wirekube.models import Peer, PeerStatus, Transport
from wirekube.traversal import pmtu, rawudp

MSS_TABLE = "wirekube_mss"
MSS_FAMILY = "inet"
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_PROBE = getattr(socket, "IP_PMTUDISC_PROBE", 3)


@dataclass(frozen=True)
class Target:
    """A direct peer to measure."""

    mesh_ip: str
    endpoint: str
    """Its current WireGuard endpoint ("ip:port"): a change means a new path."""
    link_mtu: int
    """The interface's MTU: the largest size searched."""
    overhead: int = pmtu.IPV4_OVERHEAD
    active: bool = True
    """It carried traffic lately (the traversal's liveness): idle peers are checked less often."""


def mss_ruleset(ifname: str) -> str:
    """``nft -f`` text that (re)creates the MSS clamp for ``ifname`` in one transaction."""
    return (
        f"table {MSS_FAMILY} {MSS_TABLE} {{}}\ndelete table {MSS_FAMILY} {MSS_TABLE}\n"
        f"table {MSS_FAMILY} {MSS_TABLE} {{\n"
        "\tchain postrouting {\n"
        "\t\ttype filter hook postrouting priority mangle; policy accept;\n"
        f'\t\toifname "{ifname}" tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n'
        "\t}\n"
        "}\n"
    )


def mss_delete() -> str:
    return f"table {MSS_FAMILY} {MSS_TABLE} {{}}\ndelete table {MSS_FAMILY} {MSS_TABLE}\n"


def echo_request(ident: int, seq: int, size: int) -> bytes:
    """An ICMP echo request whose IPv4 packet is ``size`` bytes long."""
    payload = (b"wirekube-pmtu" * (size // 13 + 1))[: size - pmtu.ECHO_HEADERS]
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = rawudp.checksum(header + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload


def parse_echo_reply(packet: bytes) -> tuple[str, int, int, int] | None:
    """(source, ident, seq, IPv4 total length) of an echo reply read from a raw ICMP socket."""
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8 or packet[ihl] != 0 or packet[ihl + 1] != 0:
        return None
    total = struct.unpack_from("!H", packet, 2)[0]
    ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
    return str(ipaddress.IPv4Address(packet[12:16])), ident, seq, total


class Prober:
    """One raw ICMP socket; :meth:`round` sends a set of (address, size) probes at once and
    returns those answered within ``timeout``."""

    def __init__(self, copies: int = 2, timeout: float = 0.8) -> None:
        self.copies, self.timeout = copies, timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_PROBE)
        self._sock.setblocking(False)
        self._ident = int.from_bytes(os.urandom(2), "big") or 1
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def round(self, probes: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        wanted: dict[int, tuple[str, int]] = {}
        for _ in range(self.copies):
            for address, size in probes:
                self._seq = (self._seq + 1) & 0xFFFF
                wanted[self._seq] = (address, size)
                try:
                    self._sock.sendto(echo_request(self._ident, self._seq, size), (address, 0))
                except OSError as e:  # EMSGSIZE (above the interface MTU), no route: not answered
                    if e.errno not in (errno.EMSGSIZE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOBUFS,
                                       errno.EPERM, errno.EAGAIN):
                        raise
        got: set[tuple[str, int]] = set()
        need = set(wanted.values())
        deadline = time.monotonic() + self.timeout
        while got != need:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                break
            while True:
                try:
                    packet = self._sock.recv(65535)
                except BlockingIOError:
                    break
                reply = parse_echo_reply(packet)
                if reply is None or reply[1] != self._ident or reply[2] not in wanted:
                    continue
                address, size = wanted[reply[2]]
                if reply[0] == address and reply[3] == size:
                    got.add((address, size))
        return got


class PathMtu:
    """Measures direct peers' path MTUs in a thread; :meth:`wrap` and :meth:`decorate` read it."""

    def __init__(
        self,
        targets: Callable[[], Mapping[str, Target] | None],
        wake: Callable[[], object],
        *,
        ifname: Callable[[], str | None],
        timing: pmtu.Timing = pmtu.Timing(),
        prober: Callable[[], Prober] = Prober,
        tick: float = 1.0,
    ) -> None:
        self._targets = targets
        self._wake = wake
        self._ifname = ifname
        self._schedule = pmtu.Schedule(timing)
        self._prober_factory = prober
        self._tick = tick
        self._lock = threading.Lock()
        self._applied: dict[str, int] = {}
        self._link_mtu = 0
        self._searches: dict[str, pmtu.Search] = {}
        self._first: dict[str, int] = {}
        """A search's first answer below the full size, while the confirming search runs."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mss_for: str | None = None
        """The interface the clamp was written for ("" for removed; None: not yet)."""
        self._mss_at = 0.0
        self._log = logger.bind(component="pmtu")

    # ------------------------------------------------------------------ what the reconciler reads

    def wrap(self, inner: Callable[[], Mapping[str, PeerPath]]) -> Callable[[], dict[str, PeerPath]]:
        def paths() -> dict[str, PeerPath]:
            out = dict(inner())
            with self._lock:
                applied, link = dict(self._applied), self._link_mtu
            for name, mtu in applied.items():
                if mtu >= link:
                    continue
                path = out.get(name, PeerPath())
                if path.transport is Transport.DIRECT:
                    out[name] = replace(path, mtu=mtu)
            return out
        return paths

    def decorate(self, status: PeerStatus) -> PeerStatus:
        with self._lock:
            small = {n: m for n, m in sorted(self._applied.items()) if m < self._link_mtu}
        return replace(status, path_mtu=small)

    def measured(self) -> dict[str, int]:
        with self._lock:
            return dict(self._applied)

    # ------------------------------------------------------------------ the loop

    def start(self) -> PathMtu:
        self._thread = threading.Thread(target=self._main, name="pmtu", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _main(self) -> None:
        prober: Prober | None = None
        try:
            while not self._stop.is_set():
                try:
                    if prober is None:
                        prober = self._prober_factory()
                    self.step(prober, time.monotonic())
                except Exception as e:  # noqa: BLE001 - one bad pass must not end path MTU detection
                    self._log.warning("path MTU pass failed: {}", e)
                self._stop.wait(0.0 if self._searches else self._tick)  # a search's rounds run back to back
        finally:
            if prober is not None:
                prober.close()
            self._log.info("path MTU detection stopped")

    def step(self, prober: Prober, now: float) -> None:
        """One pass: follow the peers, then one round of probes (searches and checks together)."""
        targets = self._targets()
        self._ensure_mss(now, enabled=targets is not None)
        targets = targets or {}
        self._schedule.follow({n: t.endpoint for n, t in targets.items()},
                              idle=[n for n, t in targets.items() if not t.active])
        for name in [n for n in self._searches if n not in targets]:
            del self._searches[name]
            self._first.pop(name, None)
        for name in self._schedule.to_search(now):
            if name not in self._searches:
                t = targets[name]
                self._searches[name] = pmtu.Search(pmtu.MIN_PATH - t.overhead, t.link_mtu)
        checks = [(n, s) for n, s in self._schedule.to_check(now) if n not in self._searches]
        probes: set[tuple[str, int]] = set()
        for name, search in self._searches.items():
            probes.update((targets[name].mesh_ip, size) for size in search.sizes())
        probes.update((targets[n].mesh_ip, size) for n, size in checks)
        if probes:
            got = prober.round(sorted(probes))
            for name, size in checks:
                ok = (targets[name].mesh_ip, size) in got
                if not ok:
                    self._log.info("path MTU check of {} at {} bytes unanswered", name, size)
                self._schedule.checked(name, ok, now)
            for name, search in list(self._searches.items()):
                ip = targets[name].mesh_ip
                search.feed([size for (a, size) in got if a == ip])
                if search.done:
                    del self._searches[name]
                    result = search.result
                    if result is not None and result < search.high and name not in self._first:
                        # Below the full size: search once more before acting; lost probes only
                        # ever lower a result, so the larger of the two is still a safe answer.
                        self._first[name] = result
                        self._searches[name] = pmtu.Search(search.low, search.high)
                        continue
                    first = self._first.pop(name, None)
                    if first is not None:
                        result = max(first, result or 0)
                    self._schedule.searched(name, result, now)
                    if search.result is None:
                        self._log.debug("path MTU search of {}: no answer", name)
        self._publish(targets)

    def _publish(self, targets: Mapping[str, Target]) -> None:
        mtus = self._schedule.mtus()
        link = max((t.link_mtu for t in targets.values()), default=self._link_mtu)
        with self._lock:
            before, self._applied, self._link_mtu = self._applied, mtus, link
        if before != mtus:
            for name in sorted(set(before) | set(mtus)):
                if before.get(name) != mtus.get(name) and name in mtus:
                    t = targets[name]
                    self._log.info("path MTU of {} ({}): {} bytes (WireGuard packets of {}){}", name, t.endpoint,
                                   mtus[name], pmtu.wire_size(mtus[name], t.overhead, link),
                                   "" if mtus[name] >= link else f"; its routes get mtu {mtus[name]}")
            self._wake()

    def _ensure_mss(self, now: float, enabled: bool) -> None:
        """The clamp follows the interface while detection is on; off: the table goes.  Rewritten
        every 60 s (someone may have flushed it)."""
        ifname = self._ifname() if enabled else ""
        if ifname is None or (ifname == self._mss_for and now - self._mss_at < 60):
            return  # the mesh is not known yet: leave things as they are
        try:
            nftables.run(mss_ruleset(ifname) if ifname else mss_delete())
            if ifname != self._mss_for and (ifname or self._mss_for is not None):
                self._log.info("TCP MSS clamp to the route MTU: {}", f"on {ifname}" if ifname else "off")
        except OSError as e:
            self._log.warning("TCP MSS clamp: {}", e)
        self._mss_for, self._mss_at = ifname, now


def targets_from(
    snapshot: object,
    wg: WgDeviceState | None,
    paths: Mapping[str, PeerPath],
    node_name: str,
    active: Callable[[str], bool] | None = None,
) -> dict[str, Target] | None:
    """The direct peers to measure, from the reconciler's snapshot (``wirekube.agent.reconcile
    .Snapshot``), the WireGuard device and the traversal's paths; None when the mesh has a fixed
    MTU (detection off); empty while the mesh or the device is not known yet."""
    mesh = getattr(snapshot, "mesh", None)
    peers: tuple[Peer, ...] = getattr(snapshot, "peers", ())
    if mesh is None:
        return {}
    if not mesh.spec.path_mtu:
        return None
    if wg is None:
        return {}
    ips = {name: ip for ip, name in mesh_ip_claims(peers, mesh).items()}
    out: dict[str, Target] = {}
    for peer in peers:
        if peer.name == node_name or peer.name not in ips:
            continue
        if paths.get(peer.name, PeerPath()).transport is not Transport.DIRECT:
            continue  # relayed: TCP, the full size
        state = wg.peers.get(peer.spec.public_key)
        endpoint = state.config.endpoint if state is not None else None
        if endpoint is None or state is None or state.last_handshake <= 0:
            continue  # no session yet: probes would only queue behind the handshake
        out[peer.name] = Target(str(ips[peer.name]), str(endpoint), mesh.spec.mtu,
                                pmtu.overhead(endpoint.ip.version == 6),
                                active=active(peer.name) if active is not None else True)
    return out
