"""Direct-path probes between two network namespaces whose WireGuard ports are held by others."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.fixtures.root import require_root
from wirekube.relay.auth import public_bytes
from wirekube.traversal import probe

pytestmark = pytest.mark.netns
PY = sys.executable


def test_codec_round_trip_and_mac() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa, pb = public_bytes(a), public_bytes(b)
    secret_ab = probe.shared_secret(a, pb)
    assert secret_ab == probe.shared_secret(b, pa)
    raw = probe.encode(probe.PING, pa, b"12345678", secret_ab)
    assert len(raw) == probe.LENGTH
    assert probe.decode(raw, lambda k: secret_ab if k == pa else None) == probe.Probe(probe.PING, pa, b"12345678")
    assert probe.decode(raw, lambda k: None) is None  # unknown sender
    forged = raw[:-1] + bytes([raw[-1] ^ 1])
    assert probe.decode(forged, lambda k: secret_ab) is None
    assert probe.decode(raw[:-2], lambda k: secret_ab) is None


def test_bpf_program_jumps_stay_inside() -> None:
    prog = probe.bpf_program(51820)
    for i, (code, jt, jf, _) in enumerate(prog):
        if code == 0x15:
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
    assert prog[-2][0] == prog[-1][0] == 0x06


LISTENER = textwrap.dedent("""
    import json, socket, sys, time
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from wirekube.traversal.probe import ProbeListener
    own = X25519PrivateKey.from_private_bytes(bytes.fromhex(sys.argv[1]))
    known = {bytes.fromhex(h) for h in sys.argv[2].split(",")}
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); held.bind(("0.0.0.0", 51820))  # "WireGuard"
    pub = bytes.fromhex(sys.argv[3])
    lst = ProbeListener(own, pub, 51820, known.__contains__).start()
    print("ready", flush=True)
    sys.stdin.readline()
    if len(sys.argv) > 4:
        print(json.dumps({"ok": lst.ping(bytes.fromhex(sys.argv[4]), sys.argv[5], 51820, timeout=2.0)}), flush=True)
        sys.stdin.readline()
    print(json.dumps({"answered": lst.pings_answered, "read": lst.packets_read}), flush=True)
    lst.close()
""")


class Pair:
    def __init__(self) -> None:
        self.prefix = f"wkpr{uuid.uuid4().hex[:6]}"
        self.a, self.b = f"{self.prefix}-a", f"{self.prefix}-b"

    def up(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", "va", "netns", self.a, "type", "veth", "peer", "name", "vb",
                        "netns", self.b], check=True)
        for ns, dev, addr in ((self.a, "va", "10.78.0.1/24"), (self.b, "vb", "10.78.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)

    def spawn(self, ns: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", LISTENER, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def down(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def pair() -> Iterator[Pair]:
    require_root()
    p = Pair()
    try:
        p.up()
        yield p
    finally:
        p.down()


def _send(proc: subprocess.Popen[str], line: str = "\n") -> dict:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line)
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_ping_pong_between_held_ports_and_filter_ignores_tunnel_traffic(pair: Pair) -> None:
    ka, kb, stranger = (X25519PrivateKey.generate() for _ in range(3))
    hexkey = lambda k: k.private_bytes_raw().hex()  # noqa: E731
    pa, pb, ps = (public_bytes(k).hex() for k in (ka, kb, stranger))
    b = pair.spawn(pair.b, hexkey(kb), pa, pb)  # B knows A only
    try:
        # 500 ordinary datagrams to B's WireGuard port must not reach the listener (BPF filter).
        subprocess.run(["ip", "netns", "exec", pair.a, PY, "-c",
                        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                        "[s.sendto(b'x'*100, ('10.78.0.2', 51820)) for _ in range(500)]"], check=True)
        a = pair.spawn(pair.a, hexkey(ka), pb, pa, pb, "10.78.0.2")
        assert _send(a) == {"ok": True}
        _send(a)
        a.wait(10)
        stranger_proc = pair.spawn(pair.a, hexkey(stranger), pb, ps, pb, "10.78.0.2")
        assert _send(stranger_proc) == {"ok": False}  # B does not answer keys it does not know
        _send(stranger_proc)
        stranger_proc.wait(10)
        stats = _send(b)
        assert stats["answered"] >= 1
        assert stats["read"] < 50  # the 500 plain datagrams were filtered in the kernel
    finally:
        for proc in (b,):
            proc.kill()
            proc.wait(5)
