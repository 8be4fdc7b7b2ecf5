"""The agent's side of WireKubeGateway (see ``wirekube.gateway.contract`` for the contract).

- Clients: :func:`augment_peers` adds ``client_allowed_ips(gateways, me)`` to the AllowedIPs of
  the active gateway peer in the snapshot the planner sees, so those routes also land in table
  22347 (``KubeSource.snapshot`` calls it).
- Gateway peers: :class:`GatewayAgent` runs two threads.  The health thread probes
  ``spec.healthCheck.target`` every ``intervalSeconds`` (TCP connect when it has a port, ICMP
  echo otherwise, bounded by ``timeoutSeconds``) and writes :func:`health_report_patch`.  The
  forwarding thread keeps ip_forward and WireKube's own nftables table ``inet wirekube`` (forward
  accepts between the WireGuard interface and the route CIDRs, SNAT from the mesh to them) in
  line with :func:`forwarding_duty`, acknowledging or withdrawing in ``status.forwarding.<me>``.
  At start it withdraws first (removes the table, writes ``forwarding.<me> = null``).  The
  active peer also holds the gateway's ``spec.virtualIP`` (:mod:`wirekube.agent.vip`).

The pure parts (:func:`duties`, :func:`nft_ruleset`, :func:`augment_peers`) have no I/O.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from wirekube.agent import nft as nftables
from wirekube.agent.netlink import SYSCTL_ROOT
from wirekube.agent.vip import VirtualIPs
from wirekube.errors import ApiError, InvalidObject
from wirekube.gateway.contract import (
    ForwardingDuty,
    client_allowed_ips,
    forwarding_ack_patch,
    forwarding_duty,
    health_report_patch,
    rfc3339,
)
from wirekube.models import Gateway, HealthCheck, HealthReport, IPNetwork, Peer, gateway_from_cr

NFT_FAMILY = "inet"
NFT_TABLE = "wirekube"
IP_FORWARD = SYSCTL_ROOT / "ipv4" / "ip_forward"
RP_FILTER_ALL = SYSCTL_ROOT / "ipv4" / "conf" / "all" / "rp_filter"


# ------------------------------------------------------------------------------------------ pure


def parse_gateways(objs: Iterable[Mapping[str, Any]]) -> list[Gateway]:
    out: list[Gateway] = []
    for obj in objs:
        try:
            out.append(gateway_from_cr(obj))
        except InvalidObject as e:
            logger.debug("ignoring invalid WireKubeGateway: {}", e)
    return out


def augment_peers(peers: Sequence[Peer], gateways: Iterable[Gateway], me: str) -> tuple[Peer, ...]:
    """``peers`` with each active gateway peer's AllowedIPs extended by the routes this client uses."""
    extra = client_allowed_ips(gateways, me)
    if not extra:
        return tuple(peers)
    out = []
    for p in peers:
        add = [r for r in extra.get(p.name, ()) if r not in p.spec.allowed_ips]
        if add and p.spec.allowed_ips:  # a passive peer (no AllowedIPs) has no WireGuard entry to extend
            p = dataclasses.replace(p, spec=dataclasses.replace(p.spec, allowed_ips=(*p.spec.allowed_ips, *add)))
        out.append(p)
    return tuple(out)


def duties(gateways: Iterable[Gateway], me: str) -> list[ForwardingDuty]:
    """Every gateway ``me`` must forward for now (active or pending), by gateway name."""
    return [d for gw in sorted(gateways, key=lambda g: g.name) if (d := forwarding_duty(gw, me)) is not None]


def _set(nets: Iterable[IPNetwork]) -> str:
    return "{ " + ", ".join(str(n) for n in nets) + " }"


