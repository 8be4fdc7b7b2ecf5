"""Relay replicas meshed on 127.0.0.1: they act as one relay whatever replica each client lands on.

Replicas run in this event loop (real sockets, real handshakes); a small load balancer in front
picks a replica per TCP connection, randomly or as the test forces it.  The process-level tests
(kill -9, SIGTERM drain) run ``wirekube-relay`` as real child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.fixtures.root import require_root
from tests.fixtures.wait import wait_for
from tests.integration.relay_support import (
    CHALLENGE,
    ERROR,
    LOCALHOST,
    REGISTERED,
    SpecClient,
    frame,
    free_port,
    raw_public,
    relay_settings,
    run,
    wait_until,
)
from wirekube.relay.client import RelayClient, RelayClientSettings, RelayClosed, backoff_delays
from wirekube.relay.mesh import MeshSettings, RelayMesh
from wirekube.relay.meshwire import ROLE_DIALER, encode_hello, mesh_proof
from wirekube.relay.metrics import build_registry, exposition, metric_value
from wirekube.relay.server import RelayServer, RelaySettings

SECRET = b"a-shared-mesh-secret-for-tests-0123456789"
MESH_HELLO, MESH_AUTH, MESH_HOLD = 0x20, 0x21, 0x22


class LoadBalancer:
    """A TCP load balancer on 127.0.0.1: each new connection goes to one backend, chosen at random
    unless ``force`` names the next ones; a backend's death closes the connections it carried."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.force: list[int] = []
        self.picked: list[int] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        return LOCALHOST, int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.force.pop(0) if self.force else random.randrange(len(self.backends))
        self.picked.append(index)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.backends[index])
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


class Replica:
    def __init__(self, relay: RelayServer, mesh: RelayMesh) -> None:
        self.relay = relay
        self.mesh = mesh

    @property
    def address(self) -> tuple[str, int]:
        return self.relay.address


@contextlib.asynccontextmanager
async def replicas(count: int, secret: bytes = SECRET, mesh_overrides: dict[str, Any] | None = None,
                   **overrides: object) -> AsyncIterator[list[Replica]]:
    """``count`` meshed replicas; each is given every mesh address, its own included."""
    mesh_ports = [free_port() for _ in range(count)]
    peers = tuple((LOCALHOST, p) for p in mesh_ports)
    out = []
    for port in mesh_ports:
        relay = RelayServer(relay_settings(**overrides))  # type: ignore[arg-type]
        mesh = RelayMesh(relay, MeshSettings(secret=secret, listen_host=LOCALHOST, listen_port=port, peers=peers,
                                             **(mesh_overrides or {})))
        await relay.start()
        await mesh.start()
        out.append(Replica(relay, mesh))
    try:
        await wait_until(lambda: all(len(r.mesh.links) == count - 1 for r in out), 10, "every mesh link up")
        yield out
    finally:
        for r in out:
            await r.relay.close(timeout=1.0)
            await r.mesh.close()


async def client_on(address: tuple[str, int], key: X25519PrivateKey | None = None,
                    settings: RelayClientSettings = RelayClientSettings()) -> tuple[RelayClient, bytes]:
    key = key or X25519PrivateKey.generate()
    client = await RelayClient.connect(*address, key, settings=settings)
    return client, client.public_key


async def exchange(a: RelayClient, b: RelayClient, count: int = 50) -> None:
    """``count`` datagrams each way arrive, intact and in order."""
    for sender, receiver in ((a, b), (b, a)):
        sent = [os.urandom(8) + i.to_bytes(4, "big") for i in range(count)]
        for datagram in sent:
            sender.send(receiver.public_key, datagram)
        got = [await asyncio.wait_for(receiver.recv(), 5.0) for _ in range(count)]
        assert got == [(sender.public_key, d) for d in sent]


async def settle(replicas_: list[Replica], key: bytes) -> None:
    """Every replica knows where ``key`` is (locally or through the mesh)."""
    await wait_until(lambda: all(key in r.relay.routes or key in r.relay.remote_routes for r in replicas_),
                     5, "every replica to know the key")


