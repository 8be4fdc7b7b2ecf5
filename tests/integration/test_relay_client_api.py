"""The RelayClient the agent uses, against a real relay on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import (
    LOCALHOST,
    Collector,
    allow_loopback_targets,
    relay_settings,
    run,
    running_relay,
    wait_until,
)
from wirekube.relay.auth import Challenge
from wirekube.relay.authz import PeerAuthorizer
from wirekube.relay.client import (
    RelayClient,
    RelayClientSettings,
    RelayClosed,
    RelayRejected,
    backoff_delays,
)
from wirekube.relay.protocol import (
    PROBE_FROM_ALTERNATE_PORT,
    PROBE_FROM_STUN_PORT,
    FrameDecoder,
    FrameType,
    encode_challenge,
    encode_data,
    encode_registered,
    frame_bounds,
    parse_nat_probe_datagram,
)


def test_two_clients_exchange_datagrams() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            a = await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            got: list[tuple[bytes, bytes]] = []
            b = await RelayClient.connect(*relay.address, X25519PrivateKey.generate(),
                                          on_data=lambda src, d: got.append((src, d)))
            a.send(b.public_key, b"one")
            a.send_many(b.public_key, [b"two", b"three"])
            await wait_until(lambda: len(got) == 3, what="three datagrams")
            assert got == [(a.public_key, b"one"), (a.public_key, b"two"), (a.public_key, b"three")]
            b.send(a.public_key, b"back")
            assert await asyncio.wait_for(a.recv(), 5) == (b.public_key, b"back")
            await a.close()
            await b.close()
            assert a.closed and a.close_reason == "closed by us"
            with pytest.raises(RelayClosed, match="closed by us"):
                a.send(b.public_key, b"late")
            with pytest.raises(RelayClosed, match="closed by us"):
                await a.recv()

    run(scenario())


def test_relay_probe_measures_a_round_trip() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            client = await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            rtt = await client.relay_probe(timeout=5)
            assert 0 < rtt < 5
            assert relay.stats.relay_probes == 1
            await client.close()

    run(scenario())


def test_keepalives_flow_and_keep_the_connection_up() -> None:
    async def scenario() -> None:
        settings = RelayClientSettings(keepalive_interval=0.05, dead_after=2.0)
        async with running_relay(relay_settings(idle_timeout=1.0)) as relay:
            client = await RelayClient.connect(*relay.address, X25519PrivateKey.generate(), settings=settings)
            await wait_until(lambda: relay.stats.keepalives >= 30, what="keepalives")  # ~1.5 s > idle_timeout
            assert not client.closed
            assert relay.stats.disconnects["idle"] == 0
            await client.close()

    run(scenario())


def test_refused_registration_raises_with_the_relays_reason() -> None:
    async def scenario() -> None:
        async with running_relay(authorizer=PeerAuthorizer([])) as relay:
            with pytest.raises(RelayRejected, match="relay refused: key is not authorized") as e:
                await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            assert "not authorized" in e.value.reason

    run(scenario())


def test_relay_shutdown_closes_clients_with_a_reason() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            client = await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            await relay.close(timeout=2.0)
            reason = await asyncio.wait_for(client.wait_closed(), 5)
            assert "shutting down" in reason

    run(scenario())


def test_a_silent_relay_is_detected() -> None:
    """A relay that registers the client and then never answers keepalives."""

    async def silent_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        decoder.feed(await reader.readexactly(5 + 32))
        register = decoder.next_frame()
        challenge = Challenge.issue(register.body)  # type: ignore[union-attr]
        writer.write(encode_challenge(challenge.ephemeral_public, challenge.nonce))
        decoder.feed(await reader.readexactly(5 + 32))
        auth = decoder.next_frame()
        assert auth.type == FrameType.AUTH and challenge.verify(auth.body)  # type: ignore[union-attr]
        writer.write(encode_registered())
        await reader.read()  # then silence until the client gives up

    async def scenario() -> None:
        server = await asyncio.start_server(silent_relay, LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        settings = RelayClientSettings(keepalive_interval=0.05, dead_after=0.3)
        client = await RelayClient.connect(LOCALHOST, port, X25519PrivateKey.generate(), settings=settings)
        reason = await asyncio.wait_for(client.wait_closed(), 5)
        assert "silent" in reason
        server.close()

    run(scenario())


def test_nat_probe_through_the_client() -> None:
    async def scenario() -> None:
        settings = relay_settings(probe_target_policy=allow_loopback_targets)
        async with running_relay(settings) as relay:
            loop = asyncio.get_running_loop()
            received: list[tuple[bytes, tuple[str, int]]] = []
            target, _ = await loop.create_datagram_endpoint(
                lambda: Collector(received), local_addr=(LOCALHOST, 0)
            )
            client = await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            assert await client.nat_probe(LOCALHOST, target.get_extra_info("sockname")[1], timeout=5)
            await wait_until(lambda: len(received) == 2, what="two probe datagrams")
            seen = {parse_nat_probe_datagram(data): addr[1] for data, addr in received}
            assert seen == {
                PROBE_FROM_STUN_PORT: relay.stun_address[1],  # type: ignore[index]
                PROBE_FROM_ALTERNATE_PORT: relay.nat_probe_address[1],  # type: ignore[index]
            }
            # a target the policy refuses gets no confirmation
            assert not await client.nat_probe("10.255.255.1", 9, timeout=0.3)
            await client.close()
            target.close()

    run(scenario())


def test_backoff_schedule_matches_the_reference() -> None:
    """Each delay is jittered within [bound/2, bound]; the bound is 250 ms for three retries, then
    grows 1.6x to 30 s."""
    delays = backoff_delays()
    bounds = [0.25, 0.25, 0.25] + [min(0.25 * 1.6**i, 30.0) for i in range(1, 14)]
    got = [next(delays) for _ in range(16)]
    assert all(b / 2 <= d <= b for d, b in zip(got, bounds, strict=True)), got


def test_connect_to_nothing_fails_fast() -> None:
    async def scenario() -> None:
        with socket.socket() as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]  # bound, not listening: connection refused
            with pytest.raises(OSError, match="Connect call failed"):
                await RelayClient.connect(LOCALHOST, port, X25519PrivateKey.generate())

    run(scenario())


def test_client_refuses_data_before_registered() -> None:
    async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5 + 32)
        writer.write(struct.pack(">IB", 34, FrameType.DATA) + b"k" * 32 + b"x")  # Data, no Challenge
        await reader.read()

    async def scenario() -> None:
        server = await asyncio.start_server(rogue, LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(Exception, match="relay sent Data before Registered") as e:
            await RelayClient.connect(LOCALHOST, port, X25519PrivateKey.generate())
        assert "before Registered" in str(e.value)
        server.close()

    run(scenario())


def test_a_failing_on_data_handler_does_not_cut_the_link() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            got: list[bytes] = []

            def handler(source: bytes, datagram: bytes) -> None:
                if datagram == b"boom":
                    raise ValueError("handler bug")
                got.append(datagram)

            a = await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            b = await RelayClient.connect(*relay.address, X25519PrivateKey.generate(), on_data=handler)
            a.send_many(b.public_key, [b"boom", b"after"])
            await wait_until(lambda: got == [b"after"], what="the datagram after the failure")
            assert b.callback_errors == 1 and not b.closed
            await a.close()
            await b.close()

    run(scenario())


def test_batch_forms_send_prebuilt_frames_and_hand_over_wire_form_runs() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            runs: list[tuple[bytes, bytes]] = []
            a = await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            b = await RelayClient.connect(*relay.address, X25519PrivateKey.generate(),
                                          on_frames=lambda src, frames: runs.append((src, bytes(frames))))
            datagrams = [b"one", b"two" * 500, b"3"]
            a.send_frames(b"".join(encode_data(b.public_key, d) for d in datagrams))
            await wait_until(lambda: sum(len(frame_bounds(f)) for _, f in runs) == 3, what="three frames")
            # the frames arrive as the relay forwards them: the source's key in place of ours
            assert {src for src, _ in runs} == {a.public_key}
            assert b"".join(f for _, f in runs) == b"".join(encode_data(a.public_key, d) for d in datagrams)
            await a.close()
            await b.close()

    run(scenario())
