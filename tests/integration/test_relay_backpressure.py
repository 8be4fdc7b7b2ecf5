"""Pushback: a sender whose frames all go to congested peers is held (not read) until one of them
drains or ``backpressure_hold`` passes; a sender with any uncongested peer never is."""

from __future__ import annotations

import asyncio
import struct
from typing import cast

from tests.integration.relay_support import (
    DATA,
    registered_spec_client,
    relay_settings,
    run,
    running_relay,
    stalled_spec_client,
    wait_until,
)


def numbered(seq: int, size: int = 1400) -> bytes:
    return struct.pack(">I", seq) + bytes([seq % 251]) * (size - 4)


def test_a_sender_feeding_only_a_stalled_peer_is_held_but_still_read_every_hold_period() -> None:
    limit = 256 * 1024

    async def scenario() -> None:
        settings = relay_settings(queue_limit_bytes=limit, backpressure_hold=0.05)
        async with running_relay(settings) as relay:
            stalled, stalled_key = await stalled_spec_client(relay.address)
            flooder, flooder_key = await registered_spec_client(relay.address)
            flooder_conn = relay.routes[flooder_key]
            count = 8000  # ~11 MB: more than the kernel buffers towards the stalled peer take
            for seq in range(count):
                flooder.send(DATA, stalled_key + numbered(seq))
            await wait_until(lambda: relay.stats.backpressure_holds >= 3, timeout=30,
                             what="the flooder held, again and again")
            # held, yet read again after each hold period: what the peer cannot take is dropped
            await wait_until(lambda: relay.stats.frames_forwarded + relay.stats.frames_dropped["queue_full"] == count,
                             timeout=30, what="every frame forwarded or dropped")
            assert relay.stats.frames_dropped["queue_full"] > 0
            assert relay.routes[stalled_key]._queued_bytes() <= limit
            await flooder.close()
            await wait_until(lambda: flooder_key not in relay.routes, what="the flooder gone")
            assert flooder_conn._hold_timer is None and not relay.routes[stalled_key]._held_senders
            await stalled.close()

    run(scenario(), timeout=90)


def test_a_sender_with_traffic_for_a_healthy_peer_is_never_held() -> None:
    async def scenario() -> None:
        settings = relay_settings(queue_limit_bytes=64 * 1024, backpressure_hold=30.0)
        async with running_relay(settings) as relay:
            stalled, stalled_key = await stalled_spec_client(relay.address)
            healthy, healthy_key = await registered_spec_client(relay.address)
            sender, sender_key = await registered_spec_client(relay.address)
            count = 2000

            async def send() -> None:
                for seq in range(count):  # each burst feeds both peers
                    sender.send(DATA, stalled_key + numbered(seq))
                    sender.send(DATA, healthy_key + numbered(seq, 200))
                    if seq % 32 == 0:
                        await sender.writer.drain()

            async def receive() -> None:
                for seq in range(count):
                    assert await healthy.read(timeout=10.0) == (DATA, sender_key + numbered(seq, 200))

            # a 30 s hold would make this time out: the healthy peer's frames must keep flowing
            await asyncio.wait_for(asyncio.gather(send(), receive()), 20)
            assert relay.stats.frames_dropped["queue_full"] > 0  # the stalled peer did lose frames
            assert relay.stats.backpressure_holds == 0
            await stalled.close()

    run(scenario())


def test_a_held_sender_is_read_again_as_soon_as_the_peer_drains() -> None:
    async def scenario() -> None:
        # a hold far longer than the test's deadline: only the drain can release the sender
        settings = relay_settings(queue_limit_bytes=256 * 1024, backpressure_hold=600.0)
        async with running_relay(settings) as relay:
            slow, _ = await stalled_spec_client(relay.address)
            slow_key = next(k for k, c in relay.routes.items())
            sender, sender_key = await registered_spec_client(relay.address)
            count = 6000  # ~8 MB
            for seq in range(count):
                sender.send(DATA, slow_key + numbered(seq))
            await wait_until(lambda: relay.stats.backpressure_holds >= 1, timeout=30, what="the sender held")
            def handled() -> bool:
                return relay.stats.frames_forwarded + relay.stats.frames_dropped["queue_full"] == count

            seqs: list[int] = []

            async def read_all() -> None:  # what was not dropped arrives, whole and in order
                while not (handled() and len(seqs) == relay.stats.frames_forwarded):
                    got = await slow.read(timeout=10.0)
                    assert got is not None and got[0] == DATA and got[1][:32] == sender_key
                    seq = struct.unpack(">I", got[1][32:36])[0]
                    assert got[1][32:] == numbered(seq) and (not seqs or seq > seqs[-1])
                    seqs.append(seq)

            cast(asyncio.ReadTransport, slow.writer.transport).resume_reading()  # the slow peer reads again
            await asyncio.wait_for(read_all(), 30)
            assert relay.routes[sender_key]._hold_timer is None

    run(scenario(), timeout=90)


def test_no_hold_when_pushback_is_off() -> None:
    async def scenario() -> None:
        settings = relay_settings(queue_limit_bytes=64 * 1024, backpressure_hold=0.0)
        async with running_relay(settings) as relay:
            stalled, stalled_key = await stalled_spec_client(relay.address)
            flooder, _ = await registered_spec_client(relay.address)
            for seq in range(2000):
                flooder.send(DATA, stalled_key + numbered(seq))
            await wait_until(lambda: relay.stats.frames_forwarded + relay.stats.frames_dropped["queue_full"] == 2000,
                             what="every frame forwarded or dropped")
            assert relay.stats.backpressure_holds == 0 and relay.stats.frames_dropped["queue_full"] > 1000
            await stalled.close()

    run(scenario())
