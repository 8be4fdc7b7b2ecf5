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
  destination keeps its port while the conntrack entry lives).
- ``full-cone``: masquerade as above, plus a dynamic map ``fullcone`` from each mapped WAN port to
  the LAN address and port behind it, filled from the packet path after source NAT; inbound UDP
  to a mapped port is DNATed to its owner from any source (endpoint-independent filtering).
  Entries expire 180 s after the last outbound packet.
- ``udp-blocked``: masquerade, and UDP leaving through ``wan`` is dropped (counter
  ``udp_blocked``); TCP and ICMP pass.
- ``none``: no table at all; the router only routes (the LAN is public).
"""

from __future__ import annotations

from wirekube.lab.topology import NatKind

TABLE = "wklab"
COUNTER_UNSOLICITED = "unsolicited"
COUNTER_UDP_BLOCKED = "udp_blocked"
FULL_CONE_TIMEOUT_S = 180


def router_ruleset(nat: NatKind, wan: str = "wan") -> str | None:
    """The nft rule set for a router of this NAT kind, or None when it needs none."""
    if nat is NatKind.NONE:
        return None
    masquerade = "masquerade fully-random" if nat is NatKind.SYMMETRIC else "masquerade"
    lines = [
        f"table ip {TABLE} {{",
        f"  counter {COUNTER_UNSOLICITED} {{ }}",
        f"  counter {COUNTER_UDP_BLOCKED} {{ }}",
    ]
    if nat is NatKind.FULL_CONE:
        lines += [
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
    lines += [
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
    lines += [
        "  }",
        "  chain outbound_nat {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{wan}" {masquerade}',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
