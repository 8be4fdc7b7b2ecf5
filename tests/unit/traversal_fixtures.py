"""Shared by the traversal unit tests: a Traversal over plain data and a stand-in relay path."""

from __future__ import annotations

import ipaddress
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.fixtures.keys import public_key
from wirekube.agent.pathstate import Discovery, View
from wirekube.agent.traversal import Traversal
from wirekube.models import Endpoint, Mesh, MeshSpec, NatType, Peer, PeerSpec, PeerStatus, RelayMode, RelaySpec
from wirekube.traversal import nat


class FakeRelay:
    eperm_retry = 3.0
    eperm_persistent_after = 10.0

    def __init__(self, up: bool) -> None:
        self.up = up
        self.eperm: list[int] = []
        self.over = "tcp" if up else ""
        self.failure: tuple[str, str] | None = None

    def transport(self) -> str:
        return self.over

    def problem(self) -> tuple[str, str] | None:
        return self.failure

    def connected_relays(self) -> list[tuple[str, int]]:
        return [("198.18.0.10", 3478)] if self.up else []

    def eperm_active(self) -> list[int]:
        return list(self.eperm)


def peer(name: str, nat_type: NatType, ip: str, **status: Any) -> Peer:
    return Peer(name, PeerSpec(public_key(), Endpoint(ipaddress.ip_address(ip), 51820),
                               (ipaddress.ip_network("10.255.0.9/32"),)),
                PeerStatus(nat_type=nat_type, **status))


def traversal(local: NatType, peers: list[Peer], mode: RelayMode = RelayMode.AUTO, relay_up: bool = True) -> Traversal:
    wakes: list[int] = []
    t = Traversal("me", X25519PrivateKey.generate(), public_key(), engine_state=lambda: None,
                  wake=lambda: wakes.append(1))
    t._relay = FakeRelay(relay_up)  # type: ignore[assignment]
    mesh = Mesh("default", MeshSpec(relay=RelaySpec(mode=mode, handshake_timeout_seconds=30)))
    t._view = View(mesh, {p.name: p for p in peers}, ("192.168.1.5",))
    t.discoverer.found = Discovery(nat=nat.Classification(local, "198.51.100.9", 51820))
    t._sync_peers()
    for state in t._peers.values():
        state.proxy_port = 40000 + len(state.key) % 7  # as if the relay path had opened proxies
    return t
