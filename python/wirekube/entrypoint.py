"""How every WireKube console script ends on an error: one line naming it, never a traceback.

Each ``main`` is decorated with :func:`console_script`::

    @console_script("wirekube-relay")
    def main(argv: Sequence[str] | None = None) -> int: ...

Whatever escapes ``main`` on bad input or an unreachable dependency is printed as one line
``PROG: what went wrong`` on stderr, with a non-zero exit status:

- :class:`~wirekube.errors.WireKubeError` (bad input found by WireKube, an API error, an
  unreachable API server: the adapters raise these) -> 1;
- :class:`OSError` (a missing or unreadable file, an address that cannot be bound) -> 1;
- ``ValueError`` raised while parsing settings (before any work) is left to each parser, which
  reports usage errors through argparse (exit 2);
- Ctrl-C -> 130, quietly.

A genuine bug (any other exception) still prints its traceback: hiding it would hide the bug.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec

from wirekube.errors import WireKubeError

_P = ParamSpec("_P")


def describe(error: BaseException) -> str:
    """One line for an expected error: the message, with an OSError's file and reason."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    text = str(error).strip() or type(error).__name__
    return text


def fail(prog: str, error: BaseException, code: int = 1) -> int:
    print(f"{prog}: {describe(error)}", file=sys.stderr)
    return code


def console_script(prog: str) -> Callable[[Callable[_P, int]], Callable[_P, int]]:
    """Decorate a console script's ``main`` (see the module docstring)."""

    def wrap(main: Callable[_P, int]) -> Callable[_P, int]:
        @functools.wraps(main)
        def guarded(*args: _P.args, **kwargs: _P.kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except (WireKubeError, OSError) as e:
                return fail(prog, e)

        return guarded

    return wrap
