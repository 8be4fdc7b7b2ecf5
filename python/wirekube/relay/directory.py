"""Which replica holds each registered key: the replica mesh's directory.  Pure: no I/O, no clock.

Each replica knows the keys registered with itself (``local``, each with its registration stamp)
and, per authenticated mesh peer, the keys that peer says it holds.  A key may briefly be claimed
by more than one replica (a node that reconnected through the load balancer to another replica
while its old connection still looks alive, or one agent connected to two replicas on purpose);
the newest claim wins everywhere else (see :func:`wirekube.relay.meshwire.newer`), and a replica
that learns of a newer claim for a key it holds is told to drop its own connection (the mesh
keeps it while its client is still heard: :class:`wirekube.relay.mesh.RelayMesh`).

The caller feeds events in and applies what comes out: :class:`Change` says which keys now route
to which peer (``None``: to no peer) and which local keys to evict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wirekube.relay.meshwire import newer, next_stamp


@dataclass
class Change:
    """What an event changed: remote routes to set (peer id) or remove (None); local keys whose
    connection must be dropped because another replica holds a newer registration."""

    routes: dict[bytes, bytes | None] = field(default_factory=dict)
    evict: list[bytes] = field(default_factory=list)


class KeyDirectory:
    def __init__(self, replica_id: bytes) -> None:
        self.replica_id = replica_id
        self.clock = 0
        self.local: dict[bytes, int] = {}
        self.remote: dict[bytes, dict[bytes, int]] = {}
        """peer id -> {key: stamp} as that peer announced."""
        self._best: dict[bytes, bytes] = {}
        """key -> the peer whose claim for it is the newest (only keys some peer claims)."""

    # -- local registrations -------------------------------------------------------------------

    def register_local(self, key: bytes, now_us: int) -> int:
        """A client proved ``key`` here; returns the registration's stamp (to announce)."""
        stamp = next_stamp(now_us, self.clock)
        self.clock = stamp
        self.local[key] = stamp
        return stamp

    def release_local(self, key: bytes) -> int | None:
        """The local connection for ``key`` went away; returns the stamp released (to announce)."""
        return self.local.pop(key, None)

    def snapshot(self) -> list[tuple[bytes, int]]:
        """Every local key with its stamp: what a new mesh link is told first."""
        return sorted(self.local.items())

    # -- what peers say ------------------------------------------------------------------------

    def peer_up(self, peer: bytes) -> Change:
        """A link to ``peer`` became the active one: it starts knowing nothing of it (anything
        an earlier link said is forgotten; the peer's snapshot follows on the new link)."""
        change = self.peer_down(peer)
        self.remote[peer] = {}
        return change

    def peer_down(self, peer: bytes) -> Change:
        """The active link to ``peer`` is gone: forget everything it said."""
        change = Change()
        for key in self.remote.pop(peer, {}):
            self._rebest(key, change)
        return change

    def peer_holds(self, peer: bytes, entries: list[tuple[bytes, int]]) -> Change:
        change = Change()
        held = self.remote.setdefault(peer, {})
        for key, stamp in entries:
            self.clock = max(self.clock, stamp)
            held[key] = stamp
            mine = self.local.get(key)
            if mine is not None and newer(stamp, peer, mine, self.replica_id):
                change.evict.append(key)
            self._rebest(key, change)
        return change

    def peer_releases(self, peer: bytes, entries: list[tuple[bytes, int]]) -> Change:
        change = Change()
        held = self.remote.get(peer, {})
        for key, stamp in entries:
            if key in held and held[key] <= stamp:
                del held[key]
                self._rebest(key, change)
        return change

    # -- lookups -------------------------------------------------------------------------------

    def holder(self, key: bytes) -> bytes | None:
        """The peer to forward ``key``'s data to (ignoring local registrations), or None."""
        return self._best.get(key)

    def outranked(self, key: bytes) -> bool:
        """Whether some peer claims ``key`` with a newer registration than the local one."""
        mine = self.local.get(key)
        best = self._best.get(key)
        if mine is None or best is None:
            return False
        return newer(self.remote[best][key], best, mine, self.replica_id)

    def keys_of(self, peer: bytes) -> int:
        return len(self.remote.get(peer, {}))

    def _rebest(self, key: bytes, change: Change) -> None:
        best: tuple[int, bytes] | None = None
        for peer, held in self.remote.items():
            stamp = held.get(key)
            if stamp is not None and (best is None or newer(stamp, peer, best[0], best[1])):
                best = (stamp, peer)
        before = self._best.get(key)
        if best is None:
            self._best.pop(key, None)
        else:
            self._best[key] = best[1]
        after = best[1] if best is not None else None
        if after != before:
            change.routes[key] = after