def test_both_ends_on_one_replica_and_on_different_replicas() -> None:
    async def main() -> None:
        async with replicas(2) as (r1, r2):
            a, ka = await client_on(r1.address)
            b, kb = await client_on(r1.address)  # same replica
            c, kc = await client_on(r2.address)  # the other replica, forced
            for key in (ka, kb, kc):
                await settle([r1, r2], key)
            await exchange(a, b)
            assert r1.mesh.stats.per_peer[r2.mesh.id.hex()[:8]].frames_out == 0  # nothing crossed
            await exchange(a, c)
            link_stats = r1.mesh.stats.per_peer[r2.mesh.id.hex()[:8]]
            assert link_stats.frames_out == 50 and link_stats.frames_in == 50
            text = exposition(build_registry(r1.relay)).decode()
            peer = r2.mesh.id.hex()[:8]
            assert metric_value(text, "wirekube_relay_mesh_frames_total", [("direction", "out"), ("peer", peer)]) == 50
            assert metric_value(text, "wirekube_relay_mesh_keys", [("peer", peer)]) == 1
            assert metric_value(text, "wirekube_relay_mesh_links") == 1
            for c_ in (a, b, c):
                await c_.close()

    run(main())


def test_three_replicas_forward_exactly_one_hop() -> None:
    async def main() -> None:
        async with replicas(3) as rs:
            clients = [await client_on(r.address) for r in rs]
            for _, key in clients:
                await settle(rs, key)
            for i, (a, _) in enumerate(clients):
                for b, _ in clients[i + 1:]:
                    await exchange(a, b, 20)
            # every frame crossed one link once: what replica i sent to j, j received from i
            for r in rs:
                for peer_hex, stats in r.mesh.stats.per_peer.items():
                    other = next(x for x in rs if x.mesh.id.hex()[:8] == peer_hex)
                    back = other.mesh.stats.per_peer[r.mesh.id.hex()[:8]]
                    assert stats.frames_out == back.frames_in == 20  # one pair per link, 20 each way
            for c, _ in clients:
                await c.close()

    run(main())


def test_a_mesh_link_with_a_wrong_secret_gets_nothing_and_learns_nothing() -> None:
    async def main() -> None:
        async with replicas(1) as (r1,):
            holder, held = await client_on(r1.address)
            # a real replica with another secret dials r1
            relay = RelayServer(relay_settings())
            wrong = RelayMesh(relay, MeshSettings(secret=b"not-the-mesh-secret-at-all-0000", listen_host=LOCALHOST,
                                                  listen_port=0, peers=(("127.0.0.1", r1.mesh.address[1]),)))
            await relay.start()
            await wrong.start()
            try:
                await wait_until(lambda: r1.mesh.stats.auth_failures >= 1, 5, "the wrong proof to be refused")
                await asyncio.sleep(0.3)
                assert not wrong.links and not relay.remote_routes and not r1.mesh.links
            finally:
                await relay.close(timeout=1.0)
                await wrong.close()
            # by hand: whatever a wrong dialer sends, it gets only a random hello and an Error
            reader, writer = await asyncio.open_connection(*r1.mesh.address)
            writer.write(encode_hello(os.urandom(16), os.urandom(16)))
            header = await reader.readexactly(5)
            assert header[4] == MESH_HELLO
            await reader.readexactly(int.from_bytes(header[:4], "big") - 1)
            bad = mesh_proof(b"guessed-secret-guessed-secret!!", ROLE_DIALER, os.urandom(16), os.urandom(16),
                             os.urandom(16), os.urandom(16))
            writer.write(frame(MESH_AUTH, bad) + frame(MESH_HOLD, held + bytes(8)))
            rest = await asyncio.wait_for(reader.read(), 5.0)
            assert rest[4] == ERROR and held not in rest and MESH_HOLD not in (rest[4],)
            writer.close()
            assert held in r1.relay.routes and not r1.relay.remote_routes  # the forged hold changed nothing
            await holder.close()

    run(main())


