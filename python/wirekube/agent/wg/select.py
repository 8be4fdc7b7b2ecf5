"""Engine selection, and why.

``select_engine`` honours an explicit choice, and for ``auto`` prefers kernel WireGuard: an
existing interface keeps its engine (a ``wireguard`` link is kernel, a ``tun`` link is
wireguard-go's), otherwise creating a kernel link decides (it fails without the module).

Every engine it returns carries ``reason``: why it was picked, for the agent to publish in
``WireKubePeer.status.engine`` (see :func:`describe_engine`) and for ``wirekubectl doctor`` to
explain.  When kernel WireGuard is unavailable the reason says why, asking ``modprobe -n``
(a dry run: nothing is ever loaded) whether the module exists at all.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from wirekube.agent.netlink import Netlink
from wirekube.agent.wg.base import WireGuardEngine
from wirekube.agent.wg.kernel import KernelEngine
from wirekube.agent.wg.userspace import UserspaceEngine, UserspaceSettings
from wirekube.errors import DataplaneError
from wirekube.models import Engine

REQUESTED = "requested"
"""``reason`` of an engine picked because it was asked for (spec.engine or --engine)."""
NO_MODULE = "no wireguard kernel module"
KERNEL_UNAVAILABLE = "kernel WireGuard unavailable"
SYS_MODULE = Path("/sys/module/wireguard")


def module_hint() -> str | None:
    """Why the wireguard module is missing, or None when it is loaded or installed.

    ``modprobe -n`` only resolves the module (nothing is loaded); its error names what is
    missing, e.g. ``modprobe: FATAL: Module wireguard not found in directory /lib/modules/6.1.0``.
    """
    if SYS_MODULE.exists():
        return None
    modprobe = shutil.which("modprobe") or next(
        (str(p) for p in (Path("/usr/sbin/modprobe"), Path("/sbin/modprobe")) if p.exists()), None)
    if modprobe is None:
        return "modprobe not found"
    try:
        done = subprocess.run([modprobe, "-n", "wireguard"], capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"modprobe -n wireguard: {e}"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[0].strip() if lines else f"modprobe -n wireguard exited {done.returncode}"


def unavailable_reason(error: str, hint: str | None) -> str:
    """The reason for falling back to wireguard-go after a kernel link could not be created."""
    if hint is not None:
        return f"{NO_MODULE}: {hint}"
    return f"{KERNEL_UNAVAILABLE}: {error}"


def select_engine(
    choice: Engine,
    netlink: Netlink,
    userspace: UserspaceSettings,
    hint: Callable[[], str | None] = module_hint,
) -> WireGuardEngine:
    ifname = userspace.ifname
    engine: WireGuardEngine
    if choice is Engine.KERNEL:
        return _because(KernelEngine(ifname, netlink), REQUESTED)
    if choice is Engine.USERSPACE:
        return _because(UserspaceEngine(userspace), REQUESTED)
    link = netlink.link(ifname)
    if link is not None:
        if link.kind == "wireguard":
            engine = _because(KernelEngine(ifname, netlink), "")
        else:
            engine = _because(UserspaceEngine(userspace), f"adopted the running wireguard-go interface {ifname}")
        logger.info("engine {} chosen for existing {} link {}", engine.name, link.kind or "unknown", ifname)
        return engine
    try:
        netlink.create_wireguard_link(ifname)
    except DataplaneError as e:
        reason = unavailable_reason(str(e), hint())
        logger.info("kernel WireGuard unavailable ({}); using wireguard-go ({})", e, reason)
        return _because(UserspaceEngine(userspace), reason)
    logger.info("engine kernel chosen (created {})", ifname)
    return _because(KernelEngine(ifname, netlink), "")


def _because(engine: WireGuardEngine, reason: str) -> WireGuardEngine:
    engine.reason = reason  # type: ignore[attr-defined]
    return engine


def describe_engine(engine: object, requested_by: str = "spec.engine") -> str:
    """``status.engine``: "kernel", "userspace (spec.engine=userspace)",
    "userspace (no wireguard kernel module: modprobe: FATAL: ...)".

    ``requested_by`` names where an explicit choice came from (``spec.engine`` or ``--engine``).
    """
    name = str(getattr(engine, "name", "") or "")
    reason = str(getattr(engine, "reason", "") or "")
    if not name:
        return ""
    if reason == REQUESTED:
        reason = f"{requested_by}={name}"
    return f"{name} ({reason})" if reason else name
