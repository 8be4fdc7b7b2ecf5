"""The relay's STUN responder, checked with an independent client (coturn's turnutils_stunclient)."""

from __future__ import annotations

import asyncio
import re

from tests.integration.relay_support import LOCALHOST, run, running_relay, stunclient


def test_turnutils_stunclient_gets_its_reflexive_address() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            assert relay.stun_address is not None
            code, out = await stunclient(relay.stun_address[1])
            assert code == 0, out
            mapped = re.findall(r"UDP reflexive addr: (\S+):(\d+)", out)
            assert mapped and mapped[0][0] == LOCALHOST and 0 < int(mapped[0][1]) < 65536, out
            assert relay.stats.stun["ok"] >= 1

    run(scenario())


def test_stun_noise_does_not_disturb_the_responder() -> None:
    async def scenario() -> None:
        async with running_relay() as relay:
            assert relay.stun_address is not None
            loop = asyncio.get_running_loop()
            noise, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=relay.stun_address)
            for payload in (b"", b"\x00", b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"x" * 12, b"GET /" * 50):
                noise.sendto(payload)
            noise.close()
            code, out = await stunclient(relay.stun_address[1])
            assert code == 0 and "UDP reflexive addr" in out, out
            assert relay.stats.stun["not_stun"] >= 2

    run(scenario())