def test_a_client_of_one_replica_cannot_register_a_key_held_on_another() -> None:
    async def main() -> None:
        async with replicas(2) as (r1, r2):
            victim_key = X25519PrivateKey.generate()
            victim, victim_pub = await client_on(r2.address, victim_key)
            sender, _ = await client_on(r2.address)
            await settle([r1, r2], victim_pub)
            thief = await SpecClient.open(r1.address)
            answer = await thief.register(X25519PrivateKey.generate(), claimed=victim_pub)
            assert answer is not None and answer[0] == ERROR
            assert r1.relay.stats.registrations["bad_proof"] == 1
            await asyncio.sleep(0.2)
            assert victim_pub in r2.relay.routes and not victim.closed
            assert r1.relay.remote_routes.get(victim_pub) is r1.mesh.links[r2.mesh.id]
            sender.send(victim_pub, b"still mine")
            assert await asyncio.wait_for(victim.recv(), 5) == (sender.public_key, b"still mine")
            for c in (victim, sender):
                await c.close()

    run(main())


def test_the_latest_registration_of_a_key_wins_across_replicas() -> None:
    """A node that registered again through another replica left its old connection behind,
    silent: that one is dropped and the key's data goes to the newest registration."""
    async def main() -> None:
        async with replicas(2, mesh_overrides={"sibling_silence": 0.5}) as (r1, r2):
            key = X25519PrivateKey.generate()
            old = await SpecClient.open(r1.address)  # sends nothing after registering: silent
            assert (await old.register(key))[0] == REGISTERED
            pub = raw_public(key)
            peer, _ = await client_on(r1.address)
            await settle([r1, r2], pub)
            new, _ = await client_on(r2.address, key)
            frames = await asyncio.wait_for(old.read_until_closed(), 5)
            assert frames and frames[-1][0] == ERROR and b"another relay replica" in frames[-1][1]
            await wait_until(lambda: pub not in r1.relay.routes and pub in r1.relay.remote_routes, 5,
                             "r1 to forward the key to r2")
            assert r1.mesh.stats.evictions == 1
            peer.send(pub, b"to the newest")
            assert await asyncio.wait_for(new.recv(), 5) == (peer.public_key, b"to the newest")
            for c in (new, peer):
                await c.close()

    run(main())


def test_one_key_connected_to_two_replicas_is_one_client_not_two_evicting_each_other() -> None:
    """One agent given two relay addresses that reach two replicas: both connections stay (their
    client is alive), every replica's clients reach it, and when one goes the other carries on."""
    async def main() -> None:
        async with replicas(3, mesh_overrides={"sibling_silence": 2.0}) as (r1, r2, r3):
            key = X25519PrivateKey.generate()
            # a keepalive well within the silence limit, as the agent's 25 s is within 35 s
            alive = RelayClientSettings(keepalive_interval=0.3)
            first, pub = await client_on(r1.address, key, alive)
            await settle([r1, r2, r3], pub)
            second, _ = await client_on(r2.address, key, alive)
            on_r1, _ = await client_on(r1.address)
            on_r3, _ = await client_on(r3.address)
            await wait_until(lambda: r3.relay.remote_routes.get(pub) is r3.mesh.links.get(r2.mesh.id), 5,
                             "r3 to forward the key to the newest registration (r2)")
            await asyncio.sleep(3 * 2.0)  # longer than the silence limit: a live sibling is not dropped
            assert not first.closed and not second.closed
            assert r1.mesh.stats.evictions == 0 and r1.mesh.stats.siblings_kept == 1
            on_r1.send(pub, b"from r1")  # r1 delivers to its own connection for the key
            assert await asyncio.wait_for(first.recv(), 5) == (on_r1.public_key, b"from r1")
            on_r3.send(pub, b"from r3")  # r3 forwards to the newest registration
            assert await asyncio.wait_for(second.recv(), 5) == (on_r3.public_key, b"from r3")
            await second.close()  # the newest goes: r3 falls back to r1's connection
            await wait_until(lambda: r3.relay.remote_routes.get(pub) is r3.mesh.links.get(r1.mesh.id), 5,
                             "r3 to forward the key to r1")
            on_r3.send(pub, b"after")
            assert await asyncio.wait_for(first.recv(), 5) == (on_r3.public_key, b"after")
            for c in (first, on_r1, on_r3):
                await c.close()

    run(main(), timeout=60)


