"""NATProbe: the relay's two UDP probes, its target policy and its rate limit."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.integration.relay_support import (
    KEEPALIVE,
    LOCALHOST,
    NATPROBE,
    Collector,
    allow_loopback_targets,
    registered_spec_client,
    relay_settings,
    run,
    running_relay,
    wait_until,
)
from wirekube.relay.protocol import PROBE_FROM_ALTERNATE_PORT, PROBE_FROM_STUN_PORT, parse_nat_probe_datagram


async def udp_sink() -> tuple[asyncio.DatagramTransport, list[tuple[bytes, tuple[str, int]]]]:
    received: list[tuple[bytes, tuple[str, int]]] = []
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: Collector(received), local_addr=(LOCALHOST, 0)
    )
    return transport, received


def probe_body(port: int, address: str = LOCALHOST) -> bytes:
    return socket.inet_aton(address) + struct.pack(">H", port)


def test_production_policy_refuses_loopback_and_sends_nothing() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:  # the default, production policy
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.bind((LOCALHOST, 0))
            sink.setblocking(False)
            c, _ = await registered_spec_client(relay.address)
            c.send(NATPROBE, probe_body(sink.getsockname()[1]))
            c.send(KEEPALIVE)
            # Frames are handled in order, and a loopback sendto() has queued its datagram on the
            # receiving socket before it returns: once the Keepalive answer is here, a probe that
            # had been sent would already be readable.
            assert await c.read() == (KEEPALIVE, b"")
            assert relay.stats.nat_probes["refused_loopback"] == 1
            with pytest.raises(BlockingIOError, match="Resource temporarily unavailable"):
                sink.recvfrom(64)
            sink.close()

    run(scenario())


def test_probe_comes_from_the_stun_port_and_a_second_port() -> None:
    async def scenario() -> None:
        async with running_relay(relay_settings(probe_target_policy=allow_loopback_targets)) as relay:
            sink, received = await udp_sink()
            c, _ = await registered_spec_client(relay.address)
            body = probe_body(sink.get_extra_info("sockname")[1])
            c.send(NATPROBE, body)
            assert await c.read() == (NATPROBE, body)  # the confirmation
            await wait_until(lambda: len(received) == 2, what="both probes")
            by_kind = {parse_nat_probe_datagram(data): addr for data, addr in received}
            assert by_kind[PROBE_FROM_STUN_PORT] == relay.stun_address
            assert by_kind[PROBE_FROM_ALTERNATE_PORT] == relay.nat_probe_address
            assert relay.stun_address != relay.nat_probe_address
            sink.close()

    run(scenario())


def test_probes_are_rate_limited_per_connection() -> None:
    async def scenario() -> None:
        settings = relay_settings(probe_target_policy=allow_loopback_targets, nat_probe_rate=0.001, nat_probe_burst=2)
        async with running_relay(settings) as relay:
            sink, received = await udp_sink()
            body = probe_body(sink.get_extra_info("sockname")[1])
            first, _ = await registered_spec_client(relay.address)
            for _ in range(5):
                first.send(NATPROBE, body)
            first.send(KEEPALIVE)
            answers = []
            while (f := await first.read()) != (KEEPALIVE, b""):
                answers.append(f)
            assert answers == [(NATPROBE, body)] * 2
            assert relay.stats.nat_probes["sent"] == 2
            assert relay.stats.nat_probes["rate_limited"] == 3
            # another connection has its own allowance
            second, _ = await registered_spec_client(relay.address)
            second.send(NATPROBE, body)
            assert await second.read() == (NATPROBE, body)
            await wait_until(lambda: len(received) == 6, what="six probe datagrams")
            sink.close()

    run(scenario())
