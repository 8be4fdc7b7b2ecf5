"""AWS IMDSv2 endpoint discovery against a small real HTTP server on 127.0.0.1.

The server implements the two requests the agent makes (token PUT, public-ipv4 GET with the
token) and records every request, so the tests can assert on what was (not) asked.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fixtures.wait import wait_for
from wirekube.agent import imds
from wirekube.agent.main import parse_args
from wirekube.models import Endpoint, EndpointDiscovery

TOKEN = "AQAEAFakeToken=="
PUBLIC = "3.120.0.7"


@dataclass
class FakeImds:
    """What the server answers; ``requests`` is every (method, path, headers) it saw."""

    token_status: int = 200
    ip_status: int = 200
    ip_body: str = PUBLIC
    stall: threading.Event | None = None
    """Set: the handler waits on it before answering (a metadata service that never answers)."""
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def fake() -> Iterator[FakeImds]:
    state = FakeImds()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            state.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            if state.stall is not None:
                state.stall.wait(10)

        def do_PUT(self) -> None:
            self._record()
            if self.path == "/latest/api/token" and self.headers.get(imds.TOKEN_TTL_HEADER):
                self._reply(state.token_status, TOKEN if state.token_status == 200 else "forbidden")
            else:
                self._reply(400, "missing ttl")

        def do_GET(self) -> None:
            self._record()
            if self.headers.get(imds.TOKEN_HEADER) != TOKEN:
                self._reply(401, "unauthorized")
            elif self.path == "/latest/meta-data/public-ipv4":
                self._reply(state.ip_status, state.ip_body if state.ip_status == 200 else "not found")
            else:
                self._reply(404, "not found")

        def _reply(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        if state.stall is not None:
            state.stall.set()
        server.shutdown()
        server.server_close()


def test_token_then_public_ipv4_with_the_token(fake: FakeImds) -> None:
    answer = imds.public_ipv4(fake.url, timeout=1.0)
    assert answer == imds.ImdsAnswer(imds.FOUND, ipaddress.IPv4Address(PUBLIC))
    (put, put_path, put_headers), (get, get_path, get_headers) = fake.requests
    assert (put, put_path) == ("PUT", "/latest/api/token")
    assert put_headers[imds.TOKEN_TTL_HEADER.lower()] == str(imds.TOKEN_TTL_SECONDS)
    assert (get, get_path) == ("GET", "/latest/meta-data/public-ipv4")
    assert get_headers[imds.TOKEN_HEADER.lower()] == TOKEN


def test_refused_token_is_not_followed_by_a_tokenless_imdsv1_get(fake: FakeImds) -> None:
    fake.token_status = 403
    answer = imds.public_ipv4(fake.url, timeout=1.0)
    assert answer.outcome == imds.REFUSED and "403" in answer.detail and answer.ip is None
    assert [m for m, _, _ in fake.requests] == ["PUT"], "IMDSv2 only: no GET without a token"


def test_no_public_ip_is_a_404(fake: FakeImds) -> None:
    fake.ip_status = 404
    answer = imds.public_ipv4(fake.url, timeout=1.0)
    assert answer.outcome == imds.NO_PUBLIC_IP and answer.ip is None


@pytest.mark.parametrize("body", ["10.0.3.4", "not-an-ip", "2600:1f18::1"])
def test_private_or_malformed_answers_are_not_used(fake: FakeImds, body: str) -> None:
    fake.ip_body = body
    answer = imds.public_ipv4(fake.url, timeout=1.0)
    assert answer.outcome == imds.INVALID and answer.ip is None, answer


def test_a_silent_metadata_service_times_out_quickly(fake: FakeImds) -> None:
    fake.stall = threading.Event()
    started = time.monotonic()
    answer = imds.public_ipv4(fake.url, timeout=0.3)
    elapsed = time.monotonic() - started
    assert answer.outcome == imds.UNREACHABLE and "timed out" in answer.detail, answer
    assert elapsed < 2.0, f"took {elapsed:.2f}s"


def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = imds.public_ipv4(f"http://127.0.0.1:{port}", timeout=0.5)
    assert answer.outcome == imds.UNREACHABLE and answer.ip is None


def test_base_url_must_be_plain_http() -> None:
    with pytest.raises(ValueError, match="http://"):
        imds.public_ipv4("https://169.254.169.254")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_cached_positive_and_negative(fake: FakeImds) -> None:
    clock = Clock()
    changes: list[object] = []
    d = imds.ImdsDiscovery(fake.url, timeout=1.0, clock=clock, on_change=lambda: changes.append(d.current()))
    assert d.current() == (None, None)
    assert d.refresh_if_due() is not None and d.lookups == 1
    assert d.current() == (Endpoint(ipaddress.IPv4Address(PUBLIC), 0), EndpointDiscovery.IMDS)
    assert len(changes) == 1
    clock.now += d.policy.found_ttl - 1
    assert d.refresh_if_due() is None and len(fake.requests) == 2, "fresh answer: no request"
    # The address goes away (404): cached as "no public IP" too.
    fake.ip_status = 404
    clock.now += 2
    assert d.refresh_if_due() == imds.ImdsAnswer(imds.NO_PUBLIC_IP, detail="the instance has no public IPv4 address")
    assert d.current() == (None, None) and len(changes) == 2
    requests = len(fake.requests)
    clock.now += d.policy.no_public_ip_ttl - 1
    assert d.refresh_if_due() is None and len(fake.requests) == requests


def test_unreachable_backs_off_and_keeps_a_known_address(fake: FakeImds) -> None:
    clock = Clock()
    answers = [imds.ImdsAnswer(imds.FOUND, ipaddress.IPv4Address(PUBLIC))] + [imds.ImdsAnswer(imds.UNREACHABLE)] * 10
    d = imds.ImdsDiscovery(fake.url, clock=clock, lookup=lambda url, timeout: answers.pop(0))
    d.refresh_if_due()
    delays = []
    for _ in range(9):
        clock.now += d.seconds_until_due()
        d.refresh_if_due()
        delays.append(d.seconds_until_due())
        assert d.current()[0] == Endpoint(ipaddress.IPv4Address(PUBLIC), 0), "a timeout does not forget the address"
    assert delays[:4] == [30.0, 60.0, 120.0, 240.0]
    assert delays[-1] == d.policy.unreachable_max


def test_a_node_off_aws_pays_once_then_waits(fake: FakeImds) -> None:
    clock = Clock()
    d = imds.ImdsDiscovery(fake.url, clock=clock, lookup=lambda url, timeout: imds.ImdsAnswer(imds.UNREACHABLE))
    d.refresh_if_due()
    for _ in range(100):  # a hundred reconcile loops within the back-off: no lookup
        clock.now += 0.25
        assert d.refresh_if_due() is None
    assert d.lookups == 1 and d.current() == (None, None)


def test_background_thread_finds_the_address_and_wakes(fake: FakeImds) -> None:
    woken = threading.Event()
    d = imds.ImdsDiscovery(fake.url, timeout=1.0, on_change=woken.set).start()
    try:
        wait_for(woken.is_set, 10, "the IMDS thread's first answer")
        assert d.current()[1] is EndpointDiscovery.IMDS
    finally:
        d.stop()
    assert d._thread is not None and not d._thread.is_alive()


def test_agent_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(imds.ENV_URL, raising=False)
    monkeypatch.delenv(imds.ENV_SWITCH, raising=False)
    assert parse_args(["--node-name", "n"]).imds_url == imds.DEFAULT_URL
    assert parse_args(["--node-name", "n", "--no-imds"]).imds_url == ""
    assert parse_args(["--node-name", "n", "--imds-url", "http://127.0.0.1:1"]).imds_url == "http://127.0.0.1:1"
    monkeypatch.setenv(imds.ENV_URL, "http://127.0.0.1:2")
    assert parse_args(["--node-name", "n"]).imds_url == "http://127.0.0.1:2"
    monkeypatch.setenv(imds.ENV_SWITCH, "off")
    assert parse_args(["--node-name", "n"]).imds_url == ""