def test_a_stalled_client_behind_the_mesh_costs_the_other_replica_at_most_its_caps() -> None:
    async def main() -> None:
        limit = 64 * 1024
        async with replicas(2, queue_limit_bytes=limit) as (r1, r2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, r2.address)
            reader, writer = await asyncio.open_connection(sock=sock)
            stalled = SpecClient(reader, writer)
            stalled_key = X25519PrivateKey.generate()
            assert await stalled.register(stalled_key) == (REGISTERED, b"")
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            stalled_pub = raw_public(stalled_key)
            sender, _ = await client_on(r1.address)
            await settle([r1, r2], stalled_pub)
            for _ in range(3000):
                sender.send(stalled_pub, b"x" * 1200)
                if sender.write_buffer_size() > 256 * 1024:
                    await asyncio.sleep(0.01)
            await wait_until(lambda: r2.relay.stats.frames_dropped["queue_full"] > 0, 10, "r2 to drop at the cap")
            mesh_link = r1.mesh.links[r2.mesh.id]
            assert r2.relay.routes[stalled_pub]._queued_bytes() <= limit
            assert mesh_link._queued_bytes() <= r1.mesh.settings.queue_limit_bytes
            await sender.close()
            await stalled.close()

    run(main())


def test_pending_handshakes_are_limited_per_address_but_registered_clients_are_not() -> None:
    async def main() -> None:
        relay = RelayServer(relay_settings(max_pending_per_ip=4))
        await relay.start()
        try:
            registered = [await client_on(relay.address) for _ in range(10)]  # one "NAT", ten nodes
            idle = [await SpecClient.open(relay.address) for _ in range(4)]
            await wait_until(lambda: sum(relay.pending_by_ip.values()) == 4, 5, "four pending handshakes")
            refused = await SpecClient.open(relay.address)
            answer = await refused.read()
            assert answer is not None and answer[0] == ERROR and b"unfinished" in answer[1]
            assert relay.stats.pending_refused == 1
            text = exposition(build_registry(relay)).decode()
            assert metric_value(text, "wirekube_relay_pending_refused_total") == 1
            assert metric_value(text, "wirekube_relay_pending_handshakes") == 4
            for c in idle:
                await c.close()
            await wait_until(lambda: not relay.pending_by_ip, 5, "the idle ones to go")
            late, _ = await client_on(relay.address)
            assert len(relay.routes) == 11
            for c, _ in [*registered, (late, b"")]:
                await c.close()
        finally:
            await relay.close(timeout=1.0)

    run(main())


def test_a_draining_replica_moves_its_clients_without_losing_the_pair() -> None:
    async def main() -> None:
        async with replicas(2) as (r1, r2):
            lb = LoadBalancer([r1.address, r2.address])
            lb_address = await lb.start()
            lb.force = [0, 1]
            a, ka = await client_on(lb_address)
            b, kb = await client_on(lb_address)
            for key in (ka, kb):
                await settle([r1, r2], key)
            lb.force = [0, 1, 1, 1]  # the moving client first lands on the draining r1 again (refused)
            drain = asyncio.get_running_loop().create_task(r1.relay.drain(timeout=5.0))
            await wait_until(lambda: a.migrations == 1, 5, "client a to move to r2")
            await drain
            assert not r1.relay.routes and ka in r2.relay.routes and not a.closed
            await exchange(a, b, 20)
            assert r1.relay.stats.goaways == 1
            for c in (a, b):
                await c.close()
            await lb.close()

    run(main())


# -- real processes -------------------------------------------------------------------------------


