"""Which keys may register with the relay (``--authorize-peers``).

A :class:`PeerAuthorizer` holds the set of allowed keys.  Whoever watches the cluster (the CLI,
through the Kubernetes adapter) calls :meth:`PeerAuthorizer.replace` with the full current set;
the relay subscribes with :meth:`PeerAuthorizer.on_revoked` and disconnects keys that left it.
Until the first set arrives the authorizer is not ready and allows nothing.

Everything here is plain data: no Kubernetes, no I/O.  Not thread-safe: call it on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from loguru import logger

from wirekube.relay.auth import decode_key, fingerprint

RevocationListener = Callable[[frozenset[bytes]], None]


def keys_from_peers(peers: Iterable[Mapping[str, Any]]) -> frozenset[bytes]:
    """The raw keys in the ``spec.publicKey`` of WireKubePeer objects (plain dicts).

    A peer without a valid key contributes nothing (it is logged by name, never by key).
    """
    keys: set[bytes] = set()
    for peer in peers:
        spec = peer.get("spec") or {}
        text = spec.get("publicKey") if isinstance(spec, Mapping) else None
        if not isinstance(text, str):
            continue
        try:
            keys.add(decode_key(text))
        except ValueError as e:
            name = (peer.get("metadata") or {}).get("name", "?")
            logger.warning("WireKubePeer {} has an unusable spec.publicKey: {}", name, e)
    return frozenset(keys)


class PeerAuthorizer:
    """The set of keys allowed to register, and who to tell when a key is removed."""

    def __init__(self, allowed: Iterable[bytes] | None = None) -> None:
        self._allowed: frozenset[bytes] | None = None if allowed is None else frozenset(allowed)
        self._listeners: list[RevocationListener] = []

    @property
    def ready(self) -> bool:
        """Whether a key set has been received at least once."""
        return self._allowed is not None

    @property
    def allowed(self) -> frozenset[bytes]:
        return self._allowed or frozenset()

    def allows(self, key: bytes) -> bool:
        return self._allowed is not None and key in self._allowed

    def on_revoked(self, listener: RevocationListener) -> None:
        """Call ``listener(removed_keys)`` whenever keys leave the set."""
        self._listeners.append(listener)

    def replace(self, keys: Iterable[bytes]) -> frozenset[bytes]:
        """Make ``keys`` the allowed set; returns (and announces) the keys that were removed."""
        new = frozenset(keys)
        removed = (self._allowed or frozenset()) - new
        added = new - (self._allowed or frozenset())
        self._allowed = new
        if added or removed:
            logger.info(
                "authorized keys: {} (+{} -{}{})",
                len(new),
                len(added),
                len(removed),
                "".join(f" -{fingerprint(k)}" for k in sorted(removed)[:8]),
            )
        if removed:
            for listener in list(self._listeners):
                listener(removed)
        return removed
