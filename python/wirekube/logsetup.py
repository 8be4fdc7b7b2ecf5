"""Logging for every WireKube program, configured once in each ``main``.

One place decides what a log line may contain.  loguru's ``diagnose`` mode prints the values of
local variables in a traceback, which for the agent means private keys: it is off here, and so
is ``backtrace`` (frames above the catch point).  Library code binds context (node, peer,
component) with ``logger.bind`` and never formats key material.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from loguru import logger

FORMATS = ("text", "json")


def configure_logging(fmt: str = "text", level: str = "INFO", *, sink: TextIO | None = None,
                      **extra: Any) -> None:
    """Send log records to stderr (or ``sink``) as text or JSON lines, never with variable values.

    ``extra`` is bound to every record (e.g. ``node=...``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    logger.remove()
    logger.add(sink or sys.stderr, level=level.upper(), serialize=(fmt == "json"),
               backtrace=False, diagnose=False)
    logger.configure(extra=extra)
