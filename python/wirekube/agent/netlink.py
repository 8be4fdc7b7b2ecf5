"""The agent's netlink adapter: the only module that imports pyroute2.

It works in the network namespace of the calling process and speaks WireKube's plain data
(:class:`~wirekube.agent.plan.Rule`, :class:`~wirekube.agent.plan.Route`, ``ipaddress`` objects).
Every pyroute2 / OS error leaves this module as :class:`wirekube.errors.DataplaneError`.

It also owns the interface sysctls (``/proc/sys/net/ipv{4,6}/conf/IF``) and the generic-netlink
side of kernel WireGuard (message encoding here, message *content* in ``wg.kernel``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE, WG_GENL_VERSION, WireGuard, wgmsg

from wirekube.agent.plan import LinkState, Route, Rule
from wirekube.errors import DataplaneError
from wirekube.models import ROUTE_TABLE, IPAddress, IPNetwork

T = TypeVar("T")
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
RT_SCOPE_LINK = 253
RT_SCOPE_UNIVERSE = 0
RTPROT_STATIC = 4
SYSCTL_ROOT = Path(os.environ.get("WIREKUBE_PROC_SYS_NET", "/proc/sys/net"))
"""Where net sysctls are written; in a pod /proc/sys is read-only, so the chart mounts the host's
/proc/sys/net elsewhere and points WIREKUBE_PROC_SYS_NET at it."""
IFF_UP = 0x1

# Rule attributes WireKube never sets: a rule carrying any of them is not WireKube's.
_FOREIGN_RULE_ATTRS = (
    "FRA_SRC",
    "FRA_IIFNAME",
    "FRA_OIFNAME",
    "FRA_UID_RANGE",
    "FRA_IP_PROTO",
    "FRA_SPORT_RANGE",
    "FRA_DPORT_RANGE",
    "FRA_SUPPRESS_IFGROUP",
    "FRA_GOTO",
    "FRA_L3MDEV",
    "FRA_TUN_ID",
)
FR_ACT_TO_TBL = 1


@dataclass(frozen=True)
class LinkInfo:
    index: int
    ifname: str
    kind: str
    """"wireguard" for kernel WireGuard, "tun" for wireguard-go."""
    mtu: int
    up: bool


@contextmanager
def _wrap(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as e:
        raise DataplaneError(f"{what}: {e.args[1] if len(e.args) > 1 else e} (errno {e.code})") from e
    except OSError as e:
        raise DataplaneError(f"{what}: {e}") from e


def _is(e: NetlinkError, *codes: int) -> bool:
    return e.code in codes


class Netlink:
    """rtnetlink in the current network namespace."""

    def __init__(self) -> None:
        with _wrap("open rtnetlink socket"):
            self._ipr = IPRoute()
        self._wg_local = threading.local()
        self._wg_open: weakref.WeakSet[_WgSocket] = weakref.WeakSet()
        self._wg_lock = threading.Lock()

    def close(self) -> None:
        self._ipr.close()
        with self._wg_lock:
            for held in list(self._wg_open):
                _close_quietly(held.wg)
            self._wg_open.clear()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ links

    def link(self, ifname: str) -> LinkInfo | None:
        try:
            msgs = self._ipr.link("get", ifname=ifname)
        except NetlinkError as e:
            if _is(e, errno.ENODEV, errno.ENOENT):
                return None
            raise DataplaneError(f"get link {ifname}: {e}") from e
        msg = msgs[0]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
        return LinkInfo(
            index=msg["index"],
            ifname=ifname,
            kind=kind or "",
            mtu=msg.get_attr("IFLA_MTU") or 0,
            up=bool(msg["flags"] & IFF_UP),
        )

    def create_wireguard_link(self, ifname: str) -> None:
        """Create a kernel WireGuard link; DataplaneError(errno EOPNOTSUPP) without the module."""
        with _wrap(f"create wireguard link {ifname}"):
            self._ipr.link("add", ifname=ifname, kind="wireguard")

    def delete_link(self, ifname: str) -> bool:
        try:
            self._ipr.link("del", ifname=ifname)
            return True
        except NetlinkError as e:
            if _is(e, errno.ENODEV, errno.ENOENT):
                return False
            raise DataplaneError(f"delete link {ifname}: {e}") from e

    def set_mtu(self, ifname: str, mtu: int) -> None:
        with _wrap(f"set mtu {mtu} on {ifname}"):
            self._ipr.link("set", index=self._index(ifname), mtu=mtu)

    def set_up(self, ifname: str) -> None:
        with _wrap(f"set {ifname} up"):
            self._ipr.link("set", index=self._index(ifname), state="up")

    def _index(self, ifname: str) -> int:
        link = self.link(ifname)
        if link is None:
            raise DataplaneError(f"interface {ifname} does not exist")
        return link.index

    def link_state(self, ifname: str, sysctls: Sequence[str]) -> LinkState:
        link = self.link(ifname)
        if link is None:
            return LinkState(exists=False)
        return LinkState(
            exists=True,
            mtu=link.mtu,
            up=link.up,
            addresses=frozenset(a for a in self.addresses(link.index) if not a.ip.is_link_local),
            sysctls={name: self.get_sysctl(ifname, name) for name in sysctls},
        )

    # ------------------------------------------------------------------ addresses

    def addresses(self, index: int | None = None) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        with _wrap("dump addresses"):
            msgs = self._ipr.get_addr(index=index) if index is not None else self._ipr.get_addr()
            for msg in msgs:
                addr = msg.get_attr("IFA_ADDRESS")
                local = msg.get_attr("IFA_LOCAL") or addr
                if local:
                    out.append(ipaddress.ip_interface(f"{local}/{msg['prefixlen']}"))
        return out

    def node_addresses(self, exclude_ifname: str) -> tuple[tuple[IPAddress, ...], tuple[IPNetwork, ...]]:
        """This node's own addresses and connected subnets, except on ``exclude_ifname`` and loopback."""
        skip = {link.index for name in (exclude_ifname, "lo") if (link := self.link(name)) is not None}
        addrs: list[IPAddress] = []
        nets: list[IPNetwork] = []
        with _wrap("dump addresses"):
            for msg in self._ipr.get_addr():
                if msg["index"] in skip:
                    continue
                local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if not local:
                    continue
                iface = ipaddress.ip_interface(f"{local}/{msg['prefixlen']}")
                if iface.ip.is_link_local or iface.ip.is_loopback:
                    continue
                addrs.append(iface.ip)
                if iface.network.prefixlen < iface.network.max_prefixlen:
                    nets.append(iface.network)
        return tuple(addrs), tuple(dict.fromkeys(nets))

    def add_address(self, ifname: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        try:
            self._ipr.addr("add", index=self._index(ifname), address=str(address.ip),
                           prefixlen=address.network.prefixlen)
        except NetlinkError as e:
            if not _is(e, errno.EEXIST):
                raise DataplaneError(f"add address {address} to {ifname}: {e}") from e

    def del_address(self, ifname: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        try:
            # IFA_LOCAL too: with IFA_ADDRESS alone the kernel deletes any address of the same subnet.
            self._ipr.addr("del", index=self._index(ifname), address=str(address.ip), local=str(address.ip),
                           prefixlen=address.network.prefixlen)
        except NetlinkError as e:
            if not _is(e, errno.EADDRNOTAVAIL, errno.ENOENT):
                raise DataplaneError(f"delete address {address} from {ifname}: {e}") from e

    # ------------------------------------------------------------------ sysctls

    def get_sysctl(self, ifname: str, name: str, family: int = 4) -> str:
        try:
            return _sysctl_path(ifname, name, family).read_text().strip()
        except OSError:
            return ""

    def set_sysctl(self, ifname: str, name: str, value: str, family: int = 4) -> None:
        with _wrap(f"set sysctl {name}={value} on {ifname}"):
            _sysctl_path(ifname, name, family).write_text(value)

    # ------------------------------------------------------------------ rules

    def rules(self, families: Sequence[int] = (4, 6)) -> tuple[Rule, ...]:
        out: list[Rule] = []
        with _wrap("dump rules"):
            for family in families:
                for msg in self._ipr.get_rules(family=FAMILIES[family]):
                    out.append(_rule_from_msg(family, msg))
        return tuple(out)

    def add_rule(self, rule: Rule) -> None:
        try:
            self._ipr.rule("add", **_rule_args(rule))
        except NetlinkError as e:
            if not _is(e, errno.EEXIST):
                raise DataplaneError(f"add rule {rule}: {e}") from e

    def del_rule(self, rule: Rule) -> None:
        try:
            self._ipr.rule("del", **_rule_args(rule))
        except NetlinkError as e:
            if not _is(e, errno.ENOENT):
                raise DataplaneError(f"delete rule {rule}: {e}") from e

    # ------------------------------------------------------------------ routes

    def routes(self, table: int = ROUTE_TABLE) -> tuple[Route, ...]:
        names = self._link_names()
        out: list[Route] = []
        with _wrap(f"dump routes of table {table}"):
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in self._ipr.get_routes(family=family, table=table):
                    if msg.get_attr("RTA_TABLE", msg["table"]) != table:
                        continue
                    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")  # noqa: S104 - a route, not a bind
                    net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                    metrics = msg.get_attr("RTA_METRICS")
                    mtu = (metrics.get_attr("RTAX_MTU") if metrics is not None else None) or 0
                    out.append(Route(net, names.get(msg.get_attr("RTA_OIF"), ""), table, mtu))
        return tuple(out)

    def add_route(self, route: Route) -> None:
        with _wrap(f"add route {route}"):
            self._ipr.route(
                "replace",
                dst=str(route.dst),
                oif=self._index(route.dev),
                table=route.table,
                scope=RT_SCOPE_LINK,
                proto=RTPROT_STATIC,
                family=FAMILIES[route.dst.version],
                **({"metrics": {"mtu": route.mtu}} if route.mtu else {}),
            )

    def del_route(self, route: Route) -> None:
        kwargs: dict[str, Any] = {"dst": str(route.dst), "table": route.table, "family": FAMILIES[route.dst.version]}
        for scope in (RT_SCOPE_LINK, RT_SCOPE_UNIVERSE):  # ours are scope link; strays may not be
            try:
                self._ipr.route("del", scope=scope, **kwargs)
                return
            except NetlinkError as e:
                if not _is(e, errno.ESRCH, errno.ENOENT):
                    raise DataplaneError(f"delete route {route}: {e}") from e

    def _link_names(self) -> dict[int, str]:
        with _wrap("dump links"):
            return {m["index"]: m.get_attr("IFLA_IFNAME") for m in self._ipr.get_links()}

    # ------------------------------------------------------------------ kernel WireGuard (generic netlink)

    def wireguard_get(self, ifname: str) -> list[dict[str, Any]]:
        """WG_CMD_GET_DEVICE, decoded into plain nested dicts (see :func:`msg_to_plain`)."""
        return self._with_wg(lambda wg: [msg_to_plain(m) for m in wg.info(ifname)], f"wireguard get {ifname}")

    def wireguard_set(self, attrs: list[list[Any]]) -> None:
        """WG_CMD_SET_DEVICE with ``attrs`` (built by :mod:`wirekube.agent.wg.kernel`)."""

        def send(wg: WireGuard) -> None:
            msg = encode_wg_set(attrs)
            wg.nlm_request(msg, msg_type=wg.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)

        self._with_wg(send, "wireguard set")

    def _with_wg(self, fn: Callable[[WireGuard], T], what: str) -> T:
        """Run ``fn`` on this thread's generic-netlink WireGuard socket, opened on first use.

        Opening one per call resolved the genl family every time: ~40 ms a call on a slow
        (emulated) CPU, against ~6 ms on a kept socket, and traversal reads the device at 10 Hz.
        One socket per thread: pyroute2 keeps its transport per thread, and one socket shared by
        the traversal (reads) and reconcile (writes) threads failed writes with ECONNRESET on a
        real kernel.  A failed call drops the socket, so the next one starts on a fresh one."""
        with _wrap(what):
            held: _WgSocket | None = getattr(self._wg_local, "held", None)
            if held is None:
                held = _WgSocket(WireGuard())
                self._wg_local.held = held
                with self._wg_lock:
                    self._wg_open.add(held)
            try:
                return fn(held.wg)
            except BaseException:
                self._wg_local.held = None
                with self._wg_lock:
                    self._wg_open.discard(held)
                _close_quietly(held.wg)
                raise


class _WgSocket:
    """A thread's generic-netlink WireGuard socket, held only by that thread's local storage: when
    the thread ends, the storage goes and the socket is closed (a finished thread used to keep its
    socket open until :meth:`Netlink.close`)."""

    def __init__(self, wg: WireGuard) -> None:
        self.wg = wg
        weakref.finalize(self, _close_quietly, wg)


def _close_quietly(wg: WireGuard) -> None:
    with contextlib.suppress(Exception):
        wg.close()


def encode_wg_set(attrs: list[list[Any]]) -> wgmsg:
    """A WG_CMD_SET_DEVICE message carrying ``attrs`` (pyroute2 NLA notation), encoded."""
    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"] = attrs
    msg.encode()
    return msg


def decode_wg(data: bytes) -> dict[str, Any]:
    """Decode a WireGuard generic-netlink message into plain nested dicts (tests and get)."""
    msg = wgmsg(data)
    msg.decode()
    return msg_to_plain(msg)


def msg_to_plain(msg: Any) -> dict[str, Any]:
    """pyroute2 NLA tree -> {"ATTR_NAME": plain value}: nested NLAs become dicts (lists for
    arrays), struct NLAs dicts of their fields, keys base64 ``str``."""
    return {slot[0]: _plain(slot[1]) for slot in msg.get("attrs", [])}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    if hasattr(value, "get") and hasattr(value, "keys"):
        if value.get("attrs"):
            return msg_to_plain(value)
        return {k: value[k] for k in value.keys() if k not in ("attrs", "header") and not k.startswith("__")}
    return value


def _sysctl_path(ifname: str, name: str, family: int) -> Path:
    if "/" in ifname or "/" in name or ifname in (".", ".."):
        raise DataplaneError(f"bad sysctl {ifname}/{name}")
    return SYSCTL_ROOT / f"ipv{family}" / "conf" / ifname / name


def _rule_from_msg(family: int, msg: Any) -> Rule:
    dst_text = msg.get_attr("FRA_DST")
    dst = ipaddress.ip_network(f"{dst_text}/{msg['dst_len']}", strict=False) if dst_text else None
    foreign = (
        any(msg.get_attr(a) is not None for a in _FOREIGN_RULE_ATTRS)
        or msg["action"] != FR_ACT_TO_TBL
        or msg["src_len"] != 0
        or msg["tos"] != 0
        or msg.get_attr("FRA_FWMASK") not in (None, 0xFFFFFFFF)
        or msg.get_attr("FRA_SUPPRESS_PREFIXLEN") not in (None, 0xFFFFFFFF)
    )
    return Rule(
        family=family,
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        table=msg.get_attr("FRA_TABLE") or msg["table"],
        fwmark=msg.get_attr("FRA_FWMARK") or 0,
        dst=dst,
        foreign=foreign,
    )


def _rule_args(rule: Rule) -> Mapping[str, Any]:
    args: dict[str, Any] = {"family": FAMILIES[rule.family], "priority": rule.priority, "table": rule.table}
    if rule.fwmark:
        args["fwmark"] = rule.fwmark
        args["fwmask"] = 0xFFFFFFFF
    if rule.dst is not None:
        args["dst"] = str(rule.dst.network_address)
        args["dst_len"] = rule.dst.prefixlen
    return args
