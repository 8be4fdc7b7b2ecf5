"""Per-peer path decisions in the agent: the NAT matrix's choice for each peer, and the planner's overrides.

The choice itself is pure (:func:`wirekube.traversal.nat.choose_path`); this module keeps the owner's
(:class:`~wirekube.agent.traversal.Traversal`) per-peer state in step with the view and turns it into
:class:`~wirekube.agent.plan.PeerPath` overrides.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from wirekube.agent.birthdayrounds import BIRTHDAY_PENDING
from wirekube.agent.pathstate import (
    DIRECT_KEEPALIVE,
    PUNCH_KEEPALIVE,
    RELAY_KEEPALIVE,
    PeerState,
    proven_before,
    relayed_before,
    timing,
)
from wirekube.agent.plan import PeerPath
from wirekube.agent.wg.base import WgDeviceState
from wirekube.models import ANNOTATION_BIRTHDAY, Endpoint, Mesh, Peer, RelayMode, Toggle, Transport
from wirekube.traversal import liveness, nat, pathsm

if TYPE_CHECKING:
    from wirekube.agent.traversal import Traversal


INHERITED_RELAY = "relayed before this agent started: probing direct"


class PathDecisions:
    """Keeps one :class:`~wirekube.agent.pathstate.PeerState` per peer of the view (decided by the
    NAT matrix, the path state machine kept while the decision stands) and answers the planner's
    per-peer endpoint and keepalive. Holds no state of its own: the peers are the owner's."""

    def __init__(self, owner: Traversal) -> None:
        self._t = owner

    @staticmethod
    def _facts_of(peer: Peer) -> nat.NodeFacts:
        ep = peer.spec.endpoint
        return nat.NodeFacts(
            nat_type=peer.status.nat_type,
            public_ip=str(ep.ip) if ep else "",
            udp_blocked=peer.status.udp_blocked,
            has_host_endpoint=bool(peer.status.host_endpoints),
        )

    def _local_facts(self) -> nat.NodeFacts:
        d = self._t.discoverer.found
        return nat.NodeFacts(d.nat.nat_type, d.nat.public_ip, d.udp_blocked, bool(d.host_endpoints))

    def _birthday(self, mesh: Mesh, peer: Peer) -> bool:
        """Birthday attack toward ``peer``: the annotation on either node of the pair decides
        ("disabled" wins), else the mesh. Both agents compute the same answer for the pair."""
        own = self._t._view.own
        values = {peer.annotations.get(ANNOTATION_BIRTHDAY, ""),
                  own.annotations.get(ANNOTATION_BIRTHDAY, "") if own else ""}
        if "disabled" in values:
            return False
        if "enabled" in values:
            return True
        return mesh.spec.birthday_attack is Toggle.ENABLED

    def sync(self) -> None:
        t = self._t
        changed = False
        now = time.monotonic()
        with t._lock:
            mesh = t._view.mesh
            if mesh is None:
                return
            local = self._local_facts()
            device: WgDeviceState | None = None
            if any(n not in t._peers for n in t._view.peers):
                device = t._device_now()
            for name in list(t._peers):
                if name not in t._view.peers:
                    gone = t._peers.pop(name)
                    t.relays.drop_proxy(gone.key)
                    changed = True
            for name, peer in t._view.peers.items():
                decision = nat.choose_path(local, self._facts_of(peer), relay_mode=mesh.spec.relay.mode,
                                           birthday=self._birthday(mesh, peer))
                state = t._peers.get(name)
                if state is None or state.decision != decision or state.key != peer.spec.public_key:
                    path = self._new_path(state, decision, peer, device, now, timing(mesh, t.settings.stall_after),
                                          may_relay=mesh.spec.relay.mode is not RelayMode.NEVER)
                    t._peers[name] = PeerState(peer.spec.public_key, decision, path,
                                               state.proxy_port if state else 0,
                                               live=state.live if state else liveness.Liveness())
                    changed = True
                if mesh.spec.relay.mode is not RelayMode.NEVER and t._peers[name].proxy_port == 0:
                    t.relays.ensure_proxy(name)
            t.relays.retain([s.key for s in t._peers.values()])
            t.birthdays.sync()
        t._report_transitions()
        if changed:
            t._wake()

    @staticmethod
    def _new_path(state: PeerState | None, decision: nat.Decision, peer: Peer, device: WgDeviceState | None,
                  now: float, timing: pathsm.Timing, *, may_relay: bool = True) -> pathsm.PeerPath:
        """The path state machine for a new or newly decided peer (``state``: what it had)."""
        if decision.path is nat.Path.BIRTHDAY:
            # Relayed (traffic flows) while rounds of the birthday attack look for a direct path.
            return pathsm.PeerPath.start_relay(now, BIRTHDAY_PENDING, by_matrix=True, timing=timing)
        if decision.relayed:
            return pathsm.PeerPath.start_relay(now, decision.reason, by_matrix=True, timing=timing)
        if (state is not None and state.decision.path not in (nat.Path.RELAY, nat.Path.BIRTHDAY)
                and state.key == peer.spec.public_key):
            return state.path  # same direct-ish decision: keep the running state machine
        if state is None and device is not None and proven_before(device.peers.get(peer.spec.public_key),
                                                                  time.time()):
            # A restarted agent inherits a working direct session: keep it as proven
            # (no keepalive rewrite, failover armed at once).
            return replace(pathsm.PeerPath.start_direct(now), established=True)
        if (may_relay and state is None and device is not None
                and relayed_before(device.peers.get(peer.spec.public_key))):
            # A restarted agent inherits a relayed session: keep it on the relay, as after a failover,
            # and probe direct at once. Starting direct would move the endpoint off the working proxy
            # for a whole handshake timeout where direct cannot work, and before this agent's first
            # STUN round every peer looks direct-capable (NAT type not yet known).
            return replace(pathsm.PeerPath.start_relay(now, INHERITED_RELAY, by_matrix=False, timing=timing),
                           next_probe_at=now)
        return pathsm.PeerPath.start_direct(now)

    def paths(self) -> dict[str, PeerPath]:
        """Per-peer overrides for the planner."""
        t = self._t
        out: dict[str, PeerPath] = {}
        with t._lock:
            mesh = t._view.mesh
            for name, state in t._peers.items():
                if state.path.transport is Transport.RELAY:
                    if state.proxy_port:
                        out[name] = PeerPath(Endpoint(ipaddress.ip_address("127.0.0.1"), state.proxy_port),
                                             RELAY_KEEPALIVE, Transport.RELAY)
                    continue
                endpoint = None
                won_port = t.birthdays.won_port(name)
                if won_port:
                    endpoint = Endpoint(ipaddress.ip_address("127.0.0.1"), won_port)
                elif state.decision.path is nat.Path.DIRECT_LAN:
                    peer = t._view.peers.get(name)
                    if peer and peer.status.host_endpoints:
                        endpoint = Endpoint.parse(peer.status.host_endpoints[0])
                keepalive: int | None = DIRECT_KEEPALIVE if state.path.established else PUNCH_KEEPALIVE
                if mesh and mesh.spec.relay.mode is RelayMode.NEVER:
                    keepalive = None
                out[name] = PeerPath(endpoint, keepalive, Transport.DIRECT)
        return out
