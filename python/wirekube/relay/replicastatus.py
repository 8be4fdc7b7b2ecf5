"""Each relay replica's status in the cluster: one Lease per replica, for ``wirekubectl status``.

A replica started with ``--status-lease NAME`` keeps the ``coordination.k8s.io/v1`` Lease NAME
(in a cluster: its Pod's name, owned by the Pod so it goes with it) labelled
``wirekube.io/relay-replica``, with how many keys it holds and how many mesh links are up in its
annotations.  The Lease is written only when those counts change (at most once per
``min_interval``) and renewed every ``renew_interval`` otherwise, so a replica that died without
saying so shows as stale once ``renewTime + leaseDurationSeconds`` has passed.  Frames never
cause a write: :class:`LeasePublisher` samples the counts on a timer.

Pure part: :func:`lease_body` and :func:`replica_rows` (plain dicts in, rows out); the writer
talks to the API server through :mod:`wirekube.k8s` on a worker thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loguru import logger

LABEL = "wirekube.io/relay-replica"
KEYS_ANNOTATION = "wirekube.io/relay-keys"
LINKS_ANNOTATION = "wirekube.io/relay-mesh-links"
REPLICA_ANNOTATION = "wirekube.io/relay-replica-id"

_log = logger.bind(component="relay-status")


@dataclass(frozen=True)
class LeaseSettings:
    name: str
    namespace: str
    duration: float = 60.0
    """leaseDurationSeconds: a Lease not renewed for this long is shown as stale."""
    renew_interval: float = 20.0
    """Rewrite the Lease this often even when nothing changed."""
    min_interval: float = 5.0
    """Write at most this often; a change shows within it."""
    owner_pod: tuple[str, str] | None = None
    """(name, uid) of the Pod that owns the Lease (garbage-collected with it)."""


def _stamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(settings: LeaseSettings, replica: str, keys: int, links: int | None, now: float) -> dict[str, Any]:
    """The Lease a replica writes (``links`` None: not part of a mesh)."""
    annotations = {KEYS_ANNOTATION: str(keys), REPLICA_ANNOTATION: replica}
    if links is not None:
        annotations[LINKS_ANNOTATION] = str(links)
    metadata: dict[str, Any] = {
        "name": settings.name, "namespace": settings.namespace,
        "labels": {LABEL: "true"}, "annotations": annotations,
    }
    if settings.owner_pod is not None:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": settings.owner_pod[0], "uid": settings.owner_pod[1]}
        ]
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
        "spec": {"holderIdentity": replica, "leaseDurationSeconds": int(settings.duration),
                 "renewTime": _stamp(now)},
    }


@dataclass(frozen=True)
class ReplicaRow:
    name: str
    namespace: str
    replica: str
    keys: int
    links: int | None
    age: float
    """Seconds since the replica last wrote its Lease (as seen from ``now``)."""
    stale: bool


def _parse_time(text: object) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _int(text: object) -> int | None:
    try:
        return int(str(text))
    except ValueError:
        return None


def replica_rows(leases: Iterable[Mapping[str, Any]], now: float) -> list[ReplicaRow]:
    """Rows for Leases labelled :data:`LABEL` (anything malformed is shown, with 0 keys, stale)."""
    rows = []
    for lease in leases:
        meta = lease.get("metadata") or {}
        spec = lease.get("spec") or {}
        notes = meta.get("annotations") or {}
        renewed = _parse_time(spec.get("renewTime"))
        duration = _int(spec.get("leaseDurationSeconds")) or 0
        age = now - renewed if renewed is not None else float("inf")
        rows.append(ReplicaRow(
            name=str(meta.get("name", "")), namespace=str(meta.get("namespace", "")),
            replica=str(notes.get(REPLICA_ANNOTATION) or spec.get("holderIdentity") or ""),
            keys=_int(notes.get(KEYS_ANNOTATION)) or 0,
            links=_int(notes.get(LINKS_ANNOTATION)) if LINKS_ANNOTATION in notes else None,
            age=max(age, 0.0), stale=renewed is None or age > duration,
        ))
    return sorted(rows, key=lambda r: (r.namespace, r.name))


Counts = Callable[[], tuple[int, int | None]]
"""``() -> (keys held here, mesh links up or None)``."""


class LeasePublisher:
    """Keeps this replica's Lease current from the event loop; the API calls run on a thread."""

    def __init__(self, kube: Any, settings: LeaseSettings, replica: str, counts: Counts,
                 clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.settings = settings
        self.replica = replica
        self.counts = counts
        self.clock = clock
        self.writes = 0
        self.failures = 0
        self._written: tuple[int, int | None] | None = None
        self._written_at = float("-inf")
        self._resource_version: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="relay-status-lease")

    async def close(self, *, delete: bool = True) -> None:
        """Stop; with ``delete``, remove the Lease (a replica that leaves is no longer listed)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if delete:
            from wirekube import errors, k8s

            try:  # bounded: shutdown must not wait on an unreachable API server (the Pod's GC removes it)
                await asyncio.wait_for(asyncio.to_thread(
                    self.kube.delete, k8s.LEASES, self.settings.name, self.settings.namespace), 3.0)
            except errors.NotFound:
                pass
            except (TimeoutError, errors.WireKubeError) as e:
                _log.warning("could not remove Lease {}/{}: {}", self.settings.namespace, self.settings.name,
                             e or "timed out")

    def due(self, now: float) -> bool:
        """Whether a write is due: counts changed (and ``min_interval`` passed) or renewal time."""
        since = now - self._written_at
        if since >= self.settings.renew_interval:
            return True
        return self.counts() != self._written and since >= self.settings.min_interval

    async def _run(self) -> None:
        tick = min(1.0, self.settings.min_interval)
        while True:
            if self.due(self.clock()):
                await self.write_once()
            await asyncio.sleep(tick)

    async def write_once(self) -> None:
        counts = self.counts()
        now = self.clock()
        try:
            await asyncio.to_thread(self._write, counts, now)
        except Exception as e:  # noqa: BLE001 - any API failure: log once, retry at the next tick
            self.failures += 1
            self._written_at = now - self.settings.renew_interval + self.settings.min_interval  # retry soon
            if not self._failing:
                _log.warning("cannot write Lease {}/{}: {}", self.settings.namespace, self.settings.name, e)
            self._failing = True
            return
        if self._failing:
            _log.info("Lease {}/{} written again", self.settings.namespace, self.settings.name)
        self._failing = False
        self._written, self._written_at = counts, now
        self.writes += 1

    def _write(self, counts: tuple[int, int | None], now: float) -> None:
        from wirekube import errors, k8s

        body = lease_body(self.settings, self.replica, counts[0], counts[1], now)
        ns = self.settings.namespace
        if self._resource_version is None:
            try:
                self._resource_version = self.kube.create(k8s.LEASES, body, ns)["metadata"]["resourceVersion"]
                return
            except errors.AlreadyExists:  # left by an earlier process of this pod: take it over
                held = self.kube.get(k8s.LEASES, self.settings.name, ns)
                self._resource_version = held["metadata"]["resourceVersion"]
        body["metadata"]["resourceVersion"] = self._resource_version
        try:
            self._resource_version = self.kube.replace(k8s.LEASES, body, ns)["metadata"]["resourceVersion"]
        except (errors.Conflict, errors.NotFound):
            self._resource_version = None  # someone else wrote or removed it: start over next time
            raise
