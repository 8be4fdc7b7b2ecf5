"""Node keys: generated once, 0600, reused, and refused when corrupt."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from wirekube.agent import keys


def test_generated_once_then_reused(tmp_path: Path) -> None:
    first = keys.load_or_create(tmp_path / "state")
    second = keys.load_or_create(tmp_path / "state")
    assert first == second
    path = tmp_path / "state" / keys.PRIVATE_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(first.public_key)) == 32 and first.public_key != first.private_key
    assert first.private_key not in repr(first)


def test_public_key_matches_wireguard_derivation() -> None:
    # RFC 7748 section 6.1 test vector (Alice), as WireGuard keys.
    priv = base64.b64encode(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")).decode()
    pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert keys.public_key_of(priv) == base64.b64encode(pub).decode()


def test_corrupt_key_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / keys.PRIVATE_KEY_FILE).write_text("garbage")
    with pytest.raises(keys.KeyFileError, match="cannot use the stored private key") as e:
        keys.load_or_create(tmp_path)
    assert "garbage" not in str(e.value)
    assert (tmp_path / keys.PRIVATE_KEY_FILE).read_text() == "garbage"