class RelayProcess:
    def __init__(self, tmp: Path, index: int, mesh_ports: list[int], *extra: str, static_peers: bool = True) -> None:
        self.port = free_port()
        self.mesh_port = mesh_ports[index]
        secret = tmp / "mesh-secret"
        if not secret.exists():
            secret.write_bytes(SECRET)
        peers = [f"--mesh-peers={','.join(f'{LOCALHOST}:{p}' for p in mesh_ports)}"] if static_peers else []
        self.log = tmp / f"relay-{index}.log"
        with open(self.log, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wirekube.relay.cli", f"--listen={LOCALHOST}:{self.port}",
                 f"--stun-listen={LOCALHOST}:0", f"--metrics-listen={LOCALHOST}:0", "--log-format=text",
                 f"--mesh-listen={LOCALHOST}:{self.mesh_port}", *peers, f"--mesh-secret-file={secret}",
                 "--drain-timeout=5", *extra],
                stdout=subprocess.DEVNULL, stderr=log,
            )

    @property
    def address(self) -> tuple[str, int]:
        return LOCALHOST, self.port

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Endpoint:
    """A node's relay connection as the agent keeps it: reconnect through the load balancer with
    :func:`backoff_delays` whenever it is lost; datagrams received are timestamped."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.key = X25519PrivateKey.generate()
        self.public = raw_public(self.key)
        self.client: RelayClient | None = None
        self.received: list[float] = []
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.client = await RelayClient.connect(*self.address, self.key, on_data=self._on_data)
        self._task = asyncio.get_running_loop().create_task(self._keep())

    def _on_data(self, source: bytes, datagram: bytes) -> None:
        self.received.append(time.monotonic())

    async def _keep(self) -> None:
        while True:
            assert self.client is not None
            await self.client.wait_closed()
            delays = backoff_delays()
            while True:
                await asyncio.sleep(next(delays))
                try:
                    self.client = await RelayClient.connect(*self.address, self.key, on_data=self._on_data)
                    self.reconnects += 1
                    break
                except (OSError, TimeoutError, RelayClosed, Exception):  # noqa: BLE001 - keep trying
                    continue

    def send(self, to: bytes, datagram: bytes) -> None:
        if self.client is not None and not self.client.closed:
            with contextlib.suppress(RelayClosed):
                self.client.send(to, datagram)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.client is not None:
            await self.client.close()


async def ping_pair(a: Endpoint, b: Endpoint, seconds: float, during: asyncio.Future[None] | None = None) -> float:
    """10/s datagrams a -> b for ``seconds``; returns the longest gap between arrivals at b."""
    start = time.monotonic()
    b.received.clear()
    while time.monotonic() - start < seconds:
        a.send(b.public, b"ping")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    times = [start, *b.received]
    return max(y - x for x, y in itertools.pairwise(times)) if b.received else seconds


def test_kill_9_of_the_replica_carrying_a_pair_reconnects_through_the_lb_and_traffic_resumes(tmp_path: Path) -> None:
    mesh_ports = [free_port() for _ in range(2)]
    procs = [RelayProcess(tmp_path, i, mesh_ports) for i in range(2)]

    async def main() -> None:
        lb = LoadBalancer([p.address for p in procs])
        lb_address = await lb.start()
        for p in procs:
            await wait_until(lambda p=p: _listening(p.address) and _listening((LOCALHOST, p.mesh_port)), 45,  # type: ignore[misc]
                             "relay processes to listen")
        await wait_until(lambda: "mesh link up" in procs[0].log.read_text() and "mesh link up" in
                         procs[1].log.read_text(), 30, "the mesh link")
        lb.force = [0, 1]  # the pair spans both replicas
        a, b = Endpoint(lb_address), Endpoint(lb_address)
        await a.start()
        await b.start()
        gap = await ping_pair(a, b, 1.0)
        assert gap < 0.5, f"no steady traffic before the kill (gap {gap:.2f}s)"
        procs[0].proc.kill()  # SIGKILL: no drain, no goodbye
        gap = await ping_pair(a, b, 5.0)
        print(f"kill -9 of the replica carrying one end: longest gap {gap:.2f}s, {a.reconnects} reconnect(s)")
        assert a.reconnects == 1 and gap <= 3.0
        await a.close()
        await b.close()
        await lb.close()

    try:
        run(main(), timeout=90)
    finally:
        for p in procs:
            p.stop()


def test_sigterm_drains_clients_to_the_other_replica_with_traffic_flowing(tmp_path: Path) -> None:
    mesh_ports = [free_port() for _ in range(2)]
    procs = [RelayProcess(tmp_path, i, mesh_ports) for i in range(2)]

    async def main() -> None:
        lb = LoadBalancer([p.address for p in procs])
        lb_address = await lb.start()
        for p in procs:
            await wait_until(lambda p=p: _listening(p.address), 45, "relay processes to listen")  # type: ignore[misc]
        await wait_until(lambda: "mesh link up" in procs[0].log.read_text() and "mesh link up" in
                         procs[1].log.read_text(), 30, "the mesh link")
        lb.force = [0, 0]  # both ends on the replica about to restart
        a, b = Endpoint(lb_address), Endpoint(lb_address)
        await a.start()
        await b.start()
        lb.force = []
        assert await ping_pair(a, b, 1.0) < 0.5
        procs[0].proc.send_signal(signal.SIGTERM)
        gap = await ping_pair(a, b, 3.0)
        code = await asyncio.get_running_loop().run_in_executor(None, procs[0].proc.wait, 15)
        print(f"SIGTERM drain of the replica carrying both ends: longest gap {gap:.2f}s")
        assert code == 0
        assert a.client is not None and a.client.migrations == 1 and a.reconnects == 0
        assert gap <= 1.0
        await a.close()
        await b.close()
        await lb.close()

    try:
        run(main(), timeout=90)
    finally:
        for p in procs:
            p.stop()


def _listening(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, 0.5).close()
        return True
    except OSError:
        return False


def test_reconnect_backoff_starts_within_250_ms_and_is_jittered() -> None:
    firsts = {next(backoff_delays()) for _ in range(50)}
    assert all(0 < d <= 0.25 for d in firsts) and len(firsts) > 10
    delays = backoff_delays(rng=random.Random(1))
    series = [next(delays) for _ in range(20)]
    assert series[-1] <= 30 and sum(series[:4]) < 2.5


def test_the_relay_client_marks_its_socket_before_connecting() -> None:
    async def main() -> None:
        relay = RelayServer(RelaySettings(listen_host=LOCALHOST, listen_port=0, stun_host=None))
        await relay.start()
        seen: list[int] = []
        try:
            client = await RelayClient.connect(*relay.address, X25519PrivateKey.generate(),
                                               settings=RelayClientSettings(fwmark=0x574B))
            sock = client._transport().get_extra_info("socket")
            seen.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK))
            await client.close()
        finally:
            await relay.close(timeout=1.0)
        assert seen == [0x574B]

    run(main())


def test_the_spec_handshake_still_works_next_to_the_mesh() -> None:
    """Clients see nothing of the mesh: the client port speaks only the client protocol."""

    async def main() -> None:
        async with replicas(2) as (r1, _r2):
            client = await SpecClient.open(r1.address)
            client.send(MESH_HELLO, bytes(33))
            answer = await client.read()
            assert answer is not None and answer[0] == ERROR
            key = X25519PrivateKey.generate()
            again = await SpecClient.open(r1.address)
            again.send(0x01, raw_public(key))
            challenge = await again.read()
            assert challenge is not None and challenge[0] == CHALLENGE
            await client.close()
            await again.close()

    run(main())


def test_unproven_mesh_connections_are_bounded() -> None:
    """Connections to the mesh port that have not proven the secret cannot pile up."""
    from wirekube.relay.mesh import MAX_UNPROVEN_LINKS

    async def main() -> None:
        async with replicas(1) as (r1,):
            await wait_until(lambda: bool(r1.mesh.self_addresses) and not r1.mesh.all_links, 5,
                             "the replica to find its own address in the peer list")
            assert r1.mesh.stats.closed["self"] == 1  # found once, never dialed again
            idle = [await asyncio.open_connection(*r1.mesh.address) for _ in range(MAX_UNPROVEN_LINKS)]
            await wait_until(lambda: len(r1.mesh.all_links) == MAX_UNPROVEN_LINKS, 5, "the idle links")
            reader, writer = await asyncio.open_connection(*r1.mesh.address)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped at once, nothing said
            assert r1.mesh.stats.closed["unproven_limit"] == 1
            for _, w in [*idle, (reader, writer)]:
                w.close()
            await wait_until(lambda: not r1.mesh.all_links, 10, "the idle links to go")

    run(main())


LAB3_TOPOLOGY = """
internet:
  relay: {address: 198.18.0.2:3478, replicas: 3}   # 3 relay replicas behind one "NLB" address
  stun: [198.18.0.2:3478, 198.18.0.3:3478]
