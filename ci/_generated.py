"""Shared by the generators in ci/: write a generated file, or with --check fail if it is stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_or_check(out: Path, text: str, description: str, generator: str) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"fail if the committed {out.name} is stale")
    args = parser.parse_args()
    if args.check:
        if out.read_text() != text:
            print(f"{out} is stale: run python3 {generator}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0
