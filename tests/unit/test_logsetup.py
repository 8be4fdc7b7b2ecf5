"""No key material in logs, even in a traceback: loguru's diagnose mode (local variables in
tracebacks) is off in the one logging setup every program uses."""

from __future__ import annotations

import base64
import io
import json

import pytest
from loguru import logger

from wirekube import logsetup
from wirekube.agent.keys import generate_private_key


def _fail_holding(private_key: str) -> None:
    raw = base64.b64decode(private_key)  # noqa: F841 - what diagnose would print
    raise RuntimeError("engine refused the configuration")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_forced_exception_does_not_log_the_private_key(fmt: str) -> None:
    key = generate_private_key()
    sink = io.StringIO()
    logsetup.configure_logging(fmt, "DEBUG", sink=sink, node="n1")
    try:
        try:
            _fail_holding(key)
        except RuntimeError:
            logger.exception("reconcile crashed")
    finally:
        logsetup.configure_logging("text", "INFO")
    out = sink.getvalue()
    assert "engine refused the configuration" in out and "_fail_holding" in out  # the traceback is there
    for form in (key, key.rstrip("="), base64.b64decode(key).hex(), repr(base64.b64decode(key))):
        assert form not in out
    if fmt == "json":
        assert json.loads(out.splitlines()[0])["record"]["extra"]["node"] == "n1"


def test_an_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="log format 'xml'"):
        logsetup.configure_logging("xml", "INFO")