sites:
  - {name: cloud, nat: none, nodes: [{name: ec2-a}]}
  - {name: prc, nat: port-restricted-cone, nodes: [{name: prc-1}]}
  - {name: sym1, nat: symmetric, nodes: [{name: sym1-1}]}
  - {name: sym2, nat: symmetric, nodes: [{name: sym2-1}]}
  - {name: udpblock, nat: udp-blocked, nodes: [{name: udpblock-1}]}
"""


@pytest.mark.netns
@pytest.mark.apiserver
def test_three_replicas_behind_the_lab_load_balancer_carry_every_predicted_relay_pair() -> None:
    """A small lab (one node per kind of NAT, real agents and wireguard-go) with 3 relay replicas
    behind the load-balancer address: every pair the NAT matrix relays is up and passes traffic,
    whatever replica each end landed on; every replica is linked to the other two."""
    import re
    import uuid

    from wirekube.lab import orchestrate
    from wirekube.lab.topology import parse_topology_yaml

    require_root()
    name = f"r3{uuid.uuid4().hex[:5]}"
    try:
        orchestrate.up(parse_topology_yaml(LAB3_TOPOLOGY), name, wait=120)
        lab_, kube, _ = orchestrate.attach(name)
        replicas = orchestrate.relay_replicas(lab_)
        assert len(replicas) == 3

        def metrics(index: int) -> str:
            host = orchestrate.relay_endpoints(lab_)[index].host
            return lab_.exec("internet", ["curl", "-s", "-m", "5", f"http://{host}:9478/metrics"], check=True).stdout

        def metric(text: str, series: str) -> float:
            match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
            return float(match.group(1)) if match else 0.0

        wait_for(lambda: all(metric(metrics(i), "wirekube_relay_mesh_links") == 2 for i in replicas),
                 30, "every replica linked to the other two", interval=0.5)
        expected = orchestrate.expected_pairs(lab_)
        relayed = sorted(k for k, v in expected.items() if v == "relay")
        assert len(relayed) >= 12, relayed  # udp-blocked <-> all, sym <-> sym, sym <-> prc

        def down() -> list[tuple[str, str]]:
            got = {(p["from"], p["to"]): p for p in orchestrate.collect(lab_, kube)["pairs"]}
            return [k for k in relayed if got[k]["transport"] != "relay" or got[k]["rttMs"] is None]

        def all_up() -> bool:
            missing = down()
            if missing:
                print(f"relay pairs not yet up: {missing}")
            return not missing

        wait_for(all_up, 60, "every predicted relay pair up", interval=1.0)
        held = [metric(metrics(i), 'wirekube_relay_connections{state="registered"}') for i in replicas]
        print(f"3 replicas: {len(relayed)} predicted relay pairs all up; relay clients per replica: {held}")
        assert sum(held) == len(lab_.nodes), held  # one relay connection per node, each on one replica
        if sum(1 for h in held if h) >= 2:  # some relayed pair spans two replicas: the mesh carried it
            mesh_in = [sum(float(v) for v in re.findall(r'mesh_frames_total\{direction="in".*\} (\S+)', metrics(i)))
                       for i in replicas]
            assert sum(mesh_in) > 0, mesh_in
        else:
            print("every node landed on one replica this time (p = 1/81); cross-replica pairs are forced in "
                  "test_both_ends_on_one_replica_and_on_different_replicas")
        kube.close()
    finally:
        orchestrate.down(name)

