"""The relay-path process (issue 16): relayed packets keep flowing while no agent is connected,
a new agent adopts the process's proxies on their old ports, hostile requests get one error
line, and ``stop`` ends it.  A real relay on 127.0.0.1, the real process (started as the agent
starts it), UDP sockets standing for each node's WireGuard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import run, running_relay, wait_until
from wirekube.agent import relayproc
from wirekube.agent.relayproc import PathConfig, RelayProcessError, RemoteRelayPath
from wirekube.relay.auth import public_bytes
from wirekube.traversal.relaypath import RelayPath


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def received(sock: socket.socket, count: int, timeout: float = 10.0) -> set[bytes]:
    """Up to ``count`` datagrams within ``timeout``."""
    got: set[bytes] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < count and loop.time() < deadline:
        try:
            got.add(sock.recv(2048))
        except BlockingIOError:
            await asyncio.sleep(0.01)
    return got


@pytest.fixture
def socket_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / relayproc.SOCKET_NAME
    yield path
    pid = relayproc.process_pid(path)
    if pid is not None:  # the test failed before stopping it: end the one we started, by its PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_relayed_packets_flow_with_no_agent_and_a_new_agent_adopts_the_ports(socket_file: Path) -> None:
    async def scenario() -> None:
        wg_a, wg_b = udp_socket(), udp_socket()
        key_a, key_b, key_c = (X25519PrivateKey.generate() for _ in range(3))
        async with running_relay() as relay:
            assert relay.address is not None
            spawn = relayproc.spawner(socket_file, socket_file.parent / "relaypath.log")
            config = PathConfig.of(key_a, wg_a.getsockname()[1])
            a = RemoteRelayPath(socket_file, config, spawn=spawn)
            b = RelayPath(key_b, wg_b.getsockname()[1])  # the other node: in-process
            b.set_relays([relay.address])
            a.set_relays([relay.address])
            port_b = await a.ensure_proxy(public_bytes(key_b))
            port_c = await a.ensure_proxy(public_bytes(key_c))  # a peer that will be gone
            port_a = await b.ensure_proxy(public_bytes(key_a))
            await wait_until(lambda: a.connected_relays() and b.connected_relays(), timeout=20,
                             what="both ends on the relay")
            pid = a.pid
            assert pid is not None and relayproc.process_pid(socket_file) == pid

            async def exchange(tag: str) -> None:
                for i in range(20):
                    wg_a.sendto(f"{tag} a->b {i}".encode(), ("127.0.0.1", port_b))
                    wg_b.sendto(f"{tag} b->a {i}".encode(), ("127.0.0.1", port_a))
                assert await received(wg_b, 20) == {f"{tag} a->b {i}".encode() for i in range(20)}, tag
                assert await received(wg_a, 20) == {f"{tag} b->a {i}".encode() for i in range(20)}, tag

            await exchange("with the agent")
            await a.close()  # the agent is gone (kill -9 looks the same to the process)
            await exchange("no agent")
            assert relayproc.process_pid(socket_file) == pid

            again = RemoteRelayPath(socket_file, config, spawn=spawn)
            again.set_relays([relay.address])
            assert await again.ensure_proxy(public_bytes(key_b)) == port_b, "a new agent keeps the old port"
            assert again.pid == pid and again.adopted == {public_bytes(key_b): port_b, public_bytes(key_c): port_c}
            await wait_until(lambda: bool(again.connected_relays()), what="state of the adopted process")
            await exchange("adopted")
            assert _proxies(socket_file) == 2  # nothing closed before the agent knows its peers
            # key_c's peer went away while the agent was down: its proxy goes once the agent's first
            # pass with a view of the mesh says which peers there are.
            again.retain([public_bytes(key_b)])
            await wait_until(lambda: _proxies(socket_file) == 1, timeout=10, what="the stale proxy closed")
            await exchange("after retain")
            await again.close()
            await b.close()
        assert relayproc.stop_process(socket_file)
        assert relayproc.process_pid(socket_file) is None and not socket_file.exists()
        wg_a.close()
        wg_b.close()

    run(scenario(), timeout=90)


def _proxies(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b'{"op": "state"}\n')
        return int(json.loads(s.makefile().readline())["proxies"])


def test_a_restarted_process_gets_everything_again_on_the_same_ports(socket_file: Path) -> None:
    async def scenario() -> None:
        wg = udp_socket()
        key, peer = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        async with running_relay() as relay:
            assert relay.address is not None
            a = RemoteRelayPath(socket_file, PathConfig.of(key, wg.getsockname()[1]),
                                spawn=relayproc.spawner(socket_file, None))
            a.set_relays([relay.address])
            port = await a.ensure_proxy(public_bytes(peer))
            first = a.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)  # the process we started, by its PID
            await wait_until(lambda: relayproc.process_pid(socket_file) not in (None, first), timeout=30,
                             what="a new process started by the agent side")
            await wait_until(lambda: bool(a.connected_relays()), timeout=20, what="the new process on the relay")
            assert a.pid != first and a.proxy_ports() == {public_bytes(peer): port}
            await a.close()
        assert relayproc.stop_process(socket_file)
        wg.close()

    run(scenario(), timeout=90)


def test_hostile_requests_get_one_error_line_and_the_process_keeps_serving(socket_file: Path) -> None:
    async def scenario() -> None:
        key = X25519PrivateKey.generate()
        a = RemoteRelayPath(socket_file, PathConfig.of(key, 51820), spawn=relayproc.spawner(socket_file, None))
        a.set_relays([])
        await wait_until(lambda: a.pid is not None, timeout=30, what="process started")
        reader, writer = await asyncio.open_unix_connection(str(socket_file), limit=relayproc.MAX_LINE * 2)
        answers = []
        for line in (b"not json\n", b"[1]\n", b'{"op": "launch"}\n', b'{"op": "ensure", "key": "short"}\n',
                     b'{"op": "configure", "config": {"private_key": "AAAA", "wireguard_port": 1}}\n',
                     b'{"op": "ensure", "key": "' + b"A" * 43 + b'=", "port": 70000}\n'):
            writer.write(line)
            answers.append(json.loads(await asyncio.wait_for(reader.readline(), 5)))
        assert [("error" in x) for x in answers] == [True] * 6, answers
        assert "unknown op 'launch'" in answers[2]["error"]
        assert "a key must be base64" in answers[3]["error"]
        assert "private_key must be 32 bytes" in answers[4]["error"]
        writer.write(b"x" * (relayproc.MAX_LINE + 10) + b"\n")
        assert "too long" in json.loads(await asyncio.wait_for(reader.readline(), 5))["error"]
        writer.close()
        # Still serving the agent, with its configuration intact.
        assert await a.ensure_proxy(b"\x01" * 32) > 0
        await a.close()
        orphan = RemoteRelayPath(socket_file.parent / "nobody.sock", PathConfig.of(key, 51820), spawn=None)
        with pytest.raises(RelayProcessError, match=r"No such file.*relaypath container"):
            await orphan.ensure_proxy(b"\x02" * 32)
        await orphan.close()
        assert relayproc.stop_process(socket_file)

    run(scenario(), timeout=60)


def test_only_the_same_uid_may_connect(socket_file: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to try another uid")

    async def scenario() -> None:
        a = RemoteRelayPath(socket_file, PathConfig.of(X25519PrivateKey.generate(), 51820),
                            spawn=relayproc.spawner(socket_file, None))
        a.set_relays([])
        await wait_until(lambda: a.pid is not None, timeout=30, what="process started")
        assert oct(socket_file.stat().st_mode & 0o777) == "0o600"
        await a.close()

    run(scenario(), timeout=60)
    pid = os.fork()
    if pid == 0:  # the child: another uid tries the socket
        code = 3
        try:
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(socket_file))
                code = 1  # connected: must not happen
        except PermissionError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "uid 65534 reached the relay-path socket"
    assert relayproc.stop_process(socket_file)