def nft_ruleset(ifname: str, active: Sequence[ForwardingDuty]) -> str:
    """``nft -f`` text that (re)creates table ``inet wirekube`` for ``active`` (empty: delete it).

    The table is first created empty and deleted, so the script is idempotent and atomic: the
    old rules are replaced by the new ones in one transaction.
    """
    head = f"table {NFT_FAMILY} {NFT_TABLE} {{}}\ndelete table {NFT_FAMILY} {NFT_TABLE}\n"
    v4 = [d for d in active if any(r.version == 4 for r in d.routes)]
    if not v4:
        return head
    routes = sorted({r for d in v4 for r in d.routes if r.version == 4},
                    key=lambda n: (int(n.network_address), n.prefixlen))
    lines = [
        f"table {NFT_FAMILY} {NFT_TABLE} {{",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        f'\t\tiifname "{ifname}" ip daddr {_set(routes)} accept',
        f'\t\toifname "{ifname}" ip saddr {_set(routes)} accept',
        "\t}",
    ]
    snat: list[str] = []
    for d in v4:
        nets = [r for r in d.routes if r.version == 4]
        if not d.snat or not nets:
            continue
        action = f"snat ip to {d.snat_source_ip}" if d.snat_source_ip is not None else "masquerade"
        snat.append(f'\t\tiifname "{ifname}" ip daddr {_set(nets)} {action} comment "gateway {d.gateway}"')
    if snat:
        lines += ["\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;", *snat,
                  "\t}"]
    lines.append("}")
    return head + "\n".join(lines) + "\n"


def ack_needed(gw: Gateway, me: str, duty: ForwardingDuty | None) -> dict[str, Any] | None:
    """The forwarding patch to write for ``gw`` now, or None when the status already says it."""
    current = gw.status.forwarding.get(me)
    if duty is None:
        return forwarding_ack_patch(me, None) if current is not None else None
    if (current is not None and current.ready and set(current.routes) == set(duty.routes)
            and current.epoch == duty.epoch):
        return None
    return forwarding_ack_patch(me, duty.routes, duty.epoch)


# ------------------------------------------------------------------------------------------ probes


