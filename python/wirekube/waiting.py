"""Waiting on a condition with a deadline (never sleep-and-hope): for the lab, benches and tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition", interval: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy and return that; after ``timeout`` seconds
    raise :class:`TimeoutError` naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        last = cond()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
