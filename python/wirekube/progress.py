"""Progress lines for long operations (lab bring-up, builds): what step, how far.

Lines go to stderr so that a command's real output (a kubeconfig path, JSON) stays clean on
stdout.  Colour only on a terminal.
"""

from __future__ import annotations

import sys
import time

_START = time.monotonic()


def step(component: str, index: int, total: int, message: str) -> None:
    elapsed = time.monotonic() - _START
    bold, reset = ("\033[1m", "\033[0m") if sys.stderr.isatty() else ("", "")
    print(f"{bold}[{component} {index}/{total}]{reset} {message} (+{elapsed:.1f}s)", file=sys.stderr, flush=True)
