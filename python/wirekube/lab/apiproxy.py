"""The lab's management path: the API server on each node's own loopback.

The real kube-apiserver listens on the host's 127.0.0.1. A node of the lab is a network
namespace, which cannot reach the host's loopback, and the API path must never cross
``wire_kube`` (the agent would lose the API through its own tunnel). So this forwarder opens,
*inside each node's network namespace*, a listening socket on 127.0.0.1:6443, and relays every
connection to the API server in the host namespace. A socket belongs to the namespace it was
created in, so one process serves every node: a thread enters the namespace (setns) only to
create the listener. TLS passes through untouched (the serving certificate carries 127.0.0.1).

    python -m wirekube.lab.apiproxy --target 127.0.0.1:PORT [--listen 127.0.0.1:6443] NETNS...

It prints "ready" once every listener is open, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in_netns(netns: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket created inside ``netns`` (usable from any thread afterwards)."""
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            with open(os.path.join(NETNS_DIR, netns), "rb") as f:
                _setns(f.fileno())  # only this short-lived thread changes namespace
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(128)
            s.setblocking(False)
            result.append(s)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result.append(e)

    t = threading.Thread(target=work, name=f"netns-{netns}")
    t.start()
    t.join()
    out = result[0]
    if isinstance(out, BaseException):
        raise OSError(f"cannot listen on {host}:{port} in netns {netns}: {out}") from out
    return out


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(target: tuple[str, int], listeners: Sequence[socket.socket]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    servers = [await asyncio.start_server(handle, sock=s) for s in listeners]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for srv in servers:
        srv.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port of the API server in this namespace")
    parser.add_argument("--listen", default="127.0.0.1:6443", help="address inside each namespace")
    parser.add_argument("netns", nargs="+")
    args = parser.parse_args(argv)
    thost, _, tport = args.target.rpartition(":")
    lhost, _, lport = args.listen.rpartition(":")
    listeners = [listen_in_netns(ns, lhost, int(lport)) for ns in args.netns]
    asyncio.run(serve((thost, int(tport)), listeners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
