"""What every WireGuard engine offers, and the plain data it speaks.

Pure module: dataclasses and a Protocol, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from wirekube.models import Endpoint, IPNetwork


@dataclass(frozen=True)
class WgPeerConfig:
    """The configuration WireKube sets for one WireGuard peer (allowed_ips sorted)."""

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    persistent_keepalive: int = 0


@dataclass(frozen=True)
class WgPeerState:
    """One peer as the engine reports it: configuration plus counters."""

    config: WgPeerConfig
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float = 0.0
    """Unix time of the latest handshake, 0.0 for never."""


@dataclass(frozen=True)
class WgDeviceState:
    """The device as the engine reports it.  ``public_key`` is None while no private key is set."""

    public_key: str | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: Mapping[str, WgPeerState] = field(default_factory=dict)


@dataclass(frozen=True)
class SetDevice:
    """Set device-wide values; ``None`` leaves a value unchanged."""

    private_key: bool = False
    """True: (re)install the node's private key (the op never carries key material)."""
    listen_port: int | None = None
    fwmark: int | None = None


@dataclass(frozen=True)
class PutPeer:
    """Create or update one peer; only the flagged parts are written."""

    config: WgPeerConfig
    create: bool
    set_endpoint: bool = True
    set_allowed_ips: bool = True
    set_keepalive: bool = True


@dataclass(frozen=True)
class RemovePeer:
    public_key: str


WgOp = SetDevice | PutPeer | RemovePeer


def net_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def sorted_nets(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The canonical order of AllowedIPs (so configurations compare equal)."""
    return tuple(sorted(set(nets), key=net_sort_key))


class WireGuardEngine(Protocol):
    """One WireGuard device, whichever implementation runs it."""

    name: str
    ifname: str

    def ensure_device(self) -> bool:
        """Make sure the device exists; True when it had to be created (all state is new)."""

    def get(self) -> WgDeviceState:
        """The device's current configuration and per-peer counters."""

    def apply(self, ops: Sequence[WgOp], private_key: str) -> None:
        """Write ``ops`` in one transaction where the engine allows it."""

    def set_on_restart(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the device had to be recreated behind the caller's back."""

    def close(self) -> None:
        """Stop supervising.  The device and any daemon keep running (dataplane stays up)."""
