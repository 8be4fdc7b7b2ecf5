"""One end of the proxy test (``test_relay_proxy.py``), run inside a network namespace:

    python -m tests.integration.relay_proxy_node echo --relay HOST:PORT --key-file F
        a raw-TCP relay client that sends every datagram back to its source, prefixed b"echo:";
        prints "registered" once it is.
    python -m tests.integration.relay_proxy_node site --relay HOST:PORT --wss URL --ca F --key-file F
            --peer HEX [--credentials-file F] [--timeout S]
        the agent's relay path (RelayPath) with the agent's proxy settings (HTTPS_PROXY/NO_PROXY
        from the environment, credentials from the file, as ``wirekube-agent`` builds them): waits
        until a relay connection is up (or every address failed), then sends datagrams to the peer
        through it and waits for their echo; prints one JSON line with what happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time

import uvloop
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from wirekube.agent.main import relay_proxy_config
from wirekube.relay.client import RelayClient
from wirekube.relay.url import RelayURL
from wirekube.traversal.relaypath import RelayPath


def _key(path: str) -> X25519PrivateKey:
    with open(path, "rb") as f:
        return X25519PrivateKey.from_private_bytes(f.read())


async def echo(args: argparse.Namespace) -> None:
    url = RelayURL.parse(args.relay)
    holder: list[RelayClient] = []
    client = await RelayClient.connect_url(url, _key(args.key_file),
                                           on_data=lambda src, d: holder[0].send(src, b"echo:" + d))
    holder.append(client)
    print("registered", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    closed = asyncio.ensure_future(client.wait_closed())
    await asyncio.wait({closed, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    await client.close()


async def site(args: argparse.Namespace) -> dict[str, object]:
    proxy = relay_proxy_config(os.environ, args.credentials_file)
    wireguard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wireguard.bind(("127.0.0.1", 0))
    wireguard.setblocking(False)
    path = RelayPath(_key(args.key_file), wireguard.getsockname()[1], proxy=proxy, ca_file=args.ca)
    result: dict[str, object] = {}
    try:
        path.set_relays([RelayURL.parse(args.relay)], [RelayURL.parse(args.wss)])
        peer = bytes.fromhex(args.peer)
        port = await path.ensure_proxy(peer)
        deadline = time.monotonic() + args.timeout
        while not path.connected_relays() and time.monotonic() < deadline:
            if path.problem() is not None:
                break
            await asyncio.sleep(0.05)
        result["transport"] = path.transport()
        result["problem"] = path.problem()
        if path.connected_relays():
            loop = asyncio.get_running_loop()
            echoed = []
            for i in range(20):
                wireguard.sendto(f"datagram {i}".encode(), ("127.0.0.1", port))
                try:
                    data = await asyncio.wait_for(loop.sock_recv(wireguard, 2048), 5)
                except TimeoutError:
                    continue
                echoed.append(data.decode())
            result["echoed"] = echoed
    finally:
        await path.close()
        wireguard.close()
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["echo", "site"])
    p.add_argument("--relay", required=True)
    p.add_argument("--wss", default="")
    p.add_argument("--ca", default=None)
    p.add_argument("--key-file", required=True)
    p.add_argument("--peer", default="")
    p.add_argument("--credentials-file", default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    if args.mode == "echo":
        uvloop.run(echo(args))
        return 0
    print(json.dumps(uvloop.run(site(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
