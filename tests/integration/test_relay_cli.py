"""``wirekube-relay`` as a process: listening, STUN, metrics, SIGTERM; and --authorize-peers wiring."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.integration.relay_support import (
    LOCALHOST,
    RelayCli,
    http_get,
    pump,
    raw_public,
    registered_spec_client,
    run,
    stalled_spec_client,
    steady_pair,
    stunclient,
    wait_until,
)
from wirekube import k8s
from wirekube.relay.authz import PeerAuthorizer
from wirekube.relay.cli import parse_hostport, watch_peers
from wirekube.relay.client import RelayClient
from wirekube.relay.metrics import metric_value


def test_relay_process_serves_clients_stun_and_metrics_and_stops_on_sigterm() -> None:
    relay = RelayCli()
    try:
        tcp, stun, metrics = relay.address("tcp"), relay.address("stun"), relay.address("metrics")

        async def scenario() -> str:
            a = await RelayClient.connect(*tcp, X25519PrivateKey.generate())
            got: list[bytes] = []
            b = await RelayClient.connect(*tcp, X25519PrivateKey.generate(), on_data=lambda s, d: got.append(d))
            a.send(b.public_key, b"through the real process")
            await wait_until(lambda: got == [b"through the real process"], what="the datagram")

            code, out = await stunclient(stun[1])
            assert code == 0 and f"UDP reflexive addr: {LOCALHOST}:" in out, out

            text = await http_get(metrics, "/metrics")
            assert metric_value(text, "wirekube_relay_registrations_total", [("result", "ok")]) == 2
            assert metric_value(text, "wirekube_relay_forwarded_frames_total") == 1
            assert metric_value(text, "wirekube_relay_connections", [("state", "registered")]) == 2
            assert (metric_value(text, "wirekube_relay_stun_requests_total", [("result", "ok")]) or 0) >= 1
            assert await http_get(metrics, "/healthz") == "ok\n"

            relay.proc.send_signal(signal.SIGTERM)
            reason = await asyncio.wait_for(a.wait_closed(), 10)
            await b.close()
            return reason

        reason = run(scenario())
        assert "shutting down" in reason
        assert relay.proc.wait(10) == 0
        assert any(r["message"] == "relay stopped" for r in relay.lines)
    finally:
        relay.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_stalled_reader_does_not_grow_the_relay_process() -> None:
    """40 MB aimed at a client that never reads: the relay's RSS stays put, others keep flowing."""
    limit = 256 * 1024
    relay = RelayCli("--queue-limit-bytes", str(limit))
    try:
        tcp, metrics = relay.address("tcp"), relay.address("metrics")

        async def scenario() -> None:
            stalled, stalled_key = await stalled_spec_client(tcp)
            await steady_pair(tcp, 500)  # warm up allocator and code paths
            before = rss_kib(relay.proc.pid)
            flooder, _ = await registered_spec_client(tcp)
            flood = asyncio.ensure_future(pump(flooder, stalled_key, 28_000, [1400]))  # ~40 MB
            assert await steady_pair(tcp, 3000) == 3000
            await flood
            text = await http_get(metrics, "/metrics")
            dropped = metric_value(text, "wirekube_relay_dropped_frames_total", [("reason", "queue_full")]) or 0
            assert dropped > 10_000
            queued = metric_value(text, "wirekube_relay_queue_bytes") or 0
            assert queued <= limit
            growth_mib = (rss_kib(relay.proc.pid) - before) / 1024
            assert growth_mib < 16, f"relay RSS grew by {growth_mib:.1f} MiB"
            await stalled.close()

        run(scenario(), timeout=120)
    finally:
        relay.stop()


def test_logs_carry_only_key_fingerprints() -> None:
    relay = RelayCli()
    try:
        tcp = relay.address("tcp")
        key = X25519PrivateKey.generate()

        async def scenario() -> None:
            client = await RelayClient.connect(*tcp, key)
            await wait_until(lambda: any(r["message"] == "registered" for r in relay.lines), what="log line")
            await client.close()

        run(scenario())
        full = base64.b64encode(raw_public(key)).decode()
        text = json.dumps(relay.lines)
        assert full[:8] in text  # the fingerprint is there ...
        assert full[:12] not in text and raw_public(key).hex()[:16] not in text  # ... and no more
    finally:
        relay.stop()


def test_authorize_peers_without_a_cluster_fails_with_a_clear_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "wirekube.relay.cli", "--listen", f"{LOCALHOST}:0", "--stun-listen",
         f"{LOCALHOST}:0", "--metrics-listen", f"{LOCALHOST}:0", "--log-format", "text",
         "--authorize-peers", "--kubeconfig", "/nonexistent/kubeconfig"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "--authorize-peers" in proc.stderr


def test_bad_addresses_are_rejected_by_the_parser() -> None:
    assert parse_hostport("127.0.0.1:3478") == ("127.0.0.1", 3478)
    assert parse_hostport(":9478") == ("0.0.0.0", 9478)
    assert parse_hostport("[::1]:3478") == ("::1", 3478)
    proc = subprocess.run([sys.executable, "-m", "wirekube.relay.cli", "--listen", "nowhere"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


class FakeInformer:
    """Stands in for k8s.Informer: a cache and an on_event callback driven by the test."""

    instances: ClassVar[list[FakeInformer]] = []

    def __init__(self, kube: object, res: object, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.resource = res
        self.on_event = on_event
        self._cache: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self.stopped = False
        FakeInformer.instances.append(self)

    def start(self) -> FakeInformer:
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self.synced.wait(timeout)

    @property
    def cache(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._cache)

    def put(self, name: str, key: bytes) -> None:  # from another thread, like the real one
        obj = {"metadata": {"name": name}, "spec": {"publicKey": base64.b64encode(key).decode()}}
        with self._lock:
            self._cache[name] = obj
        self.on_event("ADDED", obj)

    def delete(self, name: str) -> None:
        with self._lock:
            obj = self._cache.pop(name)
        self.on_event("DELETED", obj)


def test_watch_peers_feeds_the_authorizer_from_the_informer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s.Kube, "auto", classmethod(lambda cls, kubeconfig=None, host_override=None: object()))
    monkeypatch.setattr(k8s, "Informer", FakeInformer)
    FakeInformer.instances.clear()
    k1, k2 = os.urandom(32), os.urandom(32)

    async def scenario() -> None:
        authorizer = PeerAuthorizer()
        revoked: list[frozenset[bytes]] = []
        authorizer.on_revoked(revoked.append)
        stop = watch_peers(authorizer, None)
        informer = FakeInformer.instances[-1]
        assert informer.resource is k8s.PEERS
        assert not authorizer.ready
        informer.synced.set()  # an empty cluster: no events, but a valid, empty set
        await wait_until(lambda: authorizer.ready, what="first sync")
        assert authorizer.allowed == frozenset()

        def add_two() -> None:
            informer.put("n1", k1)
            informer.put("n2", k2)

        threading.Thread(target=add_two).start()
        await wait_until(lambda: authorizer.allowed == {k1, k2}, what="two keys")
        threading.Thread(target=lambda: informer.delete("n1")).start()
        await wait_until(lambda: authorizer.allowed == {k2}, what="removal")
        assert revoked == [frozenset({k1})]
        stop()
        assert informer.stopped

    run(scenario())
