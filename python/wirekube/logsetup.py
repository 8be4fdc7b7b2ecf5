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

from wirekube.errors import InvalidConfig

FORMATS = ("text", "json")
LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def configure_logging(fmt: str = "text", level: str = "INFO", *, sink: TextIO | None = None,
                      **extra: Any) -> None:
    """Send log records to stderr (or ``sink``) as text or JSON lines, never with variable values.

    ``extra`` is bound to every record (e.g. ``node=...``).
    """
    if fmt not in FORMATS:
        raise InvalidConfig(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    try:
        logger.level(level.upper())
    except ValueError:
        raise InvalidConfig(f"log level {level!r}: expected one of {', '.join(LEVELS)}") from None
    logger.remove()
    logger.add(sink or sys.stderr, level=level.upper(), serialize=(fmt == "json"),
               backtrace=False, diagnose=False)
    logger.configure(extra=extra)
