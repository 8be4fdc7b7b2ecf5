"""nftables, the one way WireKube's agent and cleanup talk to it: the ``nft`` command with a
ruleset on stdin (atomic: all of it or nothing), and whole tables listed or deleted by name."""

from __future__ import annotations

import shutil
import subprocess

from wirekube.errors import DataplaneError


def _nft() -> str | None:
    return shutil.which("nft")


def run(text: str) -> None:
    """Apply ``text`` with ``nft -f -``; OSError with nft's message (and the ruleset) on failure."""
    nft = _nft()
    if nft is None:
        raise OSError("nft not found")
    done = subprocess.run([nft, "-f", "-"], input=text, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"nft -f: {done.stderr.strip()}\n{text}")


def table_present(family: str, table: str) -> bool:
    nft = _nft()
    if nft is None:
        return False
    return subprocess.run([nft, "list", "table", family, table], capture_output=True,
                          check=False).returncode == 0


def delete_table(family: str, table: str) -> bool:
    """Delete the table if it exists; True when it did.  DataplaneError when nft refuses."""
    nft = _nft()
    if nft is None or not table_present(family, table):
        return False
    done = subprocess.run([nft, "delete", "table", family, table], capture_output=True, check=False)
    if done.returncode != 0:
        raise DataplaneError(f"nft delete table {family} {table}: {done.stderr.decode().strip()}")
    return True
