"""The relay through a strict corporate proxy (issue 19), with real parts only.

Two network namespaces joined by a veth: ``inet`` holds the real ``wirekube-relay`` (raw TCP on
3478, WSS on 443 with a certificate from a CA made here) and a real squid on 3128 that allows
CONNECT to port 443 only, for one user with Basic auth; ``site`` can send nothing but TCP to the
proxy (nftables).  A node in the site (the agent's own relay path and proxy settings) must get
its datagrams to a raw-TCP client in ``inet`` and back: raw TCP fails (squid refuses CONNECT to
3478), so it falls back to WSS through the proxy, says so, and squid's access log shows the
tunnel.  A node with a wrong proxy password gets a clear error and the other node keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tests.fixtures.wait import wait_for
from wirekube.lab.certs import make_server_cert
from wirekube.lab.squid import SquidFiles, access_log_lines, squid_argv, squid_available, write_squid

REPO = Path(__file__).resolve().parents[2]
INET_IP, SITE_IP = "198.18.19.1", "198.18.19.2"
PROXY = f"{INET_IP}:3128"
PASSWORD = "corp-pass-7f3a"
WRONG = "not-the-password-91c2"

pytestmark = pytest.mark.root


def sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True, timeout=30)


@dataclass
class ProxyLab:
    tmp: Path
    inet: str
    site: str
    squid: SquidFiles
    ca: Path
    echo_key: X25519PrivateKey
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, netns: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / name).read_text(errors="replace")

    def site_node(self, credentials: str | None, name: str) -> subprocess.Popen[str]:
        key = X25519PrivateKey.generate()
        key_file = self.tmp / f"{name}.key"
        key_file.write_bytes(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        argv = [sys.executable, "-m", "tests.integration.relay_proxy_node", "site", "--relay", f"{INET_IP}:3478",
                "--wss", f"wss://{INET_IP}/relay", "--ca", str(self.ca), "--key-file", str(key_file),
                "--peer", raw_public(self.echo_key).hex(), "--timeout", "90"]
        if credentials is not None:
            creds = self.tmp / f"{name}.credentials"
            creds.write_text(credentials)
            argv += ["--credentials-file", str(creds)]
        env = {**os.environ, "HTTPS_PROXY": f"http://{PROXY}", "NO_PROXY": "localhost,127.0.0.1"}
        return subprocess.Popen(["ip", "netns", "exec", self.site, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def accepts(netns_pid: int, host: str, port: int) -> bool:
    """Whether something listens on host:port inside the namespace of ``netns_pid``."""
    out = subprocess.run(["nsenter", "-t", str(netns_pid), "-n", "ss", "-Hltn", f"sport = :{port}"],
                         capture_output=True, text=True, timeout=10).stdout
    return f"{host}:{port}" in out


@pytest.fixture(scope="module")
def lab() -> Iterator[ProxyLab]:
    why = squid_available()
    if why is not None:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    inet, site = f"wk19-{tag}-inet", f"wk19-{tag}-site"
    # squid drops to its own user: its files must be reachable, so not under pytest's 0700 tree
    tmp = Path(tempfile.mkdtemp(prefix=f"wk19-{tag}-"))
    tmp.chmod(0o755)
    for ns in (inet, site):
        sh("ip", "netns", "add", ns)
    lab = None
    try:
        sh("ip", "link", "add", f"wk19{tag}i", "netns", inet, "type", "veth", "peer", "name", f"wk19{tag}s",
           "netns", site)
        for ns, dev, ip in ((inet, f"wk19{tag}i", INET_IP), (site, f"wk19{tag}s", SITE_IP)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # the site lets out nothing but TCP to the proxy
        sh("ip", "netns", "exec", site, "nft", "-f", "-", stdin=f"""
