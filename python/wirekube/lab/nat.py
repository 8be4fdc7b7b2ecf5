"""nftables rule sets that make a lab router behave like each NAT kind.

Pure: returns text for ``nft -f -`` (fed multi-line: some one-line forms do not parse on nft
1.0.6).  Everything lives in the router namespace's own table ``ip wklab``.

What each kind does (WAN interface ``wan``, LAN bridge ``lan``):

- every NAT kind drops unsolicited inbound traffic in the *input and forward* hooks, counted in
  the named counter ``unsolicited``.  Dropping there (before conntrack confirms the new entry)
  matters: if an unsolicited probe were accepted, conntrack would keep its entry and masquerade
  would later pick a different port for the LAN host's own flow to that peer.
- ``port-restricted-cone``: ``masquerade`` keeps the source port when it is free
  (endpoint-independent mapping) and conntrack lets in only replies from the exact address and
  port contacted (address-and-port-dependent filtering).
- ``symmetric``: ``masquerade fully-random``: a new random port for every destination (the same
  destination keeps its port while the conntrack entry lives).  With ``ports=(P1, P2)``
  (:func:`router_ruleset`), UDP is mapped into that range only (``masquerade to :P1-P2
  fully-random``; other protocols as before): a symmetric NAT with a small pool, the kind a
  birthday attack can beat (256 ports: 98% per round with the agent's defaults, see
  ``wirekube.traversal.birthday``), where the full-range one defeats it.
- ``full-cone``: masquerade as above, plus a dynamic map ``fullcone`` from each mapped WAN port to
  the LAN address and port behind it, filled from the packet path after source NAT; inbound UDP
  to a mapped port is DNATed to its owner from any source (endpoint-independent filtering).
  Entries expire 180 s after the last outbound packet.
- ``udp-blocked``: masquerade, and UDP leaving through ``wan`` is dropped (counter
  ``udp_blocked``); TCP and ICMP pass.
- ``proxy-only``: masquerade, and nothing leaves through ``wan`` but TCP to the HTTP proxy
  (``proxy=(address, port)``), the rest dropped (counter ``blocked``): a corporate network.
- ``none``: no NAT and no filtering; the router only routes (the LAN is public).

Every router also has an empty chain ``impair`` (forward hook, before the rest) where
``Lab.cut`` adds drop rules to simulate an outage and ``Lab.restore`` flushes them.
"""

from __future__ import annotations

from wirekube.lab.topology import NatKind

TABLE = "wklab"
IMPAIR_CHAIN = "impair"
COUNTER_UNSOLICITED = "unsolicited"
COUNTER_UDP_BLOCKED = "udp_blocked"
COUNTER_BLOCKED = "blocked"
FULL_CONE_TIMEOUT_S = 180


PROTOCOLS = ("udp", "tcp", "icmp", "all")


def cut_rules(proto: str, peer: str | None, wan: str = "wan") -> str:
    """Rules for ``impair`` that drop ``proto`` crossing the router (only to/from ``peer``, an
    IPv4 address, when given), counted, as text for ``nft -f -``."""
    if proto not in PROTOCOLS:
        raise ValueError(f"protocol {proto!r}: use one of {', '.join(PROTOCOLS)}")
    match = "" if proto == "all" else f"meta l4proto {proto} "
    if peer is None:
        selectors = [f'oifname "{wan}"', f'iifname "{wan}"']
    else:
        selectors = [f"ip daddr {peer}", f"ip saddr {peer}"]
    return "".join(f"add rule ip {TABLE} {IMPAIR_CHAIN} {sel} {match}counter drop\n"
                   for sel in selectors)


