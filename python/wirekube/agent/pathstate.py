"""The data NAT traversal in the agent shares between its parts (see :mod:`wirekube.agent.traversal`).

Plain state, no threads and no I/O: what discovery found, the reconciler's view, each
peer's path state, and the keepalive constants the planner writes into WireGuard.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from wirekube.agent.plan import HANDSHAKE_FRESH_SECONDS
from wirekube.agent.wg.base import WgPeerState
from wirekube.models import Endpoint, EndpointDiscovery, Mesh, NatType, Peer, Transport
from wirekube.traversal import liveness, nat, pathsm

# Failover watches rx counters, so something must come back from every peer in use. WireGuard's
# persistent keepalive cannot promise that (its timer is reset by packets *received* too, and
# nothing answers a keepalive). Instead each agent sends an ICMP echo through the tunnel to every
# peer's mesh IP: the peer's kernel answers, the answer counts as rx, and only a path that works
# both ways keeps rx moving. The rate follows use (10 Hz while a peer carries traffic or is being
# proven, one per 10 s when idle: see wirekube.traversal.liveness); the idle heartbeat also keeps
# NAT mappings open, so the keepalive can be WireGuard's standard 25 s.
DIRECT_KEEPALIVE = 25
RELAY_KEEPALIVE = 25
# A direct path still being opened keeps WireGuard's keepalive at 1 s: both NATs must see
# outgoing packets for the hole to open, and the handshake retries ride on them (with 25 s, a
# third of the lab's pairs passed traffic 10-15 s later). Once proven, the idle heartbeat keeps
# the mappings open.
PUNCH_KEEPALIVE = 1


@dataclass(frozen=True)
class Discovery:
    endpoint: Endpoint | None = None
    method: EndpointDiscovery | None = None
    nat: nat.Classification = nat.Classification(NatType.UNKNOWN)
    udp_blocked: bool = False
    host_endpoints: tuple[str, ...] = ()


@dataclass
class PeerState:
    key: str
    decision: nat.Decision
    path: pathsm.PeerPath
    proxy_port: int = 0
    probing: bool = False
    awaiting_direct_since: float | None = None
    """Set when our own probe moved the peer back to direct, until WireGuard shows the direct
    endpoint: meanwhile the endpoint still at our proxy is our reconcile's lag, not the peer
    reaching us through the relay (a slow agent, e.g. in an emulated VM, flapped on it)."""
    roam_probe_at: float = -1e9
    """When a relayed peer last made us probe early by reaching us directly."""
    live: liveness.Liveness = liveness.Liveness()


@dataclass
class View:
    mesh: Mesh | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    local_addresses: tuple[str, ...] = ()
    own: Peer | None = None


def timing(mesh: Mesh, stall_after: float) -> pathsm.Timing:
    return pathsm.Timing(
        handshake_timeout=float(mesh.spec.relay.handshake_timeout_seconds),
        stall_after=stall_after,
        direct_retry_interval=float(mesh.spec.relay.direct_retry_interval_seconds),
    )


def proven_before(ws: WgPeerState | None, wall: float) -> bool:
    """The device already holds a direct session with this peer that the previous agent had
    proven (its keepalive is the proven one) and that handshook recently."""
    return (ws is not None and ws.config.endpoint is not None and not ws.config.endpoint.ip.is_loopback
            and ws.config.persistent_keepalive == DIRECT_KEEPALIVE and ws.last_handshake > 0
            and wall - ws.last_handshake < HANDSHAKE_FRESH_SECONDS)


def relayed_before(ws: WgPeerState | None) -> bool:
    """The device already sends to this peer through a loopback proxy: the previous agent relayed it
    (the relay path process, which outlives agents, still serves that proxy)."""
    return ws is not None and ws.config.endpoint is not None and ws.config.endpoint.ip.is_loopback


def raw(key: str) -> bytes:
    return base64.b64decode(key)


def urgent(state: PeerState) -> bool:
    """An unproven direct path is heartbeated at the active rate (it also drives the handshake)."""
    return state.path.transport is Transport.DIRECT and not state.path.established
