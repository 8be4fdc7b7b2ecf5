"""The replica mesh: relay replicas behind one load balancer act as one relay.

A load balancer sends each TCP connection to whichever replica it picks, so the two ends of a
relayed pair often land on different replicas.  Every replica therefore keeps one authenticated
*mesh link* to every other replica (found through ``--mesh-peers`` or, in a cluster, the
headless Service's EndpointSlices), tells the others which keys it holds
(:class:`~wirekube.relay.directory.KeyDirectory`: a full snapshot when a link comes up, then a
push per registration and release), and forwards Data for a key held elsewhere over the link to
that replica: exactly one hop.  Frames that arrive over a mesh link are delivered only to the
receiving replica's own clients, never forwarded again, so there are no loops.

The latest registration of a key wins: the other replicas forward to it.  A replica that still
holds an older connection for the key drops it when its client has fallen silent (a node that
moved on through the load balancer left it behind), and keeps it while its client is heard
(``sibling_silence``): one agent given two relay addresses that reach two replicas then keeps
both connections as one client, its own replica delivering locally, instead of the two
registrations evicting each other.

A mesh link is a :class:`~wirekube.relay.server.FrameSink` like a client connection: as a
destination it has a byte budget (``queue_limit_bytes``; beyond it frames are dropped and
counted) and it pushes back on the clients that feed only it while it is congested; as a sender
its frames go to local clients within their budgets, and it is held (not read) while every
client it feeds is congested.  A stalled replica or client therefore cannot grow another
replica's memory beyond those caps.

The wire format and its authentication are :mod:`wirekube.relay.meshwire` (pure).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from loguru import logger

from wirekube.relay.directory import Change, KeyDirectory
from wirekube.relay.meshwire import (
    FORWARD_OVERHEAD,
    MAX_FORWARD_FRAMES,
    ROLE_ACCEPTOR,
    ROLE_DIALER,
    encode_hello,
    encode_holds,
    encode_releases,
    forward_header,
    mesh_proof,
    parse_entries,
    parse_hello,
    verify_proof,
)
from wirekube.relay.protocol import (
    KEY_LEN,
    NEED_DATA,
    NONCE_LEN,
    REPLICA_ID_LEN,
    DataRun,
    Frame,
    FrameType,
    RemoteProtocolError,
    count_data_frames,
    encode_error,
    encode_frame,
    split_frames,
    truncate_run,
)
from wirekube.relay.server import FrameSink, RelayConnection, RelayServer

_log = logger.bind(component="relay-mesh")
DEFAULT_MESH_PORT = 3480
_KEEPALIVE = encode_frame(FrameType.KEEPALIVE)
MAX_UNPROVEN_LINKS = 32
"""Accepted mesh connections that have not yet proven the secret; more are dropped at once."""


@dataclass(frozen=True)
class MeshSettings:
    secret: bytes = field(repr=False)
    """Shared by every replica (at least 16 bytes); proves a link's other end is a replica."""
    listen_host: str = "0.0.0.0"  # noqa: S104 - the other replicas dial the pod
    listen_port: int = DEFAULT_MESH_PORT
    peers: tuple[tuple[str, int], ...] = ()
    """Replica mesh addresses to dial (may include this replica's own: it is recognised)."""
    handshake_timeout: float = 5.0
    keepalive_interval: float = 1.0
    dead_after: float = 5.0
    """A link silent this long is taken as dead (its keys are forgotten)."""
    queue_limit_bytes: int = 4 * 1024 * 1024
    """Cap on bytes waiting to be written to one mesh link."""
    redial_initial: float = 0.1
    redial_max: float = 5.0
    sibling_silence: float = 35.0
    """A local connection for a key that another replica registered later is kept while its
    client was heard within this long (clients send a Keepalive every 25 s): one agent given two
    relay addresses that reach two replicas keeps both connections instead of the two evicting
    each other.  Once silent this long it is dropped (a node that moved on left it behind)."""


class LinkState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_AUTH = "await_auth"
    UP = "up"
    CLOSED = "closed"


@dataclass
class LinkStats:
    frames_out: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    drops: Counter[str] = field(default_factory=Counter)


@dataclass
class MeshStats:
    links_up: int = 0
    auth_failures: int = 0
    evictions: int = 0
    """Local registrations dropped because another replica holds a newer one."""
    siblings_kept: int = 0
    """Local registrations kept although another replica holds a newer one, their client being
    alive (the same key connected to two replicas)."""
    closed: Counter[str] = field(default_factory=Counter)
    per_peer: dict[str, LinkStats] = field(default_factory=dict)
    """Counters per peer replica (the first 8 hex digits of its id); kept across reconnects."""