def router_ruleset(nat: NatKind, wan: str = "wan", *, ports: tuple[int, int] | None = None,
                   proxy: tuple[str, int] | None = None) -> str:
    """The nft rule set for a router of this NAT kind (``ports``: symmetric only, the UDP pool;
    ``proxy``: proxy-only only, the one address and TCP port that may be reached)."""
    _check_router_options(nat, ports, proxy)
    lines = [
        f"table ip {TABLE} {{",
        f"  chain {IMPAIR_CHAIN} {{",
        "    type filter hook forward priority filter - 10; policy accept;",
        "  }",
    ]
    if nat is NatKind.NONE:
        return "\n".join([*lines, "}"]) + "\n"
    masquerade = "masquerade fully-random" if nat is NatKind.SYMMETRIC else "masquerade"
    lines += [
        f"  counter {COUNTER_UNSOLICITED} {{ }}",
        f"  counter {COUNTER_UDP_BLOCKED} {{ }}",
        f"  counter {COUNTER_BLOCKED} {{ }}",
    ]
    if nat is NatKind.FULL_CONE:
        lines += _full_cone_lines(wan)
    lines += _filter_lines(nat, wan, proxy)
    lines += [
        "  chain outbound_nat {",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    if ports is not None:
        lines.append(f'    oifname "{wan}" meta l4proto udp masquerade to :{ports[0]}-{ports[1]} fully-random')
    lines += [
        f'    oifname "{wan}" {masquerade}',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _check_router_options(nat: NatKind, ports: tuple[int, int] | None, proxy: tuple[str, int] | None) -> None:
    """Raise ValueError unless ``ports`` and ``proxy`` fit this NAT kind (see :func:`router_ruleset`)."""
    if (proxy is not None) != (nat is NatKind.PROXY_ONLY):
        raise ValueError("a proxy-only router needs the proxy's address, and only it does")
    if ports is not None:
        low, high = ports
        if nat is not NatKind.SYMMETRIC:
            raise ValueError(f"a port range applies to symmetric NAT only, not {nat.value}")
        if not 1024 <= low <= high <= 65535:
            raise ValueError(f"port range {low}-{high}: need 1024 <= low <= high <= 65535")


def _full_cone_lines(wan: str) -> list[str]:
    """The full cone's map from mapped WAN port to LAN address and port, filled after source NAT,
    and the inbound DNAT through it."""
    return [
        "  map fullcone {",
        "    type inet_service : ipv4_addr . inet_service",
        "    flags dynamic,timeout",
        f"    timeout {FULL_CONE_TIMEOUT_S}s",
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f'    iifname "{wan}" meta l4proto udp dnat ip to udp dport map @fullcone',
        "  }",
        "  chain record_mapping {",
        "    type filter hook postrouting priority srcnat + 10; policy accept;",
        f'    oifname "{wan}" meta l4proto udp update @fullcone '
        "{ udp sport : ct original ip saddr . ct original proto-src }",
        "  }",
    ]


def _filter_lines(nat: NatKind, wan: str, proxy: tuple[str, int] | None) -> list[str]:
    """The input and forward chains: unsolicited inbound dropped (counted), and what each kind
    keeps from leaving."""
    lines = [
        "  chain inbound {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname "{wan}" ct state established,related accept',
        f'    iifname "{wan}" counter name "{COUNTER_UNSOLICITED}" drop',
        "  }",
        "  chain forwarding {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{wan}" ct state established,related accept',
    ]
    if nat is NatKind.FULL_CONE:
        lines.append(f'    iifname "{wan}" ct status dnat accept')
    lines.append(f'    iifname "{wan}" counter name "{COUNTER_UNSOLICITED}" drop')
    if nat is NatKind.UDP_BLOCKED:
        lines.append(f'    oifname "{wan}" meta l4proto udp counter name "{COUNTER_UDP_BLOCKED}" drop')
    if proxy is not None:
        lines += [f'    oifname "{wan}" ip daddr {proxy[0]} tcp dport {proxy[1]} accept',
                  f'    oifname "{wan}" counter name "{COUNTER_BLOCKED}" drop']
    lines.append("  }")
    return lines


PATH_TABLE = "wklabpath"
"""The table (``netdev``, bound to the WAN device) of :func:`path_ruleset`'s egress chain."""
COUNTER_FRAGMENTS = "fragments"
COUNTER_FRAG_NEEDED = "frag_needed"


def path_ruleset(*, drop_fragments: bool, block_icmp: bool, wan: str = "wan") -> str:
    """Rules that make a router's path hostile to large packets, for ``nft -f -`` (empty: none).

    - ``drop_fragments``: IPv4 fragments are dropped both ways: arriving (prerouting, before
      conntrack reassembles them) and leaving through ``wan`` (the router's own fragments exist
      only after the postrouting hook, so a ``netdev`` egress chain on ``wan`` catches them);
      counted in ``fragments``.
    - ``block_icmp``: ICMP "fragmentation needed" is dropped when the router makes it (output)
      and when it crosses the router (forward); counted in ``frag_needed``.
    """
    if not drop_fragments and not block_icmp:
        return ""
    fragment = "ip frag-off & 0x3fff != 0"
    frag_needed = "icmp type destination-unreachable icmp code frag-needed"
    lines = [f"table ip {TABLE} {{"]
    if drop_fragments:
        lines += [
            f"  counter {COUNTER_FRAGMENTS} {{ }}",
            "  chain path_fragments {",
            "    type filter hook prerouting priority -450; policy accept;",
            f'    {fragment} counter name "{COUNTER_FRAGMENTS}" drop',
            "  }",
        ]
    if block_icmp:
        lines += [f"  counter {COUNTER_FRAG_NEEDED} {{ }}"]
        for hook in ("output", "forward"):
            lines += [
                f"  chain path_icmp_{hook} {{",
                f"    type filter hook {hook} priority filter - 20; policy accept;",
                f'    {frag_needed} counter name "{COUNTER_FRAG_NEEDED}" drop',
                "  }",
            ]
    lines.append("}")
    if drop_fragments:
        lines += [
            f"table netdev {PATH_TABLE} {{",
            "  chain egress_fragments {",
            f'    type filter hook egress device "{wan}" priority filter; policy accept;',
            f"    {fragment} drop",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"
