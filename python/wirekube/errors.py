"""WireKube's own error types.

Nothing outside an adapter sees a raw ``kubernetes`` ``ApiException`` or a netlink error: the
adapters raise these, ``from`` the original.  API errors are sorted into *temporary* (retry after a
delay) and *permanent* (retrying the same request cannot help).
"""

from __future__ import annotations


class WireKubeError(Exception):
    """Base class of every error WireKube raises on purpose."""


class InvalidObject(WireKubeError):
    """A custom resource (or any input document) is malformed.

    ``field`` is the dotted path of the offending field (``spec.allowedIPs[2]``), so the message
    tells the user exactly what to fix.
    """

    def __init__(self, kind: str, name: str, field: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.reason = reason
        where = f"{kind}/{name}" if name else kind
        super().__init__(f"{where}: {field}: {reason}")


class ApiError(WireKubeError):
    """An error answered by (or on the way to) the Kubernetes API server."""

    temporary: bool = False

    def __init__(self, message: str, *, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFound(ApiError):
    """404: the object does not exist."""


class AlreadyExists(ApiError):
    """409 AlreadyExists on create."""


class Conflict(ApiError):
    """409 Conflict: the resourceVersion we wrote against is stale; re-read and retry."""

    temporary = True


class Forbidden(ApiError):
    """403: RBAC or an admission policy refused the request (permanent for this identity)."""


class Unauthorized(ApiError):
    """401: the credentials were rejected."""


class Invalid(ApiError):
    """422 (or 400): the API server's validation rejected the object; the message names the field."""


class Gone(ApiError):
    """410: a watch's resourceVersion is too old; the caller must list again."""


class Temporary(ApiError):
    """5xx, 429, timeouts, refused or reset connections: retry after a delay."""

    temporary = True


class InvalidConfig(WireKubeError, ValueError):
    """A program's configuration cannot be used (a missing or malformed kubeconfig, an unknown
    log level, ...).  Also a ``ValueError``, for callers that validated settings that way."""


class DataplaneError(WireKubeError):
    """A netlink, nftables or WireGuard engine operation failed."""
