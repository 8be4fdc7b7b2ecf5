"""Kubernetes-style status conditions (metav1.Condition) as plain dicts.  Pure: ``now`` is passed in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


def timestamp(now: float) -> str:
    """RFC 3339, whole seconds, as the API server writes condition times."""
    return dt.datetime.fromtimestamp(int(now), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    now: float,
    generation: int,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; lastTransitionTime changes only when the status does."""
    value = (TRUE if status else FALSE) if isinstance(status, bool) else status
    old = find(conditions, type_)
    changed = old is None or old.get("status") != value
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": timestamp(now) if changed or old is None else old.get("lastTransitionTime"),
        "observedGeneration": generation,
    }
    out = [dict(c) for c in conditions if c.get("type") != type_]
    out.append(new)
    return sorted(out, key=lambda c: str(c.get("type")))


def find(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch turning ``current``'s keys named in ``desired`` into ``desired``.

    Nested maps are diffed key by key (a key missing from the desired map becomes null), so the
    patch leaves keys other writers own untouched.  Lists and scalars are replaced whole.
    """
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = current.get(key)
        if isinstance(want, Mapping) and not want and not have:
            continue
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            inner = {k: v for k, v in want.items() if have.get(k) != v}
            inner.update({k: None for k in have if k not in want})
            if inner:
                patch[key] = inner
        elif have != want:
            patch[key] = want
    return patch
