"""Endpoint reflection: publish the direct endpoint that works when it differs from the published one.

"Published" is a node's own ``spec.endpoint``: the only endpoint an agent may write (the
admission policy lets an agent write no WireKubePeer but its own). The evidence comes from the
other side: a peer whose WireGuard talks to us *directly and healthily* sees the address our
packets really come from (WireGuard roams to the source of authenticated packets). So:

* **observer** (:func:`observation`): for every peer on an established, currently receiving,
  direct path, if the engine's endpoint for that peer differs from the peer's ``spec.endpoint``,
  report it in our ``status.observedEndpoints[peer]``;
* **subject** (:func:`reflect`): when every peer that reports us agrees on one endpoint, and it
  passes the guards, that endpoint is what we publish (``endpointDiscoveryMethod: reflection``).

Guards (the issue's two, plus the conservative ones that make them meaningful):

1. never a loopback address (a relayed peer's WireGuard endpoint is a 127.0.0.1 proxy), nor an
   unspecified, multicast or link-local one;
2. never public -> private: a public published endpoint is not replaced by a private one (a peer
   on our LAN sees our LAN address; publishing it would cut off everyone outside);
3. only without a STUN answer: when STUN from the WireGuard port found the endpoint, that mapping
   is the one every destination shares, and a peer seeing us elsewhere means the mapping depends
   on the destination (a symmetric NAT, or a second node behind one masquerading NAT whose port
   was taken): nothing single to publish. Reflection is for STUN-less nodes (no STUN servers,
   STUN filtered while peers get through), which otherwise publish an address without the NAT's
   port (IMDS, ExternalIP, InternalIP);
4. observations must agree, and a node classified symmetric never reflects;
5. observers skip LAN paths (``direct-lan``) and loopback-proxied paths (relay, birthday).

Pure module: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from wirekube.models import Endpoint, IPAddress, NatType

PRIVATE_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
"""RFC 1918, RFC 6598 (CGNAT) and IPv6 ULA. Everything else routable counts as public (the lab's
"internet" uses 198.18.0.0/15, which Python's ``is_private`` calls private: not used here)."""


def is_private(ip: IPAddress) -> bool:
    return any(ip.version == n.version and ip in n for n in PRIVATE_RANGES)


def usable(ip: IPAddress) -> bool:
    """An address a remote node could send to at all (guard 1)."""
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local)


def observation(published: Endpoint | None, engine_endpoint: Endpoint | None, *, direct: bool,
                healthy: bool, lan_path: bool) -> Endpoint | None:
    """Observer side: the endpoint to report for a peer, or None.

    ``direct``: we use the direct path to it; ``healthy``: something arrived over it recently;
    ``lan_path``: we deliberately use its LAN endpoint (same public address).
    """
    if not (direct and healthy) or lan_path or engine_endpoint is None:
        return None
    if not usable(engine_endpoint.ip) or engine_endpoint == published:
        return None
    return engine_endpoint


def reflect(published: Endpoint | None, observed: Iterable[Endpoint], own_nat: NatType,
            stun_endpoint: Endpoint | None = None) -> tuple[Endpoint | None, str]:
    """Subject side: (endpoint to publish instead of ``published``, or None; why not, for logs).

    ``stun_endpoint``: what STUN from the WireGuard port found, if anything (guard 3)."""
    seen = set(observed)
    if not seen:
        return None, "no peer reports a different endpoint"
    if stun_endpoint is not None:
        return None, f"STUN found {stun_endpoint}: a different view is a per-destination mapping"
    if own_nat is NatType.SYMMETRIC:
        return None, "symmetric NAT: the mapping is per destination"
    if len(seen) > 1:
        return None, "peers disagree: " + ", ".join(sorted(map(str, seen)))
    (candidate,) = seen
    if candidate == published:
        return None, "already published"
    if not usable(candidate.ip):
        return None, f"{candidate} is not a usable address"
    if published is not None and not is_private(published.ip) and is_private(candidate.ip):
        return None, f"{candidate} is private and the published {published} is public"
    return candidate, ""
