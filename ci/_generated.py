"""Shared by the generators in ci/: write a generated file, or with --check fail if it is stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_or_check(out: Path, text: str, description: str, generator: str) -> int:
    return write_or_check_all({out: text}, description, generator)


def write_or_check_all(outputs: dict[Path, str], description: str, generator: str) -> int:
    """Write every generated file, or with --check name each one that differs from its text."""
    names = ", ".join(out.name for out in outputs)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"fail if the committed {names} is stale")
    args = parser.parse_args()
    if args.check:
        stale = [out for out, text in outputs.items() if not out.exists() or out.read_text() != text]
        for out in stale:
            print(f"{out} is stale: run python3 {generator}", file=sys.stderr)
        return 1 if stale else 0
    for out, text in outputs.items():
        out.write_text(text)
    return 0
