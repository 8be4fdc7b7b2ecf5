"""Registration with proof of ownership, and what the relay does with clients that break rules."""

from __future__ import annotations

import asyncio
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import (
    AUTH,
    CHALLENGE,
    DATA,
    ERROR,
    KEEPALIVE,
    REGISTER,
    REGISTERED,
    RELAYPROBE,
    SpecClient,
    frame,
    raw_public,
    registered_spec_client,
    relay_settings,
    run,
    running_relay,
    stalled_spec_client,
    wait_until,
)
from wirekube.relay.authz import PeerAuthorizer


def test_spec_client_registers_and_exchanges_data() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            a, key_a = await registered_spec_client(relay.address)
            b, key_b = await registered_spec_client(relay.address)
            a.send(DATA, key_b + b"wireguard ciphertext")
            assert await b.read() == (DATA, key_a + b"wireguard ciphertext")
            b.send(DATA, key_a + b"reply")
            assert await a.read() == (DATA, key_b + b"reply")
            assert relay.stats.registrations["ok"] == 2
            assert relay.stats.frames_forwarded == 2

    run(scenario())


def test_challenge_is_fresh_per_connection() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            key = raw_public(X25519PrivateKey.generate())
            challenges = []
            for _ in range(2):
                c = await SpecClient.open(relay.address)
                c.send(REGISTER, key)
                got = await c.read()
                assert got is not None and got[0] == CHALLENGE and len(got[1]) == 48
                challenges.append(got[1])
                await c.close()
            assert challenges[0][:32] != challenges[1][:32]
            assert challenges[0][32:] != challenges[1][32:]

    run(scenario())


def test_impostor_never_registers_and_never_sees_the_victims_data() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            victim, victim_key = await registered_spec_client(relay.address)
            sender, sender_key = await registered_spec_client(relay.address)

            impostor = await SpecClient.open(relay.address)
            answer = await impostor.register(X25519PrivateKey.generate(), claimed=victim_key)
            assert answer is not None and answer[0] == ERROR
            rest = await impostor.read_until_closed()
            assert all(ftype != REGISTERED and ftype != DATA for ftype, _ in rest)
            assert relay.stats.registrations["bad_proof"] == 1

            # the victim's binding is untouched: Data for it still reaches the victim
            sender.send(DATA, victim_key + b"for the victim only")
            assert await victim.read() == (DATA, sender_key + b"for the victim only")

    run(scenario())


def test_auth_replayed_from_another_connection_fails() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            owner_key = X25519PrivateKey.generate()
            p = raw_public(owner_key)
            owner = await SpecClient.open(relay.address)
            owner.send(REGISTER, p)
            seen = await owner.read()
            assert seen is not None and seen[0] == CHALLENGE
            observed_auth = SpecClient.proof(owner_key, seen[1], p)  # what an eavesdropper saw

            attacker = await SpecClient.open(relay.address)
            attacker.send(REGISTER, p)
            fresh = await attacker.read()
            assert fresh is not None and fresh[0] == CHALLENGE
            attacker.send(AUTH, observed_auth)
            answer = await attacker.read()
            assert answer is not None and answer[0] == ERROR
            assert await attacker.read() is None
            assert p not in relay.routes
            assert relay.stats.registrations["bad_proof"] == 1

    run(scenario())


def test_data_before_registered_is_refused() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            _, target = await registered_spec_client(relay.address)
            for prelude in ([], [REGISTER]):
                c = await SpecClient.open(relay.address)
                if prelude:
                    c.send(REGISTER, raw_public(X25519PrivateKey.generate()))
                    assert (await c.read() or (0,))[0] == CHALLENGE
                c.send(DATA, target + b"sneaky")
                frames = await c.read_until_closed()
                assert [f[0] for f in frames] == [ERROR]
            assert relay.stats.registrations["unexpected_frame"] == 2
            assert relay.stats.frames_forwarded == 0

    run(scenario())


def test_oversized_zero_and_unknown_frames_get_an_error_and_a_close() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            a, _ = await registered_spec_client(relay.address)
            bad_headers = [
                struct.pack(">IB", 65537, DATA),
                struct.pack(">IB", 0, DATA),
                struct.pack(">IB", 1, 0x42),
            ]
            for header in bad_headers:
                c = await SpecClient.open(relay.address)
                c.send_raw(header)  # the header alone is enough to refuse an oversized frame
                frames = await c.read_until_closed()
                assert len(frames) == 1 and frames[0][0] == ERROR and frames[0][1]
            # a registered connection is held to the same rules
            a.send_raw(struct.pack(">IB", 70000, DATA))
            frames = await a.read_until_closed()
            assert [f[0] for f in frames] == [ERROR]
            assert relay.stats.protocol_errors["oversized"] == 2
            assert relay.stats.protocol_errors["zero_length"] == 1
            assert relay.stats.protocol_errors["unknown_type"] == 1

    run(scenario())


