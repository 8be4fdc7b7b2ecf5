"""AWS instance metadata (IMDSv2): the node's public IPv4, as one step of endpoint discovery.

The chain (:func:`wirekube.agent.registration.first_discovered` and ``_endpoint``): the node
annotation ``wirekube.io/endpoint`` > STUN from the WireGuard port > IMDS public IPv4 > the Node's
ExternalIP > its InternalIP.  IMDS gives an address only: it is published with the mesh listen
port (EC2's public IPv4 is a 1:1 NAT that keeps ports).

Protocol (IMDSv2 only)::

    PUT /latest/api/token                 X-aws-ec2-metadata-token-ttl-seconds: 60   -> token
    GET /latest/meta-data/public-ipv4     X-aws-ec2-metadata-token: <token>           -> 1.2.3.4
                                                                                         404: no public IP

IMDSv1 (a plain GET without a token) is never used: when the token PUT is refused the answer is
"refused", not a fallback.  IMDSv1 is the request-forgery-prone mode AWS asks everyone to turn
off (``HttpTokens=required``), and a tokenless GET to 169.254.169.254 on a network that is not
AWS would trust whatever answers there.  Note the PUT's answer has an IP hop limit of 1 by
default: the agent runs with host networking, so it is one hop away.

Lookups use ``http.client`` directly (no proxies from the environment, no redirects) with short
timeouts, and run on :class:`ImdsDiscovery`'s own thread, never in the reconcile loop.  Results
are cached, negative ones too: a node that is not on AWS pays one short timeout at start, then
again after 30 s, 1 min, 2 min, ... and at most once an hour.

``WIREKUBE_IMDS_URL`` / ``--imds-url`` override the base URL (tests point it at 127.0.0.1);
``WIREKUBE_IMDS=off`` / ``--no-imds`` turn it off.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from loguru import logger

from wirekube.models import Endpoint, EndpointDiscovery

DEFAULT_URL = "http://169.254.169.254"
ENV_URL = "WIREKUBE_IMDS_URL"
ENV_SWITCH = "WIREKUBE_IMDS"
"""``off`` (or 0/false/no/disabled) turns IMDS discovery off."""
TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
PUBLIC_IPV4_PATH = "/latest/meta-data/public-ipv4"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105 - a header name
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
TOKEN_TTL_SECONDS = 60
"""The token is used once, right away."""
DEFAULT_TIMEOUT = 0.5

# Outcomes of one lookup.
FOUND = "found"
NO_PUBLIC_IP = "no-public-ip"
"""IMDS answered 404 for public-ipv4: an instance without a public address (definitive)."""
REFUSED = "refused"
"""IMDS is there but would not give a token (or rejected it): no IMDSv1 fallback."""
UNREACHABLE = "unreachable"
"""Nothing answered in time (not on AWS, or the metadata service is off)."""
INVALID = "invalid"
"""An answer that is not a public IPv4 address."""


def switched_off(value: str | None) -> bool:
    return (value or "").strip().lower() in ("off", "0", "false", "no", "disabled")


@dataclass(frozen=True)
class ImdsAnswer:
    outcome: str
    ip: ipaddress.IPv4Address | None = None
    detail: str = ""


def _connection(base_url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    url = urlparse(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"IMDS URL must be http://host[:port], got {base_url!r}")
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout), url.path.rstrip("/")


def _request(base_url: str, method: str, path: str, headers: dict[str, str],
             timeout: float) -> tuple[int, bytes]:
    conn, prefix = _connection(base_url, timeout)
    try:
        conn.request(method, prefix + path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(256)
    finally:
        conn.close()


def public_ipv4(base_url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT) -> ImdsAnswer:
    """One IMDSv2 lookup (token, then public-ipv4).  Never raises for network trouble."""
    try:
        status, body = _request(base_url, "PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)}, timeout)
    except (OSError, http.client.HTTPException) as e:
        return ImdsAnswer(UNREACHABLE, detail=f"token: {_why(e)}")
    token = body.decode("ascii", errors="replace").strip()
    if status != 200 or not token:
        return ImdsAnswer(REFUSED, detail=f"token: HTTP {status} (IMDSv2 only; no tokenless fallback)")
    try:
        status, body = _request(base_url, "GET", PUBLIC_IPV4_PATH, {TOKEN_HEADER: token}, timeout)
    except (OSError, http.client.HTTPException) as e:
        return ImdsAnswer(UNREACHABLE, detail=f"public-ipv4: {_why(e)}")
    if status == 404:
        return ImdsAnswer(NO_PUBLIC_IP, detail="the instance has no public IPv4 address")
    if status in (401, 403):
        return ImdsAnswer(REFUSED, detail=f"public-ipv4: HTTP {status} (token rejected)")
    if status != 200:
        return ImdsAnswer(INVALID, detail=f"public-ipv4: HTTP {status}")
    text = body.decode("ascii", errors="replace").strip()
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        return ImdsAnswer(INVALID, detail=f"public-ipv4: not an IPv4 address: {text[:40]!r}")
    if not ip.is_global:
        return ImdsAnswer(INVALID, detail=f"public-ipv4: {ip} is not a public address")
    return ImdsAnswer(FOUND, ip=ip)


def _why(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(e) or type(e).__name__


@dataclass(frozen=True)
class CachePolicy:
    found_ttl: float = 300.0
    """Re-check a found address (an Elastic IP may move)."""
    no_public_ip_ttl: float = 300.0
    """Re-check an instance without a public address (one may be associated later)."""
    refused_ttl: float = 3600.0
    unreachable_first: float = 30.0
    """Unreachable: retry after this, doubling up to ``unreachable_max``."""
    unreachable_max: float = 3600.0


class ImdsDiscovery:
    """The cached IMDS answer, refreshed on a background thread.

    :meth:`current` never blocks: it returns the last answer (``(Endpoint(ip, 0), IMDS)`` or
    ``(None, None)``).  ``on_change`` is called when the address appears, changes or goes, so
    the agent re-registers at once.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout: float = DEFAULT_TIMEOUT,
        on_change: Callable[[], object] | None = None,
        policy: CachePolicy = CachePolicy(),
        clock: Callable[[], float] = time.monotonic,
        lookup: Callable[[str, float], ImdsAnswer] = public_ipv4,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._on_change = on_change
        self.policy = policy
        self._clock = clock
        self._lookup = lookup
        self._lock = threading.Lock()
        self._answer: ImdsAnswer | None = None
        self._ip: ipaddress.IPv4Address | None = None
        self._due = 0.0
        self._unreachable_delay = 0.0
        self.lookups = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = logger.bind(component="imds")

    # ---------------------------------------------------------------- the cache

    @property
    def answer(self) -> ImdsAnswer | None:
        with self._lock:
            return self._answer

    def current(self) -> tuple[Endpoint | None, EndpointDiscovery | None]:
        with self._lock:
            ip = self._ip
        return (Endpoint(ip, 0), EndpointDiscovery.IMDS) if ip is not None else (None, None)

    def seconds_until_due(self) -> float:
        with self._lock:
            return max(0.0, self._due - self._clock())

    def refresh_if_due(self) -> ImdsAnswer | None:
        """Look up when the cached answer has expired (blocking, at most ~2 timeouts); returns
        the new answer, or None when the cache was still fresh."""
        if self.seconds_until_due() > 0:
            return None
        answer = self._lookup(self.base_url, self.timeout)
        self.lookups += 1
        p = self.policy
        changed = False
        with self._lock:
            before = self._ip
            if answer.outcome == UNREACHABLE:
                self._unreachable_delay = min(p.unreachable_max, self._unreachable_delay * 2 or p.unreachable_first)
                ttl = self._unreachable_delay
                # A known address survives a transient timeout; a never-seen one stays unknown.
            else:
                self._unreachable_delay = 0.0
                self._ip = answer.ip if answer.outcome == FOUND else None
                ttl = {FOUND: p.found_ttl, NO_PUBLIC_IP: p.no_public_ip_ttl}.get(answer.outcome, p.refused_ttl)
            self._answer = answer
            self._due = self._clock() + ttl
            changed = self._ip != before
        if changed:
            self._log.info("IMDS public IPv4: {} ({})", self._ip or "none", answer.detail or answer.outcome)
        else:
            self._log.debug("IMDS: {} {}; next look in {:.0f}s", answer.outcome, answer.detail, ttl)
        if changed and self._on_change is not None:
            self._on_change()
        return answer

    # ---------------------------------------------------------------- the thread

    def start(self) -> ImdsDiscovery:
        self._thread = threading.Thread(target=self._run, name="imds", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_if_due()
            except Exception:  # noqa: BLE001 - discovery must never take the agent down
                self._log.exception("IMDS lookup crashed")
                with self._lock:
                    self._due = self._clock() + self.policy.refused_ttl
            self._stop.wait(max(0.05, self.seconds_until_due()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
