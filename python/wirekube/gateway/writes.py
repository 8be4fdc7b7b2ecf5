"""The gateway controller's writes to the API server: status patches, merge patches and Events.

After a write the informer's cache lags for a moment; :class:`Writer` keeps the object the API
server returned as an overlay until the cache holds that resourceVersion or a newer one
(:meth:`Writer.fresh`), so the next pass never plans from a stale object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from wirekube import errors, k8s
from wirekube.gateway.metrics import ControllerMetrics

if TYPE_CHECKING:
    from loguru import Logger

JSON = dict[str, Any]
COMPONENT = "gateway-controller"


class Writer:
    """Owns every write of one controller: the overlay of written objects, Events and write counts."""

    def __init__(self, kube: k8s.Kube, metrics: ControllerMetrics, log: Logger, event_namespace: str) -> None:
        self.kube = kube
        self.metrics = metrics
        self._log = log
        self._event_namespace = event_namespace
        self._overlay: dict[tuple[str, str], JSON] = {}
        self.writes = 0

    def write_status(self, informer: str, res: k8s.Resource, name: str, patch: Mapping[str, Any]) -> bool:
        try:
            obj = self.kube.patch_status(res, name, {"status": dict(patch)})
        except errors.NotFound:
            return False  # deleted meanwhile
        except errors.ApiError as e:
            self.metrics.errors.labels(informer).inc()
            self._log.warning("cannot write status of {} {}: {}", res.kind, name, e)
            return False
        self.wrote(informer, name, obj)
        return True

    def wrote(self, informer: str, name: str, obj: JSON) -> None:
        """Keep ``obj`` (as the API server returned it) over the cache, and count the write."""
        self._overlay[(informer, name)] = obj
        self.count(informer)

    def count(self, kind: str) -> None:
        self.writes += 1
        self.metrics.writes.labels(kind).inc()

    def fresh(self, informer: str, cached: JSON | None) -> JSON | None:
        """The cached object, or the newer one this controller just wrote (see module docstring)."""
        if cached is None:
            return None
        key = (informer, cached["metadata"]["name"])
        written = self._overlay.get(key)
        if written is None:
            return cached
        if _rv(cached) >= _rv(written):
            del self._overlay[key]
            return cached
        return written

    def event(
        self, obj: Mapping[str, Any], kind: str, reason: str, note: str, *, action: str, type_: str = "Normal"
    ) -> None:
        """An Event about ``obj`` (a ``kind`` object), in the namespace ``kubectl describe`` looks in."""
        self.kube.emit_event(regarding(obj, kind), reason, note, type_=type_, action=action,
                             component=COMPONENT, namespace=self._event_namespace)


def regarding(obj: Mapping[str, Any], kind: str) -> JSON:
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": kind, **obj}


def generation(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)


def _rv(obj: Mapping[str, Any]) -> int:
    """resourceVersion as a number (etcd revisions are); unparsable counts as oldest."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
