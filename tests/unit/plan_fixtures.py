"""Shared by the planner's unit tests: a mesh, peers, this node's facts, a converged node."""

from __future__ import annotations

import base64
import ipaddress

from wirekube import ipam
from wirekube.agent import plan as P
from wirekube.agent.plan import LinkState, LocalFacts, Observed, PeerPath, Rule
from wirekube.agent.wg.base import WgDeviceState, WgPeerState
from wirekube.models import Endpoint, Mesh, MeshSpec, Peer, PeerSpec, RoutingSpec

CIDR = ipaddress.IPv4Network("10.255.0.0/16")
NOW = 1_700_000_000.0


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def mesh(**routing: object) -> Mesh:
    return Mesh("default", MeshSpec(mesh_cidr=CIDR, routing=RoutingSpec(**routing)))  # type: ignore[arg-type]


def peer(name: str, n: int, *extra: str, ts: str = "", endpoint: str | None = "192.168.1.{n}:51820",
         mesh_ip: str | None = None) -> Peer:
    first = mesh_ip or f"{ipam.mesh_ip(name, CIDR)}/32"
    ep = Endpoint.parse(endpoint.format(n=n)) if endpoint else None
    return Peer(name, PeerSpec(key(n), ep, tuple(net(x) for x in (first, *extra))),
                creation_timestamp=ts or f"2025-01-01T00:00:{n:02d}Z")


ME = peer("me", 1, ts="2025-01-01T00:00:00Z")
FACTS = LocalFacts(
    name="me",
    public_key=key(1),
    addresses=(ipaddress.ip_address("192.168.1.1"),),
    subnets=(net("192.168.1.0/24"),),
    api_server_ips=(ipaddress.ip_address("203.0.113.10"),),
)


def desired(*others: Peer, m: Mesh | None = None, facts: LocalFacts = FACTS,
            paths: dict[str, PeerPath] | None = None) -> P.Desired:
    return P.plan(m or mesh(), [ME, *others], facts, paths)


def converged(d: P.Desired) -> Observed:
    """What the node looks like after ``d`` was applied (and nothing else happened)."""
    return Observed(
        link=LinkState(True, d.link.mtu, True, frozenset({d.link.address}) if d.link.address else frozenset(),
                       dict(d.link.sysctls)),
        wg=WgDeviceState(d.public_key, d.listen_port, d.fwmark,
                         {k: WgPeerState(c, last_handshake=NOW - 10) for k, c in d.peers.items()}),
        rules=tuple(sorted(d.rules, key=str)) + (Rule(4, 0, 255), Rule(4, 32766, 254), Rule(4, 32767, 253)),
        routes=tuple(d.routes),
    )


EMPTY = Observed(LinkState(True, 1420, False), WgDeviceState(), (Rule(4, 0, 255), Rule(4, 32766, 254)), ())
