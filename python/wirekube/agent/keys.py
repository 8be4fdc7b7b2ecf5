"""The node's WireGuard (X25519) key pair, persisted in the agent's state directory.

The private key is generated on first start and reused on every restart, so a restarted agent
keeps its identity (and the WireGuard sessions that depend on it).  It is written 0600 via a
temporary file and an atomic rename, so a crash mid-write never leaves a truncated key.

Key material is never logged: use :func:`wirekube.models.key_fingerprint` on the public key.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from wirekube.errors import WireKubeError
from wirekube.models import parse_key

DEFAULT_STATE_DIR = Path("/var/lib/wirekube")
PRIVATE_KEY_FILE = "private.key"


class KeyFileError(WireKubeError):
    """The stored private key is unreadable or malformed (refusing to overwrite it silently)."""


@dataclass(frozen=True)
class KeyPair:
    private_key: str = field(repr=False)
    public_key: str

    @property
    def private_bytes(self) -> bytes:
        return base64.b64decode(self.private_key)


def generate_private_key() -> str:
    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw).decode()


def public_key_of(private_key: str) -> str:
    """The base64 public key of a base64 private key (raises ValueError on a malformed key)."""
    raw = parse_key(private_key)
    pub = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def load_or_create(state_dir: Path = DEFAULT_STATE_DIR) -> KeyPair:
    """Load the node's key pair from ``state_dir``, generating and persisting it on first use."""
    path = state_dir / PRIVATE_KEY_FILE
    if path.exists():
        return _load(path)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_key = generate_private_key()
    _write_private(path, private_key)
    return KeyPair(private_key, public_key_of(private_key))


def _load(path: Path) -> KeyPair:
    try:
        text = path.read_text().strip()
        return KeyPair(text, public_key_of(text))
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{path}: cannot use the stored private key ({type(e).__name__})") from None


def _write_private(path: Path, private_key: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (private_key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