class MeshLink(FrameSink):
    """One TCP connection to another replica (dialed by us or accepted)."""

    def __init__(self, mesh: RelayMesh, *, dialed: bool, address: str = "?") -> None:
        super().__init__(mesh.relay, mesh.settings.queue_limit_bytes)
        self.mesh = mesh
        self.dialed = dialed
        self.address = address
        self.state = LinkState.AWAIT_HELLO
        self.peer_id: bytes | None = None
        self.closed_future: asyncio.Future[str] = self._loop.create_future()
        self.last_rx = self._loop.time()
        self.stats = LinkStats()
        self._nonce = os.urandom(NONCE_LEN)
        self._peer_nonce = b""
        self._timer: asyncio.TimerHandle | None = None
        self._log = _log.bind(link=address)

    @property
    def name(self) -> str:
        return f"{self.peer_id.hex()[:8] if self.peer_id else '?'}@{self.address}"

    @property
    def dialer_id(self) -> bytes:
        assert self.peer_id is not None
        return self.mesh.id if self.dialed else self.peer_id

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._setup_transport(transport)
        if not self.dialed:
            peer = transport.get_extra_info("peername")
            self.address = f"{peer[0]}:{peer[1]}" if peer else "?"
            self._log = _log.bind(link=self.address)
            unproven = sum(1 for link in self.mesh.all_links if not link.dialed and link.state is not LinkState.UP)
            if unproven >= MAX_UNPROVEN_LINKS:  # nobody unauthenticated holds many sockets here
                self.mesh.stats.closed["unproven_limit"] += 1
                self.transport.abort()  # type: ignore[union-attr]
                return
        self.mesh.all_links.add(self)
        self._timer = self._loop.call_later(self.mesh.settings.handshake_timeout, self._handshake_expired)
        if self.dialed:
            self._write(encode_hello(self.mesh.id, self._nonce))

    def buffer_updated(self, nbytes: int) -> None:
        self._decoder.buffer_updated(nbytes)
        if self._closed:
            self._decoder.clear()
            return
        self.last_rx = self._loop.time()
        try:
            if self.state is not LinkState.UP:
                self._handshake_frames()
            if self.state is LinkState.UP:
                self._up_frames()
        except RemoteProtocolError as e:
            self.close(f"protocol error: {e}", f"protocol_{e.reason}", send_error=True)

    def eof_received(self) -> bool:
        self._gone("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._gone("reset" if exc else "eof")
        self.mesh.all_links.discard(self)

    # -- handshake --------------------------------------------------------------------------

    def _handshake_frames(self) -> None:
        while self.state in (LinkState.AWAIT_HELLO, LinkState.AWAIT_AUTH):
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return
            assert isinstance(frame, Frame)
            if self.state is LinkState.AWAIT_HELLO and frame.type == FrameType.MESH_HELLO:
                self._on_hello(frame.body)
            elif self.state is LinkState.AWAIT_AUTH and frame.type == FrameType.MESH_AUTH:
                self._on_auth(frame.body)
            elif frame.type == FrameType.ERROR:
                self.close("the other replica refused the link", "refused")
            else:
                self.close("unexpected frame before the link is up", "unexpected_frame", send_error=True)

    def _on_hello(self, body: bytes) -> None:
        peer_id, nonce = parse_hello(body)
        if peer_id == self.mesh.id:  # we dialed ourselves (our own address is in the peer list)
            dialer = self if self.dialed else next(
                (link for link in self.mesh.all_links if link.dialed and link._nonce == nonce), None)
            if dialer is not None:
                self.mesh.found_self(dialer)
            self.close("connected to itself", "self")
            return
        self.peer_id, self._peer_nonce = peer_id, nonce
        self.state = LinkState.AWAIT_AUTH
        if self.dialed:
            self.mesh.addr_peer[self.address] = peer_id
            self._write(self._frame_auth(ROLE_DIALER))
        else:
            self._write(encode_hello(self.mesh.id, self._nonce))

    def _proof_args(self) -> tuple[bytes, bytes, bytes, bytes]:
        assert self.peer_id is not None
        if self.dialed:
            return self.mesh.id, self.peer_id, self._nonce, self._peer_nonce
        return self.peer_id, self.mesh.id, self._peer_nonce, self._nonce

    def _frame_auth(self, role: bytes) -> bytes:
        return encode_frame(FrameType.MESH_AUTH, mesh_proof(self.mesh.secret, role, *self._proof_args()))

    def _on_auth(self, mac: bytes) -> None:
        their_role = ROLE_ACCEPTOR if self.dialed else ROLE_DIALER
        if not verify_proof(self.mesh.secret, their_role, *self._proof_args(), mac):
            self.mesh.stats.auth_failures += 1
            self._log.warning("mesh link refused: wrong proof of the mesh secret")
            self.close("mesh authentication failed", "auth_failed", send_error=not self.dialed)
            return
        if not self.dialed:
            self._write(self._frame_auth(ROLE_ACCEPTOR))
        self._cancel_timer()
        self.state = LinkState.UP
        self._log = _log.bind(link=self.name)
        self.mesh.link_up(self)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.state in (LinkState.AWAIT_HELLO, LinkState.AWAIT_AUTH):
            self.close("mesh handshake timed out", "handshake_timeout")

    # -- up ---------------------------------------------------------------------------------

    def _up_frames(self) -> None:
        decoder = self._decoder
        touched: list[FrameSink] = []
        try:
            while self.state is LinkState.UP:
                item = decoder.next_frame_view()
                if item is NEED_DATA:
                    break
                ftype, body = item  # type: ignore[misc]
                if ftype == FrameType.MESH_FORWARD:
                    self._deliver(body, touched)
                elif ftype == FrameType.MESH_HOLD:
                    self.mesh.peer_holds(self, parse_entries(body))
                elif ftype == FrameType.MESH_RELEASE:
                    self.mesh.peer_releases(self, parse_entries(body))
                elif ftype == FrameType.KEEPALIVE:
                    pass
                elif ftype == FrameType.ERROR:
                    self.close("the other replica closed the link", "peer_error")
                else:
                    raise RemoteProtocolError("unexpected_frame", f"frame type 0x{ftype:02x} on a mesh link")
        finally:
            self._after_read(touched)

    def _deliver(self, body: memoryview, touched: list[FrameSink]) -> None:
        """Data for one of our own clients: delivered here or dropped, never forwarded again."""
        destination = bytes(body[:KEY_LEN])
        frames = body[KEY_LEN:]
        count = count_data_frames(frames)
        self.stats.frames_in += count
        self.stats.bytes_in += len(frames)
        dest = self._relay.routes.get(destination)
        if dest is None:
            self.stats.drops["unknown_destination"] += count
            self._stats.drop("mesh_unknown_destination", count, len(frames))
            return
        if not dest._pending:
            dest._prepare(touched)
        dest._accept(DataRun(destination, frames, count))

    def _accept(self, run: DataRun) -> None:
        """Data from one of our clients for a key this link's replica holds (see FrameSink)."""
        frames = run.frames
        size = len(frames)
        room = self._budget - FORWARD_OVERHEAD
        if size > room:
            run, cut = truncate_run(run, max(room, 0))
            self.stats.drops["queue_full"] += cut
            self._stats.drop("mesh_queue_full", cut, size - len(run.frames))
            frames = run.frames
            size = len(frames)
            if not size:
                return
        count = run.frame_count
        if size <= MAX_FORWARD_FRAMES:
            pieces = [frames]
        else:
            pieces, dropped, dropped_bytes = split_frames(frames, MAX_FORWARD_FRAMES)
            if dropped:
                count -= dropped
                self.stats.drops["oversized"] += dropped
                self._stats.drop("mesh_oversized", dropped, dropped_bytes)
        copy = not (self._zero_copy or frames.readonly)
        for piece in pieces:
            self._pending.append(forward_header(run.key, len(piece)))
            self._pending.append(bytes(piece) if copy else piece)
            self._budget -= len(piece) + FORWARD_OVERHEAD
        self.stats.frames_out += count
        self.stats.bytes_out += size

    def send_control(self, frames: Iterable[bytes]) -> None:
        """Holds, releases, keepalives: not subject to the Data budget, but a replica that leaves
        even those unread for long is cut off."""
        if self._closed:
            return
        if self._queued_bytes() > 2 * self.queue_limit:
            self.close("the other replica does not read", "stalled")
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(list(frames))

    # -- closing ----------------------------------------------------------------------------

    def close(self, message: str, reason: str, *, send_error: bool = False) -> None:
        if self._closed:
            return
        if send_error:
            self._write(encode_error(message))
        self._gone(reason)
        if self.transport is not None:
            if self.transport.can_write_eof() and not self.transport.is_closing():
                self.transport.write_eof()
            self.transport.close()
            if not self._lost:
                self._loop.call_later(self._settings.close_grace, self._abort_if_open)

    def _gone(self, reason: str) -> None:
        if self._closed:
            return
        was_up = self.state is LinkState.UP
        self.state = LinkState.CLOSED
        self._sink_closed()
        self._cancel_timer()
        self.mesh.stats.closed[reason] += 1
        if was_up:
            self._log.info("mesh link down: {}", reason)
            self.mesh.link_down(self)
        if not self.closed_future.done():
            self.closed_future.set_result(reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class RelayMesh:
    """This replica's side of the mesh: the directory, the links, the dialers and the listener."""

    def __init__(self, relay: RelayServer, settings: MeshSettings) -> None:
        self.relay = relay
        self.settings = settings
        self.secret = settings.secret
        self.id = os.urandom(REPLICA_ID_LEN)
        self.directory = KeyDirectory(self.id)
        self.links: dict[bytes, MeshLink] = {}
        """The active link per peer replica id."""
        self.all_links: set[MeshLink] = set()
        self.addr_peer: dict[str, bytes] = {}
        """Dialed address -> the replica id found there last."""
        self.self_addresses: set[str] = set()
        self.stats = MeshStats()
        self._dialers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._links_changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._log = _log.bind(replica=self.id.hex()[:8])
        self._siblings: dict[bytes, RelayConnection] = {}
        """Local keys another replica registered later, kept while their client is heard."""
        relay.mesh = self

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        self._server = await loop.create_server(
            lambda: MeshLink(self, dialed=False), s.listen_host, s.listen_port, reuse_address=True
        )
        self._tasks.append(loop.create_task(self._keepalive_loop(), name="relay-mesh-keepalive"))
        self.set_peers(s.peers)
        self._log.info("mesh listening on tcp {}:{}", *self.address)

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the mesh is not listening")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in [*self._dialers.values(), *self._tasks]:
            task.cancel()
        self._dialers.clear()
        for link in list(self.all_links):
            link.close("relay shutting down", "shutdown", send_error=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def set_peers(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Dial exactly these addresses (new ones started, gone ones stopped)."""
        wanted = set(addresses)
        for addr in list(self._dialers):
            if addr not in wanted:
                self._dialers.pop(addr).cancel()
        loop = asyncio.get_running_loop()
        for addr in sorted(wanted - set(self._dialers)):
            self._dialers[addr] = loop.create_task(self._dial_loop(addr), name=f"relay-mesh-dial-{addr[0]}:{addr[1]}")

    async def _dial_loop(self, addr: tuple[str, int]) -> None:
        text = f"{addr[0]}:{addr[1]}"
        delay = self.settings.redial_initial
        loop = asyncio.get_running_loop()
        while text not in self.self_addresses:
            known = self.addr_peer.get(text)
            if known is not None and known in self.links:
                # already linked (perhaps it dialed us): wait for a change, then look again
                self._links_changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._links_changed.wait(), 5.0)
                continue
            link: MeshLink | None = None
            try:
                _, link = await asyncio.wait_for(
                    loop.create_connection(lambda: MeshLink(self, dialed=True, address=text), addr[0], addr[1]),
                    self.settings.handshake_timeout,
                )
            except (TimeoutError, OSError) as e:
                self._log.debug("mesh peer {} unreachable: {}", text, e or type(e).__name__)
            if link is not None:
                await link.closed_future
                if link.peer_id is not None:
                    delay = self.settings.redial_initial
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, self.settings.redial_max)

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        while True:
            await asyncio.sleep(s.keepalive_interval)
            deadline = loop.time() - s.dead_after
            for link in list(self.links.values()):
                if link.last_rx < deadline:
                    link.close("mesh link silent", "silent")
                else:
                    link.send_control([_KEEPALIVE])
            self._check_siblings()

    def _check_siblings(self) -> None:
        """Drop a kept local connection once its client falls silent (or forget it once no newer
        claim remains or it went away by itself)."""
        for key, conn in list(self._siblings.items()):
            if self.relay.routes.get(key) is not conn or not self.directory.outranked(key):
                del self._siblings[key]
            elif self._silent(conn):
                del self._siblings[key]
                self.stats.evictions += 1
                self.relay.evict(key)

    def _silent(self, conn: RelayConnection) -> bool:
        return asyncio.get_running_loop().time() - conn.last_rx > self.settings.sibling_silence

    # -- links ------------------------------------------------------------------------------

    def found_self(self, link: MeshLink) -> None:
        if link.dialed:
            self.self_addresses.add(link.address)

    def link_up(self, link: MeshLink) -> None:
        peer = link.peer_id
        assert peer is not None
        existing = self.links.get(peer)
        if existing is not None and existing is not link:
            keep = min(self.id, peer)
            if link.dialer_id != keep and existing.dialer_id == keep:
                link.close("a link to this replica exists", "duplicate")
                return
            existing.close("replaced by a newer link", "duplicate")  # runs link_down for it
        self.links[peer] = link
        self._apply(self.directory.peer_up(peer))
        link.stats = self.stats.per_peer.setdefault(peer.hex()[:8], link.stats)
        self.stats.links_up += 1
        self._links_changed.set()
        link.send_control(encode_holds(self.directory.snapshot()))
        self._log.info("mesh link up to {} ({} keys held here)", link.name, len(self.directory.local))

    def link_down(self, link: MeshLink) -> None:
        peer = link.peer_id
        if peer is None or self.links.get(peer) is not link:
            return
        del self.links[peer]
        self._links_changed.set()
        self._apply(self.directory.peer_down(peer))

    def peer_holds(self, link: MeshLink, entries: list[tuple[bytes, int]]) -> None:
        if link.peer_id is not None and self.links.get(link.peer_id) is link:
            self._apply(self.directory.peer_holds(link.peer_id, entries))

    def peer_releases(self, link: MeshLink, entries: list[tuple[bytes, int]]) -> None:
        if link.peer_id is not None and self.links.get(link.peer_id) is link:
            self._apply(self.directory.peer_releases(link.peer_id, entries))

    def _apply(self, change: Change) -> None:
        remote = self.relay.remote_routes
        for key, peer in change.routes.items():
            link = self.links.get(peer) if peer is not None else None
            if link is None:
                remote.pop(key, None)
            else:
                remote[key] = link
        for key in change.evict:
            conn = self.relay.routes.get(key)
            if conn is None:
                continue
            if self._silent(conn):  # left behind by a node that registered again elsewhere
                self.stats.evictions += 1
                self.relay.evict(key)
            elif key not in self._siblings:  # its client is alive: the same key on two replicas
                self._siblings[key] = conn
                self.stats.siblings_kept += 1

    # -- the relay's hooks (MeshHooks) ------------------------------------------------------

    def local_registered(self, key: bytes) -> None:
        stamp = self.directory.register_local(key, time.time_ns() // 1000)
        self._broadcast(encode_holds([(key, stamp)]))

    def local_released(self, key: bytes) -> None:
        stamp = self.directory.release_local(key)
        if stamp is not None:
            self._broadcast(encode_releases([(key, stamp)]))

    def _broadcast(self, frames: list[bytes]) -> None:
        for link in list(self.links.values()):
            link.send_control(frames)

    # -- what status and metrics show -------------------------------------------------------

    def replicas(self) -> list[dict[str, object]]:
        """This replica and every linked one, with how many keys each holds."""
        rows: list[dict[str, object]] = [
            {"replica": self.id.hex()[:8], "address": "self", "keys": len(self.directory.local)}
        ]
        for peer, link in sorted(self.links.items()):
            rows.append({"replica": peer.hex()[:8], "address": link.address, "keys": self.directory.keys_of(peer)})
        return rows


def peers_from_slices(slices: Iterable[dict[str, object]], port_name: str, default_port: int) -> list[tuple[str, int]]:
    """The mesh addresses in EndpointSlice objects (plain dicts): every IPv4 address of every
    endpoint that is not terminating, at the slice's port named ``port_name`` (else
    ``default_port``).  Not-ready endpoints are included: a replica links to the others before
    it reports ready."""
    found: set[tuple[str, int]] = set()
    for item in slices:
        if item.get("addressType", "IPv4") != "IPv4":
            continue
        port = default_port
        for p in item.get("ports") or []:  # type: ignore[attr-defined]
            if isinstance(p, dict) and p.get("name") == port_name and isinstance(p.get("port"), int):
                port = int(p["port"])
        for endpoint in item.get("endpoints") or []:  # type: ignore[attr-defined]
            if not isinstance(endpoint, dict):
                continue
            if (endpoint.get("conditions") or {}).get("terminating") is True:
                continue
            for address in endpoint.get("addresses") or []:
                if isinstance(address, str):
                    found.add((address, port))
    return sorted(found)
