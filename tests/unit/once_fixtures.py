"""Shared by the one-shot tests: four peers (this node, direct, relayed, behind the same NAT)."""

from __future__ import annotations

import base64
import ipaddress

from wirekube.agent import plan as P
from wirekube.models import Endpoint, Mesh, MeshSpec, Peer, PeerSpec, PeerStatus, RelayMode, RelaySpec


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def mesh(mode: RelayMode) -> Mesh:
    return Mesh("default", MeshSpec(relay=RelaySpec(mode=mode)))


SELF = Peer("a", PeerSpec(key(1), Endpoint.parse("198.51.100.1:51820"), (ipaddress.ip_network("10.255.0.1/32"),)),
            status=PeerStatus(endpoint_discovery_method="stun"))
DIRECT = Peer("b", PeerSpec(key(2), Endpoint.parse("198.51.100.2:51820"), (ipaddress.ip_network("10.255.0.2/32"),)))
RELAYED = Peer("c", PeerSpec(key(3), Endpoint.parse("198.51.100.3:40000"), (ipaddress.ip_network("10.255.0.3/32"),)))
LAN = Peer("d", PeerSpec(key(4), Endpoint.parse("198.51.100.1:40001"), (ipaddress.ip_network("10.255.0.4/32"),)),
           status=PeerStatus(host_endpoints=("192.168.1.4:51820",)))
PEERS = (SELF, DIRECT, RELAYED, LAN)
PROXY = Endpoint.parse("127.0.0.1:45678")
FACTS = P.LocalFacts("a", key(1))
