"""Remove everything WireKube put on a node, and nothing else.

Removed: the WireGuard interface (and the wireguard-go daemon serving it, found through its UAPI
socket), the relay-path process (found through its socket beside it), the rules WireKube owns
(:func:`wirekube.agent.plan.is_wirekube_rule`), every route in table 22347 and the nftables tables
``inet wirekube`` and ``inet wirekube_mss`` (the TCP MSS clamp).  Used by ``wirekubectl cleanup``
(also as an init container or Job).  Idempotent: a second run finds nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from wirekube.agent import nft as nftables
from wirekube.agent import relayproc
from wirekube.agent.netlink import Netlink
from wirekube.agent.plan import is_wirekube_rule
from wirekube.agent.pmtu import MSS_TABLE
from wirekube.agent.wg.userspace import SOCKET_DIR, UserspaceEngine, UserspaceSettings
from wirekube.models import ROUTE_TABLE

NFT_FAMILY = "inet"
NFT_TABLE = "wirekube"


@dataclass
class CleanupReport:
    daemon_stopped: bool = False
    relay_process_stopped: bool = False
    interface_removed: bool = False
    rules_removed: list[str] = field(default_factory=list)
    routes_removed: list[str] = field(default_factory=list)
    nft_table_removed: bool = False

    @property
    def changed(self) -> bool:
        return bool(
            self.daemon_stopped
            or self.relay_process_stopped
            or self.interface_removed
            or self.rules_removed
            or self.routes_removed
            or self.nft_table_removed
        )


def cleanup(ifname: str = "wire_kube", socket_dir: Path = SOCKET_DIR) -> CleanupReport:
    report = CleanupReport()
    report.relay_process_stopped = relayproc.stop_process(relayproc.socket_path(socket_dir))
    engine = UserspaceEngine(UserspaceSettings(ifname=ifname, socket_dir=socket_dir))
    if engine.find_daemon_pid() is not None:
        engine.stop_daemon()
        report.daemon_stopped = True
    with Netlink() as nl:
        report.interface_removed = nl.delete_link(ifname) or report.daemon_stopped
        for route in nl.routes(ROUTE_TABLE):
            nl.del_route(route)
            report.routes_removed.append(str(route))
        for rule in nl.rules():
            if is_wirekube_rule(rule):
                nl.del_rule(rule)
                report.rules_removed.append(str(rule))
    report.nft_table_removed = nftables.delete_table(NFT_FAMILY, NFT_TABLE)
    report.nft_table_removed = nftables.delete_table(NFT_FAMILY, MSS_TABLE) or report.nft_table_removed
    logger.info("cleanup: {}", report)
    return report
