"""Forwarding under load and abuse: integrity, malformed floods, stalled readers."""

from __future__ import annotations

import asyncio
import random
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import (
    AUTH,
    DATA,
    ERROR,
    REGISTER,
    SpecClient,
    collect,
    frame,
    numbered,
    pump,
    registered_spec_client,
    relay_settings,
    run,
    running_relay,
    stalled_spec_client,
    steady_pair,
    wait_until,
)
from wirekube.relay.client import RelayClient


def test_many_frames_of_mixed_sizes_arrive_intact_and_in_order() -> None:
    sizes = [1, 33, 100, 1400, 1, 9000, 60000, 2]

    async def scenario() -> None:
        # A queue cap far above what is in flight: nothing may be dropped, so all must arrive.
        async with running_relay(relay_settings(queue_limit_bytes=256 << 20)) as relay:
            pairs = []
            for _ in range(3):
                a, ka = await registered_spec_client(relay.address)
                b, kb = await registered_spec_client(relay.address)
                pairs.append((a, ka, b, kb))
            count = 1500
            await asyncio.gather(
                *(pump(a, kb, count, sizes) for a, _, _, kb in pairs),
                *(pump(b, ka, count, sizes[::-1]) for _, ka, b, _ in pairs),
                *(collect(b, ka, count, sizes) for _, ka, b, _ in pairs),
                *(collect(a, kb, count, sizes[::-1]) for a, _, _, kb in pairs),
            )
            assert relay.stats.frames_forwarded == 6 * count
            assert not relay.stats.frames_dropped

    run(scenario())


def test_frames_dropped_at_the_cap_leave_the_rest_intact_and_in_order() -> None:
    """A slow reader loses whole frames, never parts of them, and never gets them reordered."""
    size, count = 20_000, 600

    async def scenario() -> None:
        async with running_relay(relay_settings(queue_limit_bytes=100_000)) as relay:
            a, ka = await registered_spec_client(relay.address)
            b, kb = await registered_spec_client(relay.address)
            await pump(a, kb, count, [size])
            await wait_until(
                lambda: relay.stats.frames_forwarded + relay.stats.frames_dropped["queue_full"] == count,
                what="every frame forwarded or dropped",
            )
            forwarded = relay.stats.frames_forwarded
            seqs = []
            for _ in range(forwarded):
                got = await b.read()
                assert got is not None and got[0] == DATA and got[1][:32] == ka
                seq = struct.unpack(">I", got[1][32:36])[0]
                assert got[1][32:] == numbered(seq, size)
                seqs.append(seq)
            assert seqs == sorted(set(seqs))
            assert relay.stats.frames_dropped["queue_full"] > 0

    run(scenario())


def malformed_frames(count: int, rng: random.Random) -> bytes:
    kinds = [
        lambda: struct.pack(">IB", 0, DATA),
        lambda: struct.pack(">IB", 65537 + rng.randrange(1 << 20), DATA),
        lambda: frame(0x42, b"x"),
        lambda: frame(REGISTER, b"k" * rng.randrange(31)),
        lambda: frame(AUTH, b"m" * 5),
        lambda: frame(DATA, b"short"),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))),
    ]
    return b"".join(rng.choice(kinds)() for _ in range(count))


def test_ten_thousand_malformed_frames_leave_the_relay_and_other_pairs_running() -> None:
    async def scenario() -> None:
        rng = random.Random(3)
        async with running_relay(relay_settings(handshake_timeout=1.0)) as relay:
            flow = asyncio.ensure_future(steady_pair(relay.address, 4000))

            # one connection, registered, then 10,000 malformed frames in one burst
            abuser, _ = await registered_spec_client(relay.address)
            abuser.send_raw(malformed_frames(10_000, rng))
            closing = await abuser.read_until_closed()
            assert [f[0] for f in closing] == [ERROR]

            # and 10,000 more spread over fresh, unregistered connections (a server-level fuzz)
            for _ in range(100):
                c = await SpecClient.open(relay.address)
                c.send_raw(malformed_frames(100, rng))
                await c.read_until_closed()
                await c.close()

            assert await flow == 4000
            assert sum(relay.stats.protocol_errors.values()) + relay.stats.registrations["timeout"] >= 101
            # the relay still takes new clients
            late, _ = await registered_spec_client(relay.address)
            await late.close()

    run(scenario(), timeout=90)


def test_stalled_reader_loses_its_own_packets_and_stays_within_its_queue_cap() -> None:
    limit = 64 * 1024

    async def scenario() -> None:
        async with running_relay(relay_settings(queue_limit_bytes=limit)) as relay:
            stalled, stalled_key = await stalled_spec_client(relay.address)
            stalled_conn = relay.routes[stalled_key]

            worst = 0
            sampling = True

            async def sample() -> None:
                nonlocal worst
                while sampling:
                    worst = max(worst, stalled_conn._queued_bytes())
                    await asyncio.sleep(0)

            sampler = asyncio.ensure_future(sample())
            flooder, _ = await registered_spec_client(relay.address)
            flood = asyncio.ensure_future(pump(flooder, stalled_key, 20_000, [1400]))  # ~29 MB
            assert await steady_pair(relay.address, 3000) == 3000  # others keep flowing
            await flood
            await wait_until(lambda: relay.stats.frames_forwarded + relay.stats.frames_dropped["queue_full"] == 23_000,
                             what="the flood to be handled")
            sampling = False
            await sampler

            assert relay.stats.frames_dropped["queue_full"] > 10_000
            assert 0 < worst <= limit
            assert stalled_conn._queued_bytes() <= limit
            await stalled.close()

    run(scenario(), timeout=90)


def test_client_api_with_a_stalled_peer_does_not_block_the_sender() -> None:
    async def scenario() -> None:
        async with running_relay(relay_settings(queue_limit_bytes=32 * 1024)) as relay:
            got: list[bytes] = []
            receiver = await RelayClient.connect(*relay.address, X25519PrivateKey.generate(),
                                                 on_data=lambda src, d: got.append(d))
            sender = await RelayClient.connect(*relay.address, X25519PrivateKey.generate())
            sender.send_many(receiver.public_key, [b"%d" % i for i in range(100)])
            await wait_until(lambda: len(got) == 100, what="100 datagrams")
            assert got == [b"%d" % i for i in range(100)]
            await sender.close()
            await receiver.close()

    run(scenario())