table inet wk19 {{
  chain out {{
    type filter hook output priority 0; policy drop;
    oifname "lo" accept
    ct state established,related accept
    ip daddr {INET_IP} tcp dport 3128 accept
  }}
}}
""")
        cert = make_server_cert(tmp / "tls", ["relay.wk19.test"], [INET_IP])
        squid = write_squid(tmp / "squid", PROXY, {"alice": PASSWORD})
        lab = ProxyLab(tmp, inet, site, squid, cert.ca_file, X25519PrivateKey.generate())
        relay = lab.start(inet, [str(Path(sys.executable).with_name("wirekube-relay")), "--listen", f"{INET_IP}:3478",
                                 "--metrics-listen", "127.0.0.1:9319", "--wss-listen", f"{INET_IP}:443",
                                 "--wss-path", "/relay", "--tls-cert", str(cert.cert_file),
                                 "--tls-key", str(cert.key_file), "--log-format", "text"], "relay.log")
        proxy = lab.start(inet, squid_argv(squid), "squid.log")
        wait_for(lambda: accepts(relay.pid, INET_IP, 443) and accepts(relay.pid, INET_IP, 3478),
                 timeout=60, what="the relay's TCP and WSS listeners")
        wait_for(lambda: accepts(proxy.pid, INET_IP, 3128), timeout=60, what="squid listening")
        key_file = tmp / "echo.key"
        key_file.write_bytes(lab.echo_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        lab.start(inet, [sys.executable, "-m", "tests.integration.relay_proxy_node", "echo", "--relay",
                         f"{INET_IP}:3478", "--key-file", str(key_file)], "echo.log")
        wait_for(lambda: "registered" in lab.log("echo.log"), timeout=60, what="the echo client to register")
        yield lab
    finally:
        if lab is not None:
            for proc in reversed(lab.procs):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in lab.procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        for ns in (inet, site):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def finish(proc: subprocess.Popen[str]) -> tuple[dict[str, object], str]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"site node failed ({proc.returncode}): {err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1]), err


def test_raw_tcp_to_the_relay_is_blocked_in_the_site(lab: ProxyLab) -> None:
    """The premise: from the site, the relay's TCP port cannot be reached without the proxy."""
    probe = subprocess.run(["ip", "netns", "exec", lab.site, sys.executable, "-c",
                            "import socket; socket.create_connection(('198.18.19.1', 3478), timeout=2)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "timed out" in probe.stderr


def test_a_site_node_reaches_the_relay_over_wss_through_the_proxy_and_a_wrong_password_is_reported(
        lab: ProxyLab) -> None:
    good = lab.site_node(f"alice:{PASSWORD}", "good")
    bad = lab.site_node(f"alice:{WRONG}", "bad")
    (result, good_err), (failed, bad_err) = finish(good), finish(bad)

    assert result["transport"] == f"wss via proxy {PROXY}", result
    assert result["echoed"] == [f"echo:datagram {i}" for i in range(20)]
    # squid writes a tunnel's line when it closes (the node closed it on exit)
    wait_for(lambda: any(f"CONNECT {INET_IP}:443 alice" in line and "TCP_TUNNEL/200" in line
                         for line in access_log_lines(lab.squid)), timeout=30, what="squid to log the tunnel")
    lines = access_log_lines(lab.squid)
    assert any(f"CONNECT {INET_IP}:3478" in line and "TCP_DENIED/403" in line for line in lines), lines
    assert any(f"CONNECT {INET_IP}:443" in line and "TCP_DENIED/407" in line for line in lines), lines

    reason, message = failed["problem"]  # type: ignore[misc]
    assert reason == "ProxyAuthenticationFailed"
    assert f"wss://{INET_IP}:443/relay: proxy {PROXY} refused the proxy credentials" in message
    assert "407 Proxy Authentication Required" in message
    assert f"tcp://{INET_IP}:3478: proxy {PROXY} refused CONNECT" in message
    assert "echoed" not in failed
    for text in (json.dumps(failed), bad_err, json.dumps(result), good_err, lab.log("relay.log")):
        assert WRONG not in text and PASSWORD not in text
    assert "refused the proxy credentials" in bad_err  # the log line, as the agent writes it

    # nothing else broke: the echo client is still registered and a good node still gets through
    assert "registered" in lab.log("echo.log") and lab.procs[-1].poll() is None
    again, _ = finish(lab.site_node(f"alice:{PASSWORD}", "again"))
    assert again["transport"] == f"wss via proxy {PROXY}" and len(again["echoed"]) == 20  # type: ignore[arg-type]
