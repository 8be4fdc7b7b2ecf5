"""The Kubernetes adapter: the only module in WireKube that imports ``kubernetes``.

Everything else works on plain dicts (or the typed models built from them) and on WireKube's
own error types.  What lives here:

* :class:`Kube`: get/list/create/patch/delete/status for any resource in :data:`RESOURCES`,
  status writes with conflict retry, Events;
* :func:`Kube.watch`: one watch request as an iterator of :class:`WatchEvent`, bookmarks on;
* :class:`Informer`: list+watch in a thread with resourceVersion resume, relist on 410 Gone,
  reconnect with exponential backoff (tenacity), a local cache and a callback per change;
* :class:`LeaderElector`: Lease-based leader election (coordination.k8s.io/v1).

The client is synchronous (``kubernetes`` is); asyncio services run these calls in a thread.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import kubernetes.client
import kubernetes.config
import tenacity
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from loguru import logger

from wirekube import errors

JSON = dict[str, Any]

# Writes ask the API server to reject unknown or duplicate fields instead of silently pruning
# them, so a typo in a manifest (or a bug in our own code) is an error naming the field.
_STRICT = {"fieldValidation": "Strict"}


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = False

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced:
            if namespace is None:
                raise ValueError(f"{self.kind} is namespaced: a namespace is required")
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if sub is not None:
            base += f"/{sub}"
        return base

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PEERS = Resource("wirekube.io", "v1alpha1", "wirekubepeers", "WireKubePeer")
MESHES = Resource("wirekube.io", "v1alpha1", "wirekubemeshes", "WireKubeMesh")
GATEWAYS = Resource("wirekube.io", "v1alpha1", "wirekubegateways", "WireKubeGateway")
ROUTE_GRANTS = Resource("wirekube.io", "v1alpha1", "wirekuberoutegrants", "WireKubeRouteGrant")
NODE_REPORTS = Resource("wirekube.io", "v1alpha1", "wirekubenodereports", "WireKubeNodeReport")
"""A node's per-pair observations (transports, relay reasons, path MTUs): read by wirekubectl,
never watched by agents (issue 20)."""
PAIR_SIGNALS = Resource("wirekube.io", "v1alpha1", "wirekubepairsignals", "WireKubePairSignal")
"""One node's word to one other node (an observed endpoint, a birthday round): only the
addressee watches it (label ``wirekube.io/to``)."""
NODES = Resource("", "v1", "nodes", "Node")
NAMESPACES = Resource("", "v1", "namespaces", "Namespace")
SERVICES = Resource("", "v1", "services", "Service", namespaced=True)
EVENTS = Resource("events.k8s.io", "v1", "events", "Event", namespaced=True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition")
CILIUMNODES = Resource("cilium.io", "v2", "ciliumnodes", "CiliumNode")
ENDPOINTSLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", namespaced=True)
"""The relay replicas find each other through their headless Service's slices."""

RESOURCES = {r.plural: r for r in (PEERS, MESHES, GATEWAYS, ROUTE_GRANTS, NODE_REPORTS, PAIR_SIGNALS, NODES, NAMESPACES,
                                   SERVICES, EVENTS, LEASES, CRDS, CILIUMNODES)}
RESOURCES[ENDPOINTSLICES.plural] = ENDPOINTSLICES

_ERROR_BY_STATUS: dict[int, type[errors.ApiError]] = {
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.NotFound,
    410: errors.Gone,
    400: errors.Invalid,
    422: errors.Invalid,
}


