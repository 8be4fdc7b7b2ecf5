"""The relay proxy's batched data path: framing a burst in one write, GSO delivery to WireGuard
with every datagram boundary kept, and the bounded queue towards a relay that stops reading.

Everything on 127.0.0.1: a UDP socket stands in for each node's WireGuard.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import LOCALHOST, run, running_relay, wait_until
from wirekube.relay.auth import Challenge, public_bytes
from wirekube.relay.client import RelayClientSettings
from wirekube.relay.protocol import (
    NEED_DATA,
    DataRun,
    FrameDecoder,
    FrameType,
    encode_challenge,
    encode_data,
    encode_registered,
    run_datagrams,
)
from wirekube.traversal.relaypath import BATCH_BYTES, RelayPath


def udp_receive_queue(port: int) -> tuple[int, int]:
    """(bytes queued unread, datagrams dropped) of the UDP socket bound to 127.0.0.1:``port``,
    from /proc/net/udp (this network namespace)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local:
            return int(fields[4].split(":")[1], 16), int(fields[12])
    raise AssertionError(f"no UDP socket on 127.0.0.1:{port} in /proc/net/udp")


MIXED = [1452] * 50 + [80] * 3 + [1452] * 10 + [100] + [9000] * 9 + [1200, 1] + [40000, 40000] + [64] * 70


def wireguard_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((LOCALHOST, 0))
    s.setblocking(False)
    return s


def numbered(i: int, size: int) -> bytes:
    """A datagram whose bytes say which one it is, so a split or merged datagram shows."""
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            return out


