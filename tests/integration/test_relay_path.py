"""The agent's relay path (warm pool + loopback proxies) against the real relay on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import relay_settings, run, running_relay, wait_until
from wirekube.relay.auth import public_bytes
from wirekube.traversal.relaypath import RelayPath


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5.0)
    return s


async def recv(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, tuple[str, int]]:
    # uvloop has no sock_recvfrom: a blocking read (with the socket's timeout) in a thread.
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, sock.recvfrom, 65535), timeout)


def test_datagrams_cross_the_relay_both_ways_and_survive_a_relay_restart() -> None:
    async def scenario() -> None:
        wg_a, wg_b = udp_socket(), udp_socket()  # stand-ins for each node's WireGuard socket
        key_a, key_b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        async with running_relay() as relay:
            addr = relay.address
            assert addr is not None
            a = RelayPath(key_a, wg_a.getsockname()[1])
            b = RelayPath(key_b, wg_b.getsockname()[1])
            try:
                a.set_relays([addr])
                b.set_relays([addr])
                await wait_until(lambda: a.connected_relays() and b.connected_relays(), what="warm relays")
                port_a_for_b = await a.ensure_proxy(public_bytes(key_b))
                port_b_for_a = await b.ensure_proxy(public_bytes(key_a))
                # A's WireGuard sends to its endpoint for B (the proxy) -> arrives at B's WireGuard
                # from B's proxy for A, so WireGuard's roaming keeps the proxy as B's endpoint.
                for i in range(50):
                    wg_a.sendto(b"A->B %d" % i, ("127.0.0.1", port_a_for_b))
                got = {(await recv(wg_b))[0] for _ in range(50)}
                assert got == {b"A->B %d" % i for i in range(50)}
                wg_b.sendto(b"B->A", ("127.0.0.1", port_b_for_a))
                data, src = await recv(wg_a)
                assert data == b"B->A" and src == ("127.0.0.1", port_a_for_b)
                assert a.stats.to_relay_datagrams == 50 and b.stats.from_relay_datagrams == 50
            finally:
                await a.close()
                await b.close()
            wg_a.close()
            wg_b.close()

    run(scenario())


def test_relay_restart_reconnects_without_touching_proxies() -> None:
    async def scenario() -> None:
        wg_a, wg_b = udp_socket(), udp_socket()
        key_a, key_b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        async with running_relay() as relay:  # only to learn a free port
            addr = relay.address
            assert addr is not None

        async with running_relay(relay_settings(listen_port=addr[1])) as relay2:
            a = RelayPath(key_a, wg_a.getsockname()[1])
            b = RelayPath(key_b, wg_b.getsockname()[1])
            a.set_relays([addr])
            b.set_relays([addr])
            await wait_until(lambda: a.connected_relays() and b.connected_relays(), what="connected")
            port = await a.ensure_proxy(public_bytes(key_b))
            await b.ensure_proxy(public_bytes(key_a))
            await relay2.close("test restart")
        async with running_relay(relay_settings(listen_port=addr[1])):
            try:
                await wait_until(lambda: (a.stats.relay_reconnects >= 1 and a.connected_relays()
                                          and b.connected_relays()),
                                 timeout=15, what="reconnect after restart")
                assert a.proxy_ports()[public_bytes(key_b)] == port  # the WireGuard endpoint did not change
                wg_a.sendto(b"again", ("127.0.0.1", port))
                assert (await recv(wg_b))[0] == b"again"
            finally:
                await a.close()
                await b.close()
                wg_a.close()
                wg_b.close()

    run(scenario())


def test_eperm_recreates_the_socket_on_the_same_port() -> None:
    async def scenario() -> None:
        wg = udp_socket()
        path = RelayPath(X25519PrivateKey.generate(), wg.getsockname()[1], eperm_retry=0.05)
        try:
            peer = X25519PrivateKey.generate()
            port = await path.ensure_proxy(public_bytes(peer))
            proxy = path._proxies[public_bytes(peer)]
            old = proxy.sock
            proxy.on_eperm()  # what error_received does when the socket-LB hook refuses sendto
            proxy.on_eperm()
            await wait_until(lambda: path.stats.eperm_recoveries == 1, what="recreated")
            assert proxy.sock is not old and proxy.sock is not None and proxy.port == port
            assert path.stats.eperm_events == 2
            assert path.eperm_active() == []
        finally:
            await path.close()
            wg.close()

    run(scenario())
