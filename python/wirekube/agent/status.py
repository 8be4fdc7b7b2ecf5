"""What the agent publishes in its own WireKubePeer's status.  Pure: ``now`` is passed in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from wirekube.agent.plan import HANDSHAKE_FRESH_SECONDS, Desired, PeerPath
from wirekube.agent.wg.base import WgDeviceState
from wirekube.models import PeerStatus, Transport, TransportMode


def own_status(
    desired: Desired,
    wg: WgDeviceState,
    paths: Mapping[str, PeerPath],
    now: float,
    previous: PeerStatus,
) -> PeerStatus:
    """connected, transportMode, peerTransports and lastHandshake from the engine's view.

    natType and endpointDiscoveryMethod belong to endpoint discovery, engine and conditions to
    whoever decorates the status: all are carried over.
    """
    handshakes = [s.last_handshake for k, s in wg.peers.items() if k in desired.peers and s.last_handshake > 0]
    latest = max(handshakes, default=0.0)
    transports = {
        name: paths.get(name, PeerPath()).transport for key, name in desired.peer_names.items() if key in desired.peers
    }
    return PeerStatus(
        connected=latest > 0 and now - latest < HANDSHAKE_FRESH_SECONDS,
        nat_type=previous.nat_type,
        transport_mode=transport_mode(transports.values()),
        peer_transports=dict(sorted(transports.items())),
        endpoint_discovery_method=previous.endpoint_discovery_method,
        last_handshake=rfc3339(latest) if latest else "",
        engine=previous.engine,
        conditions=previous.conditions,
    )


def transport_mode(transports: object) -> TransportMode | None:
    kinds = set(transports)  # type: ignore[call-overload]
    if not kinds:
        return None
    if kinds == {Transport.DIRECT}:
        return TransportMode.DIRECT
    if kinds == {Transport.RELAY}:
        return TransportMode.RELAY
    return TransportMode.MIXED


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(int(ts), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
