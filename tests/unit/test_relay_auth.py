"""Proof of key ownership: the relay side (Challenge) and the client side (prove)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from wirekube.relay.auth import Challenge, decode_key, fingerprint, prove, public_bytes


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_holder_of_the_key_passes() -> None:
    client = X25519PrivateKey.generate()
    challenge = Challenge.issue(public_bytes(client))
    assert challenge.verify(prove(client, challenge.body()))


def test_proof_matches_the_protocol_text() -> None:
    """Computed independently from the issue's formula, with fixed ephemeral key and nonce."""
    client = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    ephemeral = X25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    nonce = bytes(range(16))
    p, e = raw_public(client), raw_public(ephemeral)
    shared = client.exchange(ephemeral.public_key())
    expected = hmac.new(shared, b"wirekube-relay-auth-v1" + nonce + p + e, hashlib.sha256).digest()

    challenge = Challenge.issue(p, ephemeral_private=ephemeral, nonce=nonce)
    assert challenge.body() == e + nonce
    assert prove(client, challenge.body()) == expected
    assert challenge.verify(expected)


def test_claiming_someone_elses_key_fails() -> None:
    victim, impostor = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    challenge = Challenge.issue(public_bytes(victim))
    assert not challenge.verify(prove(impostor, challenge.body()))


def test_a_proof_is_worthless_for_another_challenge() -> None:
    client = X25519PrivateKey.generate()
    first = Challenge.issue(public_bytes(client))
    second = Challenge.issue(public_bytes(client))
    assert first.nonce != second.nonce and first.ephemeral_public != second.ephemeral_public
    assert not second.verify(prove(client, first.body()))


def test_tampered_or_short_proofs_fail() -> None:
    client = X25519PrivateKey.generate()
    challenge = Challenge.issue(public_bytes(client))
    good = prove(client, challenge.body())
    assert not challenge.verify(bytes([good[0] ^ 1]) + good[1:])
    assert not challenge.verify(good[:31])
    assert not challenge.verify(b"")


def test_low_order_point_key_never_verifies() -> None:
    """An all-zero public key makes the shared secret all zeros; the relay must not accept it
    (whoever forges it would otherwise 'prove' it with an HMAC keyed by zeros)."""
    zero_key = bytes(32)
    challenge = Challenge.issue(zero_key)
    forged = hmac.new(
        bytes(32), b"wirekube-relay-auth-v1" + challenge.nonce + zero_key + challenge.ephemeral_public, hashlib.sha256
    ).digest()
    assert not challenge.verify(forged)


def test_challenge_refuses_wrong_key_length() -> None:
    with pytest.raises(ValueError, match='client key must be 32 bytes'):
        Challenge.issue(b"short")


def test_prove_refuses_a_malformed_challenge() -> None:
    with pytest.raises(ValueError, match='challenge must be 48 bytes'):
        prove(X25519PrivateKey.generate(), b"\x01" * 47)


def test_fingerprint_is_a_short_prefix_of_the_base64_key() -> None:
    key = bytes(range(32))
    text = base64.b64encode(key).decode()
    assert fingerprint(key) == text[:8]
    assert len(fingerprint(key)) == 8


def test_decode_key() -> None:
    key = bytes(range(32))
    assert decode_key(base64.b64encode(key).decode()) == key
    with pytest.raises(ValueError, match='not valid base64'):
        decode_key("not base64!")
    with pytest.raises(ValueError, match='decodes to 5 bytes, not 32'):
        decode_key(base64.b64encode(b"short").decode())


def test_challenge_repr_has_no_secret() -> None:
    challenge = Challenge.issue(bytes(range(32)))
    assert challenge.nonce.hex() not in repr(challenge)
    assert "ephemeral_private" not in repr(challenge)