class FakeClient:
    """What RelayPath needs of a RelayClient, recording the writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.writing_paused = False
        self.closed = False

    def send_frames(self, frames: bytes) -> None:
        self.writes.append(frames)


def decoded(writes: list[bytes]) -> list[tuple[bytes, bytes]]:
    decoder = FrameDecoder()
    for w in writes:
        decoder.feed(w)
    out: list[tuple[bytes, bytes]] = []
    while (item := decoder.next_run()) is not NEED_DATA:
        assert isinstance(item, DataRun)
        out.extend((item.key, d) for d in run_datagrams(item))
    return out


def test_frames_from_the_relay_reach_wireguard_one_datagram_each_with_and_without_gso() -> None:
    async def scenario() -> None:
        wg = wireguard_socket()
        peer = public_bytes(X25519PrivateKey.generate())
        path = RelayPath(X25519PrivateKey.generate(), wg.getsockname()[1])
        try:
            port = await path.ensure_proxy(peer)
            datagrams = [numbered(i, size) for i, size in enumerate(MIXED)]
            frames = memoryview(b"".join(encode_data(peer, d) for d in datagrams))

            path._from_relay_frames(peer, frames)
            assert drain(wg) == datagrams  # same datagrams, same boundaries, same order
            assert path.stats.from_relay_datagrams == len(MIXED)
            assert path.stats.gso_sends >= 4  # the runs of 1452, 9000 and 64 bytes (and a tail)

            path.gso = False  # where the kernel refuses UDP GSO: one send per datagram
            sends = path.stats.gso_sends
            path._from_relay_frames(peer, frames)
            assert drain(wg) == datagrams and path.stats.gso_sends == sends

            # and WireGuard sees them all from the proxy's port: the peer's endpoint stays put
            path._from_relay_frames(peer, memoryview(encode_data(peer, b"x")))
            assert wg.recvfrom(100) == (b"x", (LOCALHOST, port))
            # frames from a key with no proxy are counted, not sent
            path._from_relay_frames(b"u" * 32, frames)
            assert path.stats.unknown_peer_drops == len(MIXED) and drain(wg) == []
        finally:
            await path.close()
            wg.close()

    run(scenario())


def test_a_burst_from_wireguard_leaves_in_one_write_of_whole_frames() -> None:
    async def scenario() -> None:
        wg = wireguard_socket()
        peer = public_bytes(X25519PrivateKey.generate())
        path = RelayPath(X25519PrivateKey.generate(), wg.getsockname()[1])
        fake = FakeClient()
        path._up = fake  # type: ignore[assignment]
        try:
            port = await path.ensure_proxy(peer)
            proxy = path._proxies[peer]
            datagrams = [numbered(i, size) for i, size in enumerate(MIXED[:64])]  # ~90 KB
            for d in datagrams:  # no await in between: the proxy has not run yet
                wg.sendto(d, (LOCALHOST, port))
            wg.sendto(bytes(65507), (LOCALHOST, port))  # too large for a Data frame
            proxy.pump()  # what the event loop calls when the socket is readable
            assert len(fake.writes) == 1
            assert decoded(fake.writes) == [(peer, d) for d in datagrams]
            assert path.stats.to_relay_datagrams == 64 and path.stats.to_relay_writes == 1
            assert path.stats.oversized_drops == 1

            # a bigger burst: writes of at most BATCH_BYTES (plus the frame that crossed it)
            fake.writes.clear()
            datagrams = [numbered(i, 9000) for i in range(40)]  # 360 KB
            for d in datagrams:
                wg.sendto(d, (LOCALHOST, port))
            for _ in range(4):
                proxy.pump()
            assert len(fake.writes) == 3 and all(len(w) <= BATCH_BYTES + 9037 for w in fake.writes)
            assert decoded(fake.writes) == [(peer, d) for d in datagrams]

            path._up = None  # no relay connected: counted as dropped
            wg.sendto(b"lost", (LOCALHOST, port))
            proxy.pump()
            assert path.stats.no_relay_drops == 1 and len(fake.writes) == 3
        finally:
            await path.close()
            wg.close()

    run(scenario())


def test_proxies_stop_reading_while_the_relay_connection_is_backed_up() -> None:
    async def scenario() -> None:
        wg = wireguard_socket()
        peer = public_bytes(X25519PrivateKey.generate())
        path = RelayPath(X25519PrivateKey.generate(), wg.getsockname()[1])
        fake = FakeClient()
        try:
            port = await path.ensure_proxy(peer)
            proxy = path._proxies[peer]
            path._up = fake  # type: ignore[assignment]
            assert proxy._reading
            fake.writing_paused = True
            path._on_flow(True)
            assert not proxy._reading and path.stats.paused_reading == 1
            await path.ensure_proxy(public_bytes(X25519PrivateKey.generate()))  # a new proxy starts paused too
            assert not any(p._reading for p in path._proxies.values())
            wg.sendto(b"waits in the kernel", (LOCALHOST, port))
            fake.writing_paused = False
            path._on_flow(False)
            assert all(p._reading for p in path._proxies.values())
            await wait_until(lambda: len(fake.writes) == 1, what="the datagram once resumed")
            assert decoded(fake.writes) == [(peer, b"waits in the kernel")]
        finally:
            await path.close()
            wg.close()

    run(scenario())


def test_many_mixed_datagrams_cross_the_real_relay_intact_and_in_order() -> None:
    async def scenario() -> None:
        wg_a, wg_b = wireguard_socket(), wireguard_socket()
        key_a, key_b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        async with running_relay() as relay:
            a = RelayPath(key_a, wg_a.getsockname()[1])
            b = RelayPath(key_b, wg_b.getsockname()[1])
            try:
                a.set_relays([relay.address])
                b.set_relays([relay.address])
                await wait_until(lambda: a.connected_relays() and b.connected_relays(), what="warm relays")
                port = await a.ensure_proxy(public_bytes(key_b))
                await b.ensure_proxy(public_bytes(key_a))
                sent: list[bytes] = []
                got: list[bytes] = []
                for start in range(0, 1200, 120):  # bursts the proxy reads in batches
                    burst = [numbered(i, MIXED[i % len(MIXED)]) for i in range(start, start + 120)]
                    for d in burst:
                        wg_a.sendto(d, (LOCALHOST, port))
                    sent += burst
                    await wait_until(lambda: a.stats.to_relay_datagrams == len(sent), what="the burst read")
                await wait_until(lambda: (got.extend(drain(wg_b)) or len(got)) >= len(sent), what="all delivered")
                assert got == sent
                assert a.stats.to_relay_writes < len(sent) / 4  # batched: several datagrams per write
                assert b.stats.from_relay_datagrams == len(sent)
            finally:
                await a.close()
                await b.close()
        wg_a.close()
        wg_b.close()

    run(scenario())


async def _registering_then_deaf_relay() -> tuple[asyncio.Server, list[Any]]:
    """A relay that registers one client and then never reads again (tiny receive buffer), so
    whatever the client writes piles up in its own transport."""
    held: list[Any] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        decoder.feed(await reader.readexactly(5 + 32))
        register = decoder.next_frame()
        challenge = Challenge.issue(register.body)  # type: ignore[union-attr]
        writer.write(encode_challenge(challenge.ephemeral_public, challenge.nonce))
        decoder.feed(await reader.readexactly(5 + 32))
        auth = decoder.next_frame()
        assert auth.type == FrameType.AUTH and challenge.verify(auth.body)  # type: ignore[union-attr]
        writer.write(encode_registered())
        held.append(writer)  # and never read again

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted socket
    listener.bind((LOCALHOST, 0))
    server = await asyncio.start_server(serve, sock=listener)
    return server, held


def test_the_queue_towards_a_relay_that_stops_reading_stays_bounded() -> None:
    async def scenario() -> None:
        server, held = await _registering_then_deaf_relay()
        port = server.sockets[0].getsockname()[1]
        wg = wireguard_socket()
        path = RelayPath(X25519PrivateKey.generate(), wg.getsockname()[1])
        try:
            path.set_relays([(LOCALHOST, port)])
            await wait_until(lambda: path.connected_relays() != [], what="registered with the deaf relay")
            client = path._up
            assert client is not None
            proxy_port = await path.ensure_proxy(public_bytes(X25519PrivateKey.generate()))
            high = RelayClientSettings().write_high_water
            worst = 0

            async def flood() -> None:
                nonlocal worst
                while not path.stats.paused_reading:
                    for _ in range(64):
                        wg.sendto(bytes(1400), (LOCALHOST, proxy_port))
                    await asyncio.sleep(0)  # let the proxy read
                    worst = max(worst, client.write_buffer_size())

            await asyncio.wait_for(flood(), 60)
            assert client.writing_paused and not any(p._reading for p in path._proxies.values())
            queued = client.write_buffer_size()
            forwarded = path.stats.to_relay_datagrams
            unread, dropped = udp_receive_queue(proxy_port)
            for _ in range(200):  # WireGuard keeps sending: nothing more is read or queued
                wg.sendto(bytes(1400), (LOCALHOST, proxy_port))
            # The kernel holds the new datagrams for the proxy (or drops them at its full buffer)
            # while this loop keeps running: the proxy has had every chance to read them.
            await wait_until(lambda: udp_receive_queue(proxy_port) != (unread, dropped), timeout=10,
                             what="the proxy socket's kernel queue to take the new datagrams")
            assert udp_receive_queue(proxy_port)[0] > 0  # they sit there unread
            assert path.stats.to_relay_datagrams == forwarded and client.write_buffer_size() == queued
            # at most the high-water mark plus the one batch that crossed it
            assert high < queued <= high + 128 * 1024 + 1500 and worst <= queued
        finally:
            await path.close()
            wg.close()
            for w in held:
                w.close()
            server.close()

    run(scenario())