def _map_api_exception(e: ApiException) -> errors.ApiError:
    message, reason = e.reason or "", ""
    try:
        body = json.loads(e.body) if e.body else {}
        message = body.get("message") or message
        reason = body.get("reason") or ""
    except (ValueError, TypeError):
        pass
    status = int(e.status or 0)
    cls: type[errors.ApiError]
    if status == 409:
        cls = errors.AlreadyExists if reason == "AlreadyExists" else errors.Conflict
    elif status == 429 or status >= 500 or status == 0:
        cls = errors.Temporary
    else:
        cls = _ERROR_BY_STATUS.get(status, errors.ApiError)
    return cls(message, status=status, reason=reason)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _translate(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Map client exceptions to WireKube's errors, keeping the original as ``__cause__``."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise _map_api_exception(e) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise errors.Temporary(f"API server unreachable: {e}") from e

    return wrapper


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: JSON


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Every informer holds one pooled connection for its open watch; the client's default pool
# (5 per CPU: 10 on a 2-core node) leaves writes fighting watches, and urllib3 then opens and
# discards extra connections (a TLS handshake each) with "Connection pool is full" warnings.
CONNECTION_POOL_SIZE = 32


def _kubeconfig_configuration(path: str | None, context: str | None) -> kubernetes.client.Configuration:
    """The client configuration from a kubeconfig file (None: ~/.kube/config); InvalidConfig
    naming the file when it is missing, unreadable or not a kubeconfig."""
    where = f"kubeconfig {path}" if path else "kubeconfig (~/.kube/config)"
    if path and not os.path.isfile(path):
        raise errors.InvalidConfig(f"{where}: no such file")
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=cfg)
    except OSError as e:
        raise errors.InvalidConfig(f"{where}: {e.strerror or e}") from e
    except kubernetes.config.ConfigException as e:
        raise errors.InvalidConfig(f"{where}: {(str(e).strip() or 'invalid').splitlines()[0]}") from e
    except yaml.YAMLError as e:
        raise errors.InvalidConfig(f"{where}: not valid YAML") from e
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise errors.InvalidConfig(f"{where}: not a kubeconfig (expected a YAML mapping with clusters, "
                                   f"users and contexts)") from e
    cfg.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return cfg


