"""Pure policy for the relay: NAT-probe targets and per-connection rate limits.

No I/O and no clock: callers pass ``now``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

ProbeTargetPolicy = Callable[[ipaddress.IPv4Address, int], "str | None"]
"""Returns why a NATProbe target is refused, or ``None`` to allow it."""

_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def refuse_special_targets(address: ipaddress.IPv4Address, port: int) -> str | None:
    """The production rule: a NAT probe goes only to an ordinary unicast address and port.

    Loopback would let a client make the relay talk to its own services; multicast, broadcast and
    unspecified addresses would spray datagrams; reserved (240/4) is never a real host.
    """
    if port == 0:
        return "port_zero"
    if address.is_loopback:
        return "loopback"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address == _LIMITED_BROADCAST:
        return "broadcast"
    if address.is_reserved:
        return "reserved"
    return None


@dataclass
class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.updated is not None:
            elapsed = max(0.0, now - self.updated)
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