def probe(hc: HealthCheck) -> tuple[bool, str]:
    """One health check of ``hc.target``: (passed, message)."""
    port = hc.target_port
    host = hc.target_host.strip("[]")
    started = time.monotonic()
    if port is not None:
        try:
            socket.create_connection((host, port), timeout=hc.timeout_seconds).close()
        except OSError as e:
            return False, f"tcp {host}:{port}: {e}"
        return True, f"tcp {host}:{port} ok in {(time.monotonic() - started) * 1000:.0f} ms"
    ping = shutil.which("ping") or "ping"
    try:
        proc = subprocess.run([ping, "-n", "-q", "-c", "1", "-W", str(hc.timeout_seconds), host],
                              capture_output=True, text=True, timeout=hc.timeout_seconds + 2, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"icmp {host}: {e}"
    if proc.returncode != 0:
        return False, f"icmp {host}: no reply within {hc.timeout_seconds}s"
    return True, f"icmp {host} ok in {(time.monotonic() - started) * 1000:.0f} ms"


# ------------------------------------------------------------------------------------------ agent


def nft_table_present() -> bool:
    return nftables.table_present(NFT_FAMILY, NFT_TABLE)


def _write_sysctl(path: Path, value: str, only_if: str | None = None) -> None:
    try:
        current = path.read_text().strip()
        if current != value and (only_if is None or current == only_if):
            path.write_text(value)
    except OSError as e:
        logger.warning("cannot set {} to {}: {}", path, value, e)


class GatewayAgent:
    """Health checks and forwarding duty of this node for every WireKubeGateway naming it."""

    def __init__(
        self,
        kube: Any,
        node_name: str,
        gateway_objects: Callable[[], Iterable[Mapping[str, Any]]],
        ifname: Callable[[], str | None],
        *,
        nft: Callable[[str], None] = nftables.run,
        table_present: Callable[[], bool] = nft_table_present,
        check: Callable[[HealthCheck], tuple[bool, str]] = probe,
        clock: Callable[[], float] = time.time,
        resync_seconds: float = 5.0,
        synced: Callable[[float], bool] = lambda timeout: True,
        vips: VirtualIPs | None = None,
    ) -> None:
        from wirekube import k8s

        self._k8s = k8s
        self.kube = kube
        self.me = node_name
        self._objects = gateway_objects
        self._ifname = ifname
        self._nft = nft
        self._table_present = table_present
        self._check = check
        self._clock = clock
        self._resync = resync_seconds
        self._synced = synced
        self._vips = vips if vips is not None else VirtualIPs(node=node_name)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._installed: str | None = None
        self._failures: dict[str, tuple[str, int]] = {}  # gateway -> (target, consecutive failures)
        self._log = logger.bind(component="gateway-agent", node=node_name)

    def gateways(self) -> list[Gateway]:
        return parse_gateways(self._objects())

    # -- lifecycle

    def start(self) -> GatewayAgent:
        for target, name in ((self._forward_loop, "gateway-forwarding"), (self._health_loop, "gateway-health")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(5)

    # -- forwarding

    def withdraw_all(self) -> None:
        """Start-up: remove the rules and withdraw every acknowledgement this node has left."""
        self._apply_rules([])
        for gw in self.gateways():
            if self.me in gw.spec.peer_refs and gw.status.forwarding.get(self.me) is not None:
                self._patch(gw.name, forwarding_ack_patch(self.me, None))

    def sync_forwarding(self) -> None:
        gws = [g for g in self.gateways() if self.me in g.spec.peer_refs]
        mine = {d.gateway: d for d in duties(gws, self.me)}
        if not self._apply_rules(list(mine.values())):
            return
        # The virtual IP moves only once the forwarding behind it is in place (make-before-break).
        self._vips.sync({d.gateway: d.virtual_ip for d in mine.values() if d.virtual_ip is not None},
                        [g.spec.virtual_ip for g in gws if g.spec.virtual_ip is not None])
        for gw in gws:
            patch = ack_needed(gw, self.me, mine.get(gw.name))
            if patch is not None:
                value = patch["status"]["forwarding"][self.me]
                self._log.info("gateway {}: forwarding {}", gw.name,
                               "withdrawn" if value is None else f"ready for {value['routes']} epoch {value['epoch']}")
                self._patch(gw.name, patch)

    def _apply_rules(self, active: list[ForwardingDuty]) -> bool:
        ifname = self._ifname()
        if active and not ifname:
            return False  # no mesh yet: nothing can be acknowledged
        if active:
            _write_sysctl(IP_FORWARD, "1")
            _write_sysctl(RP_FILTER_ALL, "2", only_if="1")  # strict would drop replies routed by policy
        text = nft_ruleset(ifname or "", active)
        if text == self._installed and (not active or self._table_present()):
            return True  # (a table deleted behind our back, say by `wirekubectl cleanup`, is put back)
        try:
            self._nft(text)
        except OSError as e:
            self._log.error("cannot install gateway rules: {}", e)
            return False
        self._installed = text
        self._log.info("nftables table {} {} {}", NFT_FAMILY, NFT_TABLE,
                       "updated for " + ", ".join(d.gateway for d in active) if active else "removed")
        return True

    def _forward_loop(self) -> None:
        while not self._synced(1.0):  # the start-up withdrawal needs the gateways as they are
            if self._stop.is_set():
                return
        try:
            self.withdraw_all()
        except Exception:  # noqa: BLE001
            self._log.exception("withdrawing forwarding at start failed")
        while not self._stop.is_set():
            self.wake.clear()
            try:
                self.sync_forwarding()
            except Exception:  # noqa: BLE001 - the loop must survive one failed pass
                self._log.exception("gateway forwarding pass failed")
            self.wake.wait(self._resync)

    # -- health

    def check_once(self, gw: Gateway) -> dict[str, Any]:
        hc = gw.spec.health_check
        ok, message = self._check(hc)
        target, count = self._failures.get(gw.name, (hc.target, 0))
        count = 0 if ok or target != hc.target else count + 1
        self._failures[gw.name] = (hc.target, count)
        report = HealthReport(last_check=rfc3339(self._clock()), consecutive_failures=count, message=message)
        return health_report_patch(self.me, report)

    def _health_loop(self) -> None:
        due: dict[str, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            gws = [g for g in self.gateways() if self.me in g.spec.peer_refs and g.spec.health_check.enabled]
            for gw in gws:
                if due.get(gw.name, 0.0) > now:
                    continue
                due[gw.name] = now + gw.spec.health_check.interval_seconds
                try:
                    self._patch(gw.name, self.check_once(gw))
                except Exception:  # noqa: BLE001
                    self._log.exception("health check of gateway {} failed", gw.name)
            for gone in set(due) - {g.name for g in gws}:
                due.pop(gone)
                self._failures.pop(gone, None)
            nxt = min(due.values(), default=now + 1.0)
            self._stop.wait(max(0.05, min(1.0, nxt - time.monotonic())))

    def _patch(self, name: str, patch: dict[str, Any]) -> None:
        try:
            self.kube.patch_status(self._k8s.GATEWAYS, name, patch)
        except ApiError as e:
            self._log.warning("cannot write status of gateway {}: {}", name, e)