def _in_cluster_configuration(host_override: str | None) -> kubernetes.client.Configuration:
    """The client configuration of a pod's service account (``host_override``: another API server URL)."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except (kubernetes.config.ConfigException, OSError) as e:
        raise errors.InvalidConfig(f"in-cluster configuration: {e}") from e
    if host_override:
        cfg.host = host_override
    cfg.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return cfg


class Kube:
    """A thin, typed-error wrapper over the API client, speaking dicts."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, request_timeout: float = 15.0) -> None:
        self._api = api_client
        self._timeout = request_timeout

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> Kube:
        """Raises :class:`errors.InvalidConfig` naming the file when it is missing, unreadable
        or not a kubeconfig (the client library's own errors never reach a caller)."""
        return cls(kubernetes.client.ApiClient(_kubeconfig_configuration(path, context)))

    @classmethod
    def in_cluster(cls, host_override: str | None = None) -> Kube:
        """In a pod.  ``host_override`` (https://host:port) serves nodes that cannot reach the
        Service ClusterIP before the CNI is up (e.g. the EKS public endpoint)."""
        return cls(kubernetes.client.ApiClient(_in_cluster_configuration(host_override)))

    @classmethod
    def auto(cls, kubeconfig: str | None = None, host_override: str | None = None) -> Kube:
        if kubeconfig:
            return cls.from_kubeconfig(kubeconfig)
        if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(
            "/var/run/secrets/kubernetes.io/serviceaccount/token"
        ):
            return cls.in_cluster(host_override)
        return cls.from_kubeconfig(os.environ.get("KUBECONFIG"))

    @property
    def host(self) -> str:
        return str(self._api.configuration.host)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    # ---- raw request --------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> JSON:
        """One request; the decoded JSON body."""
        data = self._send(method, path, query=query, body=body, content_type=content_type, timeout=timeout).read()
        return cast(JSON, json.loads(data)) if data else {}

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        """One request; the client's response object, its status checked, its body not read."""
        request = self._api.param_serialize(
            method,
            path,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(*request, _request_timeout=timeout if timeout is not None else self._timeout)
        if not 200 <= response.status <= 299:
            response.read()  # type: ignore[no-untyped-call]
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response

    # ---- CRUD -------------------------------------------------------------------------------

    @_translate
    def get(self, res: Resource, name: str, namespace: str | None = None) -> JSON:
        return self._request("GET", res.path(namespace, name))

    @_translate
    def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[builtins.list[JSON], str]:
        """All objects (following continue tokens) and the list's resourceVersion."""
        items: builtins.list[JSON] = []
        cont: str | None = None
        while True:
            page = self._request(
                "GET",
                res.path(namespace),
                query={"labelSelector": label_selector, "fieldSelector": field_selector, "limit": 500,
                       "continue": cont},
            )
            for item in page.get("items", []):
                item.setdefault("apiVersion", res.api_version)
                item.setdefault("kind", res.kind)
                items.append(item)
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                return items, str(page.get("metadata", {}).get("resourceVersion", ""))

    @_translate
    def create(self, res: Resource, body: JSON, namespace: str | None = None) -> JSON:
        return self._request("POST", res.path(namespace), body=body, query=_STRICT)

    @_translate
    def replace(self, res: Resource, body: JSON, namespace: str | None = None) -> JSON:
        return self._request("PUT", res.path(namespace, body["metadata"]["name"]), body=body, query=_STRICT)

    @_translate
    def patch_merge(self, res: Resource, name: str, patch: JSON, namespace: str | None = None) -> JSON:
        return self._request(
            "PATCH", res.path(namespace, name), body=patch, content_type="application/merge-patch+json", query=_STRICT
        )

    @_translate
    def patch_json(self, res: Resource, name: str, ops: builtins.list[JSON], namespace: str | None = None) -> JSON:
        return self._request(
            "PATCH", res.path(namespace, name), body=ops, content_type="application/json-patch+json", query=_STRICT
        )

    @_translate
    def patch_status(self, res: Resource, name: str, patch: JSON, namespace: str | None = None) -> JSON:
        return self._request(
            "PATCH",
            res.path(namespace, name, "status"),
            body=patch,
            content_type="application/merge-patch+json",
            query=_STRICT,
        )

    @_translate
    def replace_status(self, res: Resource, body: JSON, namespace: str | None = None) -> JSON:
        return self._request("PUT", res.path(namespace, body["metadata"]["name"], "status"), body=body, query=_STRICT)

    @_translate
    def delete(self, res: Resource, name: str, namespace: str | None = None) -> JSON:
        return self._request("DELETE", res.path(namespace, name))

    def apply(self, res: Resource, body: JSON, namespace: str | None = None) -> JSON:
        """Create, or replace the spec of an existing object (keeping its resourceVersion)."""
        try:
            return self.create(res, body, namespace)
        except errors.AlreadyExists:
            current = self.get(res, body["metadata"]["name"], namespace)
            merged = dict(body)
            merged["metadata"] = {**body["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
            return self.replace(res, merged, namespace)

    def update_status(
        self,
        res: Resource,
        name: str,
        mutate: Callable[[JSON], JSON | None],
        namespace: str | None = None,
        *,
        attempts: int = 8,
    ) -> JSON | None:
        """Read-modify-write of ``status`` with optimistic concurrency.

        ``mutate`` gets the current object and returns the new ``status`` (or None for "no
        change").  A 409 Conflict re-reads and calls ``mutate`` again, so concurrent writers never
        lose each other's updates.
        """
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(errors.Conflict),
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.02, max=0.5),
            reraise=True,
        ):
            with attempt:
                current = self.get(res, name, namespace)
                status = mutate(current)
                if status is None or status == current.get("status"):
                    return current
                body = dict(current)
                body["status"] = status
                return self.replace_status(res, body, namespace)
        return None  # pragma: no cover - reraise=True

    # ---- watch --------------------------------------------------------------------------------

    def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
        on_open: Callable[[Any], None] | None = None,
    ) -> Iterator[WatchEvent]:
        """One watch request from ``resource_version``; ends when the server closes it.

        Raises :class:`errors.Gone` when the version is too old (the caller must relist).
        ``on_open`` receives the streaming response once it is open (so another thread can shut
        it down to end a blocked read: see :meth:`Informer.stop`).
        """
        try:
            response = self._send(
                "GET",
                res.path(namespace),
                query={
                    "watch": "true",
                    "resourceVersion": resource_version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": timeout_seconds,
                    "labelSelector": label_selector,
                    "fieldSelector": field_selector,
                },
                timeout=(10.0, timeout_seconds + 30.0),
            ).response
        except ApiException as e:
            raise _map_api_exception(e) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise errors.Temporary(f"API server unreachable: {e}") from e
        if on_open is not None:
            on_open(response)
        try:
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                if not line:
                    continue
                event = json.loads(line)
                etype, obj = event.get("type"), event.get("object", {})
                if etype == "ERROR":
                    code = int(obj.get("code", 0))
                    if code == 410:
                        raise errors.Gone(obj.get("message", "resourceVersion too old"), status=410)
                    raise errors.Temporary(f"watch error {code}: {obj.get('message')}", status=code)
                yield WatchEvent(etype, obj)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise errors.Temporary(f"watch stream broke: {e}") from e
        finally:
            response.release_conn()

    # ---- events -------------------------------------------------------------------------------

    def emit_event(
        self,
        regarding: JSON,
        reason: str,
        note: str,
        *,
        type_: str = "Normal",
        action: str = "Reconcile",
        component: str = "wirekube",
        namespace: str = "default",
    ) -> None:
        """Record an events.k8s.io/v1 Event about ``regarding`` (best effort, never raises)."""
        meta = regarding.get("metadata", {})
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name', 'wirekube')}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "eventTime": _now(),
            "reportingController": f"wirekube.io/{component}",
            "reportingInstance": f"{component}-{socket.gethostname()}"[:128],
            "action": action,
            "reason": reason,
            "note": note[:1024],
            "type": type_,
            "regarding": {
                "apiVersion": regarding.get("apiVersion", ""),
                "kind": regarding.get("kind", ""),
                "name": meta.get("name", ""),
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
        }
        try:
            self.create(EVENTS, body, namespace)
        except errors.ApiError as e:
            logger.warning("could not record event {} on {}: {}", reason, meta.get("name"), e)


