"""NAT-probe target policy, rate limiting and the peer authorizer: pure logic."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest

from wirekube.relay.authz import PeerAuthorizer, keys_from_peers
from wirekube.relay.policy import TokenBucket, refuse_special_targets


@pytest.mark.parametrize(
    ("address", "port", "refusal"),
    [
        ("127.0.0.1", 51820, "loopback"),
        ("127.3.4.5", 51820, "loopback"),
        ("224.0.0.1", 51820, "multicast"),
        ("239.255.255.250", 1900, "multicast"),
        ("0.0.0.0", 51820, "unspecified"),
        ("255.255.255.255", 51820, "broadcast"),
        ("240.0.0.1", 51820, "reserved"),
        ("203.0.113.10", 0, "port_zero"),
        ("203.0.113.10", 51820, None),
        ("10.1.2.3", 51820, None),
        ("192.168.1.20", 51822, None),
    ],
)
def test_probe_target_policy(address: str, port: int, refusal: str | None) -> None:
    assert refuse_special_targets(ipaddress.IPv4Address(address), port) == refusal


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.5)
    assert bucket.take(101.6)  # 1.6 s at 1/s refilled one token (minus the half already waited)
    assert not bucket.take(101.6)


def test_token_bucket_never_exceeds_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2.0)
    bucket.take(0.0)
    assert [bucket.take(1000.0) for _ in range(3)] == [True, True, False]


def test_token_bucket_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)


def peer(name: str, key: bytes | str | None) -> dict[str, Any]:
    spec: dict[str, object] = {}
    if key is not None:
        spec["publicKey"] = base64.b64encode(key).decode() if isinstance(key, bytes) else key
    return {"metadata": {"name": name}, "spec": spec}


def test_keys_from_peers_takes_valid_keys_only() -> None:
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    peers: list[dict[str, Any]] = [
        peer("a", k1), peer("b", k2), peer("c", "garbage"), peer("d", None), peer("e", b"short"), {"spec": None}
    ]
    assert keys_from_peers(peers) == frozenset({k1, k2})


def test_authorizer_denies_everything_until_the_first_set() -> None:
    auth = PeerAuthorizer()
    assert not auth.ready
    assert not auth.allows(b"\x01" * 32)
    auth.replace([])
    assert auth.ready and not auth.allows(b"\x01" * 32)


def test_authorizer_announces_removed_keys() -> None:
    k1, k2, k3 = (bytes([i]) * 32 for i in (1, 2, 3))
    auth = PeerAuthorizer([k1, k2])
    revoked: list[frozenset[bytes]] = []
    auth.on_revoked(revoked.append)
    assert auth.allows(k1) and auth.allows(k2) and not auth.allows(k3)
    assert auth.replace([k2, k3]) == frozenset({k1})
    assert revoked == [frozenset({k1})]
    assert not auth.allows(k1) and auth.allows(k3)
    auth.replace([k2, k3])
    assert revoked == [frozenset({k1})]  # no change, no announcement