def test_garbage_is_refused() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            c = await SpecClient.open(relay.address)
            c.send_raw(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            frames = await c.read_until_closed()
            assert [f[0] for f in frames] == [ERROR]
            assert sum(relay.stats.protocol_errors.values()) == 1

    run(scenario())


def test_half_open_connections_are_dropped_after_the_handshake_timeout() -> None:
    async def scenario() -> None:
        async with running_relay(relay_settings(handshake_timeout=0.3)) as relay:
            silent = await SpecClient.open(relay.address)
            partial = await SpecClient.open(relay.address)
            partial.send_raw(b"\x00\x00\x00\x21\x01" + b"k" * 10)  # a Register cut short
            waiting = await SpecClient.open(relay.address)
            waiting.send(REGISTER, raw_public(X25519PrivateKey.generate()))  # never answers
            for c in (silent, partial, waiting):
                frames = await c.read_until_closed(timeout=5.0)
                assert frames and frames[-1][0] == ERROR
            assert relay.stats.registrations["timeout"] == 3
            await wait_until(lambda: not relay.connections, what="connections to go")

    run(scenario())


def test_a_proven_reregistration_replaces_the_old_connection() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            key = X25519PrivateKey.generate()
            old = await SpecClient.open(relay.address)
            assert await old.register(key) == (REGISTERED, b"")
            new = await SpecClient.open(relay.address)
            assert await new.register(key) == (REGISTERED, b"")
            frames = await old.read_until_closed()
            assert [f[0] for f in frames] == [ERROR]
            sender, sender_key = await registered_spec_client(relay.address)
            sender.send(DATA, raw_public(key) + b"to the newest")
            assert await new.read() == (DATA, sender_key + b"to the newest")
            assert relay.stats.disconnects["replaced"] == 1

    run(scenario())


def test_keepalive_and_relay_probe_are_answered() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            c, _ = await registered_spec_client(relay.address)
            c.send(KEEPALIVE)
            assert await c.read() == (KEEPALIVE, b"")
            c.send(RELAYPROBE, b"12345678")
            assert await c.read() == (RELAYPROBE, b"12345678")
            assert relay.stats.keepalives == 1 and relay.stats.relay_probes == 1

    run(scenario())


def test_register_after_registered_is_a_protocol_error() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            key = X25519PrivateKey.generate()
            c, _ = await registered_spec_client(relay.address)
            c.send(REGISTER, raw_public(key))
            assert [f[0] for f in await c.read_until_closed()] == [ERROR]

    run(scenario())


def test_data_for_an_unknown_destination_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            a, _ = await registered_spec_client(relay.address)
            a.send(DATA, b"\x07" * 32 + b"nobody home")
            a.send(KEEPALIVE)
            assert await a.read() == (KEEPALIVE, b"")  # the connection survives
            assert relay.stats.frames_dropped["unknown_destination"] == 1

    run(scenario())


def test_idle_registered_connections_are_closed() -> None:
    async def scenario() -> None:
        async with running_relay(relay_settings(idle_timeout=1.0)) as relay:  # 10x the keepalive period
            idle, _ = await registered_spec_client(relay.address)
            alive, _ = await registered_spec_client(relay.address)

            async def keep_alive() -> None:
                while True:
                    alive.send(KEEPALIVE)
                    await asyncio.sleep(0.1)

            task = asyncio.ensure_future(keep_alive())
            frames = await idle.read_until_closed(timeout=5.0)
            assert frames and frames[-1][0] == ERROR
            assert relay.stats.disconnects["idle"] == 1
            assert len(relay.routes) == 1  # the one sending keepalives stays
            task.cancel()

    run(scenario())


def test_authorizer_admits_listed_keys_and_disconnects_removed_ones() -> None:
    async def scenario() -> None:
        allowed = X25519PrivateKey.generate()
        stranger = X25519PrivateKey.generate()
        authorizer = PeerAuthorizer()
        async with running_relay(authorizer=authorizer) as relay:
            early = await SpecClient.open(relay.address)
            answer = await early.register(allowed)
            assert answer is not None and answer[0] == ERROR  # not synced yet: nobody gets in
            assert relay.stats.registrations["authorizer_not_ready"] == 1

            authorizer.replace([raw_public(allowed)])
            ok = await SpecClient.open(relay.address)
            assert await ok.register(allowed) == (REGISTERED, b"")
            refused = await SpecClient.open(relay.address)
            answer = await refused.register(stranger)
            assert answer is not None and answer[0] == ERROR
            assert relay.stats.registrations["unauthorized"] == 1

            authorizer.replace([])
            frames = await ok.read_until_closed()
            assert [f[0] for f in frames] == [ERROR]
            assert relay.stats.disconnects["revoked"] == 1
            assert not relay.routes

    run(scenario())


def test_a_client_that_never_reads_its_replies_cannot_grow_the_relay() -> None:
    async def scenario() -> None:
        limit = 16 * 1024
        async with running_relay(relay_settings(queue_limit_bytes=limit)) as relay:
            c, key = await stalled_spec_client(relay.address)
            conn = relay.routes[key]
            sent = 0
            # Keep sending until the kernel's buffers are full and the relay has to refuse
            # replies; 100 batches (26 MB of replies) is far beyond any socket buffer.
            while relay.stats.frames_dropped["reply_queue_full"] == 0:
                assert sent < 100 * 20_000, "the relay never refused a reply"
                c.send_raw(frame(RELAYPROBE, b"12345678") * 20_000)  # 20,000 RelayProbes per write
                sent += 20_000
                await c.writer.drain()
                await wait_until(lambda: relay.stats.relay_probes == sent, what="the batch to be read")
                assert conn._queued_bytes() <= limit
            assert conn._queued_bytes() <= limit

    run(scenario())