# --------------------------------------------------------------------------------------------
# Informer
# --------------------------------------------------------------------------------------------

EventHandler = Callable[[str, JSON], None]


class Informer:
    """Keeps a local cache of one resource current, calling ``on_event(type, obj)`` per change.

    list -> watch from the list's resourceVersion -> on a clean end, watch again from the last
    seen version (bookmarks keep it fresh) -> on 410 Gone, relist and synthesise the difference
    (ADDED/MODIFIED/DELETED) against the cache -> on any other failure, back off exponentially
    (``backoff_initial`` doubling to ``backoff_max``) and resume.  ``on_event`` runs on the
    informer's thread; exceptions in it are logged and do not stop the informer.
    """

    def __init__(
        self,
        kube: Kube,
        res: Resource,
        on_event: EventHandler | None = None,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout_seconds: int = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self._kube = kube
        self.resource = res
        self._on_event = on_event
        self._namespace = namespace
        self._selector = label_selector
        self._field_selector = field_selector
        self._watch_timeout = watch_timeout_seconds
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._lock = threading.Lock()
        self._cache: dict[str, JSON] = {}
        self._rv = ""
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self.relists = 0
        self.reconnects = 0
        self.last_error: errors.ApiError | None = None
        """The last failure to list or watch (None once a list succeeded again)."""
        self._response: Any = None

    # -- public ---------------------------------------------------------------------------------

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.resource.plural}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and wait for the thread; an open watch is shut down, not waited out."""
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # already closed or never read: nothing to end
                (getattr(response, "shutdown", None) or response.close)()
        if self._thread is not None:
            self._thread.join(timeout)

    def _opened(self, response: Any) -> None:
        self._response = response
        if self._stop.is_set():  # stop() ran between the request and now
            with contextlib.suppress(Exception):
                (getattr(response, "shutdown", None) or response.close)()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    @property
    def cache(self) -> dict[str, JSON]:
        """A snapshot copy of the cache: name (or namespace/name) -> object."""
        with self._lock:
            return dict(self._cache)

    @property
    def resource_version(self) -> str:
        return self._rv

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _key(obj: JSON) -> str:
        meta = obj.get("metadata", {})
        ns = meta.get("namespace")
        return f"{ns}/{meta['name']}" if ns else str(meta["name"])

    def _emit(self, etype: str, obj: JSON) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(etype, obj)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the informer
            logger.exception("informer {} handler failed on {}", self.resource.plural, etype)

    def _relist(self) -> None:
        items, rv = self._kube.list(self.resource, self._namespace, label_selector=self._selector,
                                    field_selector=self._field_selector)
        fresh = {self._key(o): o for o in items}
        with self._lock:
            old = self._cache
            self._cache = fresh
            self._rv = rv
        for key, obj in fresh.items():
            prev = old.get(key)
            if prev is None:
                self._emit("ADDED", obj)
            elif prev.get("metadata", {}).get("resourceVersion") != obj.get("metadata", {}).get("resourceVersion"):
                self._emit("MODIFIED", obj)
        for key, obj in old.items():
            if key not in fresh:
                self._emit("DELETED", obj)
        self.relists += 1
        self.last_error = None
        self._synced.set()

    def _apply(self, ev: WatchEvent) -> None:
        rv = ev.object.get("metadata", {}).get("resourceVersion")
        if ev.type == "BOOKMARK":
            if rv:
                self._rv = rv
            return
        key = self._key(ev.object)
        with self._lock:
            if ev.type == "DELETED":
                self._cache.pop(key, None)
            else:
                self._cache[key] = ev.object
            if rv:
                self._rv = rv
        self._emit(ev.type, ev.object)

    def _run(self) -> None:
        delay = self._backoff_initial
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                for ev in self._kube.watch(
                    self.resource,
                    self._rv,
                    self._namespace,
                    label_selector=self._selector,
                    field_selector=self._field_selector,
                    timeout_seconds=self._watch_timeout,
                    on_open=self._opened,
                ):
                    if self._stop.is_set():
                        return
                    self._apply(ev)
                    delay = self._backoff_initial
            except errors.Gone:
                logger.info("informer {}: resourceVersion {} expired, relisting", self.resource.plural, self._rv)
                need_list = True
            except errors.ApiError as e:
                if self._stop.is_set():
                    return  # stop() shut the watch down
                self.reconnects += 1
                self.last_error = e
                logger.warning(
                    "informer {}: {} ({}); retrying in {:.1f}s", self.resource.plural, type(e).__name__, e, delay
                )
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self._backoff_max)
            except Exception:  # noqa: BLE001 - keep the informer alive whatever happens
                self.reconnects += 1
                logger.exception("informer {}: unexpected failure; retrying in {:.1f}s", self.resource.plural, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self._backoff_max)


# --------------------------------------------------------------------------------------------
# Leader election
# --------------------------------------------------------------------------------------------


def _parse_time(text: str | None) -> float:
    if not text:
        return 0.0
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class LeaderElector:
    """Lease-based leader election, like client-go's leaderelection with a Lease lock.

    Call :meth:`try_acquire_or_renew` every ``retry_period``; it returns True while this identity
    holds the lease.  A holder that cannot renew within ``renew_deadline`` must stop acting as
    leader (``is_leader`` turns False) before another candidate may take over after
    ``lease_duration``.
    """

    def __init__(
        self,
        kube: Kube,
        name: str,
        namespace: str,
        *,
        identity: str | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kube = kube
        self.name = name
        self.namespace = namespace
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self._clock = clock
        self._last_renew = 0.0
        self._leader = False

    @property
    def is_leader(self) -> bool:
        return self._leader and self._clock() - self._last_renew < self.renew_deadline

    def _stamp(self) -> str:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def try_acquire_or_renew(self) -> bool:
        try:
            self._leader = self._attempt()
        except errors.ApiError as e:
            logger.warning("leader election {}/{}: {}", self.namespace, self.name, e)
            if not self.is_leader:
                self._leader = False
        if self._leader:
            self._last_renew = self._clock()
        return self._leader

    def _attempt(self) -> bool:
        now = self._stamp()
        try:
            lease = self._kube.get(LEASES, self.name, self.namespace)
        except errors.NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": int(self.lease_duration),
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            try:
                self._kube.create(LEASES, body, self.namespace)
                return True
            except errors.AlreadyExists:
                return False
        spec = lease.get("spec", {})
        holder = spec.get("holderIdentity")
        expired = self._clock() > _parse_time(spec.get("renewTime")) + float(
            spec.get("leaseDurationSeconds", self.lease_duration)
        )
        if holder not in (None, "", self.identity) and not expired:
            return False
        new_spec = dict(spec)
        new_spec["holderIdentity"] = self.identity
        new_spec["leaseDurationSeconds"] = int(self.lease_duration)
        new_spec["renewTime"] = now
        if holder != self.identity:
            new_spec["acquireTime"] = now
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions", 0)) + 1
        lease["spec"] = new_spec
        try:
            self._kube.replace(LEASES, lease, self.namespace)
        except errors.Conflict:
            return False
        return True

    def release(self) -> None:
        """Give the lease up at once (graceful shutdown) so a standby takes over quickly."""
        if not self._leader:
            return
        try:
            lease = self._kube.get(LEASES, self.name, self.namespace)
            if lease.get("spec", {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                self._kube.replace(LEASES, lease, self.namespace)
        except errors.ApiError as e:
            logger.warning("leader election: release failed: {}", e)
        self._leader = False
