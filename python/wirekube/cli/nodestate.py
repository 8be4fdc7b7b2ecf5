"""What WireKube left on this node, read from the node itself (``wirekubectl doctor --local``).

Reads, never changes: the WireGuard link (and the wireguard-go daemon behind its UAPI socket),
the ip rules WireKube owns or that point at table 22347, the routes in table 22347, the nftables
table ``inet wirekube`` (``nft -j list table inet wirekube``) and whether an agent answers on its
health endpoint (``/healthz`` and ``/readyz`` of ``--metrics-listen``, 127.0.0.1:9090 in the
chart).  Netlink goes through :class:`wirekube.agent.netlink.Netlink` (pyroute2).

``netns``: inspect another network namespace (a name under /run/netns or a path such as
/proc/PID/ns/net).  Everything then runs on a thread that has entered that namespace (setns is
per thread), so the netlink socket, ``nft`` and the health probe all see the namespace while the
rest of the process stays where it is.  The mount namespace is not changed: the wireguard-go
socket is looked up in this process's ``--socket-dir``.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from wirekube.errors import DataplaneError
from wirekube.models import ROUTE_TABLE

DEFAULT_AGENT_URL = "http://127.0.0.1:9090"
NFT_FAMILY = "inet"
NFT_TABLE = "wirekube"
NFT_MSS_TABLE = "wirekube_mss"  # == wirekube.agent.pmtu.MSS_TABLE (a unit test holds them together)
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

T = TypeVar("T")


@dataclass(frozen=True)
class AgentProbe:
    url: str
    healthy: bool
    ready: bool | None = None
    detail: str = ""


@dataclass(frozen=True)
class NftState:
    present: bool | None
    """None: could not tell (nft missing, no permission)."""
    detail: str = ""


@dataclass(frozen=True)
class RuleInfo:
    text: str
    priority: int
    owned: bool
    """WireKube's own (``wirekubectl cleanup`` removes it); False: a foreign rule into table 22347."""


@dataclass(frozen=True)
class NodeState:
    interface: str
    link_kind: str | None
    """"wireguard" (kernel), "tun" (wireguard-go), another kind, or None when absent."""
    link_up: bool = False
    daemon_pid: int | None = None
    rules: tuple[RuleInfo, ...] = ()
    routes: tuple[str, ...] = ()
    nft: NftState = NftState(False)
    mss: NftState = NftState(False)
    """The TCP MSS clamp's table ``inet wirekube_mss`` (path MTU, see wirekube.agent.pmtu)."""
    agent: AgentProbe = AgentProbe(DEFAULT_AGENT_URL, False)
    netns: str = ""


# ---- the health endpoint ------------------------------------------------------------------------


def probe_agent(base_url: str = DEFAULT_AGENT_URL, timeout: float = 2.0) -> AgentProbe:
    """GET /healthz (and /readyz) of an agent's metrics listener."""
    url = urlparse(base_url)
    if url.scheme != "http" or not url.hostname:
        return AgentProbe(base_url, False, detail=f"not an http://host:port URL: {base_url!r}")
    try:
        health = _get(url.hostname, url.port or 80, "/healthz", timeout)
    except (OSError, http.client.HTTPException) as e:
        return AgentProbe(base_url, False, detail=f"nothing answers on {base_url}/healthz: {e or type(e).__name__}")
    if health != 200:
        return AgentProbe(base_url, False, detail=f"{base_url}/healthz answered HTTP {health}")
    try:
        ready = _get(url.hostname, url.port or 80, "/readyz", timeout) == 200
    except (OSError, http.client.HTTPException):
        ready = None
    return AgentProbe(base_url, True, ready, f"{base_url}/healthz answers")


def _get(host: str, port: int, path: str, timeout: float) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read(1024)
        return resp.status
    finally:
        conn.close()


# ---- nftables -----------------------------------------------------------------------------------


def nft_table(nft: str | None = None, table: str = NFT_TABLE) -> NftState:
    nft = nft or shutil.which("nft")
    if nft is None:
        return NftState(None, f"nft is not installed; cannot inspect table {NFT_FAMILY} {table}")
    try:
        done = subprocess.run([nft, "-j", "list", "table", NFT_FAMILY, table],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return NftState(None, f"nft: {e}")
    if done.returncode != 0:
        err = done.stderr.strip().splitlines()
        first = err[0] if err else f"exit {done.returncode}"
        if "No such file or directory" in first:
            return NftState(False, f"no table {NFT_FAMILY} {table}")
        return NftState(None, f"nft list table {NFT_FAMILY} {table}: {first}")
    try:
        items = json.loads(done.stdout).get("nftables", [])
    except (ValueError, AttributeError):
        return NftState(True, f"table {NFT_FAMILY} {table} exists (unreadable JSON)")
    chains = sum(1 for i in items if "chain" in i)
    rules = sum(1 for i in items if "rule" in i)
    return NftState(True, f"table {NFT_FAMILY} {table} with {chains} chains and {rules} rules")


# ---- netlink ------------------------------------------------------------------------------------


def _read_netlink(ifname: str) -> tuple[str | None, bool, tuple[RuleInfo, ...], tuple[str, ...]]:
    from wirekube.agent.netlink import Netlink
    from wirekube.agent.plan import is_wirekube_rule

    with Netlink() as nl:
        link = nl.link(ifname)
        rules = tuple(
            RuleInfo(str(r), r.priority, is_wirekube_rule(r))
            for r in nl.rules()
            if is_wirekube_rule(r) or r.table == ROUTE_TABLE
        )
        routes = tuple(str(r) for r in nl.routes(ROUTE_TABLE))
    return (link.kind or "unknown") if link else None, bool(link and link.up), rules, routes


def _daemon_pid(ifname: str, socket_dir: Path) -> int | None:
    from wirekube.agent.wg.userspace import UserspaceEngine, UserspaceSettings

    return UserspaceEngine(UserspaceSettings(ifname=ifname, socket_dir=socket_dir)).find_daemon_pid()


# ---- the whole picture --------------------------------------------------------------------------


def inspect(
    ifname: str = "wire_kube",
    *,
    agent_url: str = DEFAULT_AGENT_URL,
    netns: str | None = None,
    socket_dir: Path | None = None,
    nft: str | None = None,
) -> NodeState:
    from wirekube.agent.wg.userspace import SOCKET_DIR

    def read() -> NodeState:
        kind, up, rules, routes = _read_netlink(ifname)
        return NodeState(
            interface=ifname,
            link_kind=kind,
            link_up=up,
            daemon_pid=_daemon_pid(ifname, socket_dir or SOCKET_DIR),
            rules=rules,
            routes=routes,
            nft=nft_table(nft),
            mss=nft_table(nft, NFT_MSS_TABLE),
            agent=probe_agent(agent_url),
            netns=netns or "",
        )

    return in_netns(netns, read) if netns else read()


def netns_path(netns: str) -> Path:
    return Path(netns) if "/" in netns else NETNS_DIR / netns


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that entered network namespace ``netns`` (name or path)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            _setns(netns_path(netns))
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)

    t = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _setns(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DataplaneError(f"network namespace {path}: {e.strerror}") from e
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise DataplaneError(f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
