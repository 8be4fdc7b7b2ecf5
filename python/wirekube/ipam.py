"""Deterministic mesh address allocation.

Every node's overlay address is derived from its name, so that it is the same on every restart
and can be computed by anyone without coordination:

    slot = FNV-1a-32(node name, UTF-8) mod (number of usable hosts in meshCIDR)
    address = network address + 1 + slot

The network and broadcast addresses are never handed out (meshCIDR must therefore be /30 or
shorter; the CRD enforces a prefix between /8 and /30).

Collisions.  Hashing into a finite range collides by the birthday bound: with ``n`` nodes in a
range of ``h`` hosts the chance of at least one collision is about ``1 - exp(-n^2 / 2h)``, i.e.
~50% for 300 nodes in a /16 and near certainty for 1,000.  So collisions are handled, not hoped
away:

* An address, once published as the first entry of a node's ``WireKubePeer.spec.allowedIPs``,
  is *sticky*: the agent reuses it on restart instead of re-hashing.
* A new node starts at its hash slot and probes linearly (wrapping, skipping network and
  broadcast) to the first address no other peer claims (:func:`choose_mesh_ip`).
* Two nodes that pick the same address at the same moment are settled by
  :func:`conflict_winner`: the claim with the oldest ``creationTimestamp`` wins (ties broken by
  name); the loser's agent sees it lost and moves to its next free address.

Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193
MAX_PREFIX = 30
MIN_PREFIX = 8


class AddressSpaceExhausted(ValueError):
    """Every usable address of meshCIDR is claimed."""


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32-bit (http://www.isthe.com/chongo/tech/comp/fnv/)."""
    h = FNV32_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV32_PRIME) & 0xFFFFFFFF
    return h


def parse_mesh_cidr(cidr: str) -> ipaddress.IPv4Network:
    """Parse and check a meshCIDR: IPv4, canonical, prefix /8 to /30."""
    net = ipaddress.ip_network(cidr, strict=True)
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError(f"meshCIDR {cidr!r} must be IPv4")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise ValueError(
            f"meshCIDR {cidr!r} must have a prefix length between /{MIN_PREFIX} and /{MAX_PREFIX}"
        )
    return net


def usable_hosts(net: ipaddress.IPv4Network) -> int:
    return net.num_addresses - 2


def hash_slot(node_name: str, net: ipaddress.IPv4Network) -> int:
    return fnv1a_32(node_name.encode("utf-8")) % usable_hosts(net)


def slot_address(net: ipaddress.IPv4Network, slot: int) -> ipaddress.IPv4Address:
    return net.network_address + 1 + (slot % usable_hosts(net))


def mesh_ip(node_name: str, cidr: str | ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The hash address of ``node_name`` in ``cidr``, ignoring any claims (see choose_mesh_ip)."""
    net = parse_mesh_cidr(cidr) if isinstance(cidr, str) else cidr
    return slot_address(net, hash_slot(node_name, net))


def choose_mesh_ip(
    node_name: str,
    cidr: str | ipaddress.IPv4Network,
    claimed: Mapping[ipaddress.IPv4Address, str],
) -> ipaddress.IPv4Address:
    """The address ``node_name`` should use given the addresses other peers already claim.

    ``claimed`` maps an address to the name of the peer claiming it.  An address claimed by
    ``node_name`` itself counts as free for it.  Probing is linear from the hash slot.
    """
    net = parse_mesh_cidr(cidr) if isinstance(cidr, str) else cidr
    hosts = usable_hosts(net)
    start = hash_slot(node_name, net)
    for step in range(hosts):
        addr = slot_address(net, start + step)
        owner = claimed.get(addr)
        if owner is None or owner == node_name:
            return addr
    raise AddressSpaceExhausted(f"no free address left in {net} for node {node_name!r}")


def conflict_winner(claims: Iterable[tuple[str, str]]) -> str:
    """Of several peers claiming one address, the one that keeps it.

    ``claims`` holds ``(creationTimestamp, name)`` pairs (RFC 3339 timestamps sort as strings);
    the oldest wins, then the smallest name.
    """
    return min(claims)[1]
