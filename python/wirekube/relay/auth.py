"""Proof that a relay client holds the private key of the public key it registers.

1. Client -> relay: Register, body = the client's X25519 public key ``P``.
2. Relay -> client: Challenge, body = a fresh ephemeral X25519 public key ``E`` + a fresh
   16-byte random nonce ``N``.
3. Client -> relay: Auth, body = HMAC-SHA256(key = X25519(client private key, E),
   message = b"wirekube-relay-auth-v1" + N + P + E).
4. The relay computes X25519(e, P) and compares the HMAC in constant time.

Only the holder of ``P``'s private key can compute the shared secret.  ``E`` and ``N`` are new for
every connection, so a proof seen on one connection is worthless on another.

Both sides live here: :class:`Challenge` (relay) and :func:`prove` (client).  Key material never
leaves this module in a log line; use :func:`fingerprint` to name a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from wirekube.relay.protocol import KEY_LEN, MAC_LEN, NONCE_LEN

AUTH_LABEL: Final = b"wirekube-relay-auth-v1"
FINGERPRINT_LEN: Final = 8


def fingerprint(public_key: bytes) -> str:
    """A short, loggable name for a key: the first 8 characters of its base64 form."""
    return base64.b64encode(public_key).decode("ascii")[:FINGERPRINT_LEN]


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private_key``."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def decode_key(text: str) -> bytes:
    """A WireGuard key in its base64 form (44 characters) as 32 raw bytes; ``ValueError`` if not."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError("not valid base64") from e
    if len(raw) != KEY_LEN:
        raise ValueError(f"decodes to {len(raw)} bytes, not {KEY_LEN}")
    return raw


def auth_message(nonce: bytes, client_public: bytes, ephemeral_public: bytes) -> bytes:
    return AUTH_LABEL + nonce + client_public + ephemeral_public


def proof(shared_secret: bytes, nonce: bytes, client_public: bytes, ephemeral_public: bytes) -> bytes:
    """The Auth body for a given shared secret."""
    message = auth_message(nonce, client_public, ephemeral_public)
    return hmac.new(shared_secret, message, hashlib.sha256).digest()


def prove(private_key: X25519PrivateKey, challenge_body: bytes) -> bytes:
    """Client side: the Auth body answering a Challenge body (``E`` + ``N``).

    Raises ``ValueError`` if the challenge is malformed or ``E`` is a low-order point.
    """
    if len(challenge_body) != KEY_LEN + NONCE_LEN:
        raise ValueError(f"challenge must be {KEY_LEN + NONCE_LEN} bytes")
    ephemeral_public, nonce = challenge_body[:KEY_LEN], challenge_body[KEY_LEN:]
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    return proof(shared, nonce, public_bytes(private_key), ephemeral_public)


@dataclass(frozen=True)
class Challenge:
    """Relay side: one challenge issued to one connection for one claimed key."""

    client_public: bytes
    ephemeral_private: X25519PrivateKey = field(repr=False)
    nonce: bytes = field(repr=False)

    @classmethod
    def issue(
        cls,
        client_public: bytes,
        *,
        ephemeral_private: X25519PrivateKey | None = None,
        nonce: bytes | None = None,
    ) -> Challenge:
        """A fresh challenge; ``ephemeral_private`` and ``nonce`` are injectable for tests only."""
        if len(client_public) != KEY_LEN:
            raise ValueError(f"client key must be {KEY_LEN} bytes")
        return cls(
            client_public=client_public,
            ephemeral_private=ephemeral_private or X25519PrivateKey.generate(),
            nonce=nonce if nonce is not None else os.urandom(NONCE_LEN),
        )

    @property
    def ephemeral_public(self) -> bytes:
        return public_bytes(self.ephemeral_private)

    def body(self) -> bytes:
        """The Challenge frame body: ``E`` + ``N``."""
        return self.ephemeral_public + self.nonce

    def verify(self, mac: bytes) -> bool:
        """Whether ``mac`` proves possession of ``client_public``'s private key."""
        if len(mac) != MAC_LEN:
            return False
        try:
            peer = X25519PublicKey.from_public_bytes(self.client_public)
            shared = self.ephemeral_private.exchange(peer)
        except ValueError:  # a low-order point gives an all-zero secret; cryptography refuses it
            return False
        expected = proof(shared, self.nonce, self.client_public, self.ephemeral_public)
        return hmac.compare_digest(expected, mac)
