"""Engine selection.

``select_engine`` honours an explicit choice, and for ``auto`` prefers kernel WireGuard: an
existing interface keeps its engine (a ``wireguard`` link is kernel, a ``tun`` link is
wireguard-go's), otherwise creating a kernel link decides (it fails without the module).
"""

from __future__ import annotations

from loguru import logger

from wirekube.agent.netlink import Netlink
from wirekube.agent.wg.base import WireGuardEngine
from wirekube.agent.wg.kernel import KernelEngine
from wirekube.agent.wg.userspace import UserspaceEngine, UserspaceSettings
from wirekube.errors import DataplaneError
from wirekube.models import Engine


def select_engine(choice: Engine, netlink: Netlink, userspace: UserspaceSettings) -> WireGuardEngine:
    ifname = userspace.ifname
    if choice is Engine.KERNEL:
        return KernelEngine(ifname, netlink)
    if choice is Engine.USERSPACE:
        return UserspaceEngine(userspace)
    link = netlink.link(ifname)
    if link is not None:
        engine: WireGuardEngine = KernelEngine(ifname, netlink) if link.kind == "wireguard" else UserspaceEngine(userspace)
        logger.info("engine {} chosen for existing {} link {}", engine.name, link.kind or "unknown", ifname)
        return engine
    try:
        netlink.create_wireguard_link(ifname)
    except DataplaneError as e:
        logger.info("kernel WireGuard unavailable ({}); using wireguard-go", e)
        return UserspaceEngine(userspace)
    logger.info("engine kernel chosen (created {})", ifname)
    return KernelEngine(ifname, netlink)
