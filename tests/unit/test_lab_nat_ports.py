"""The lab's symmetric NAT with a small UDP pool (the birthday attack's test bed)."""

from __future__ import annotations

import pytest

from wirekube.lab import nat
from wirekube.lab.topology import NatKind


def test_symmetric_with_a_port_range_maps_udp_into_it_and_everything_else_as_before() -> None:
    text = nat.router_ruleset(NatKind.SYMMETRIC, "wan0", ports=(20000, 20255))
    lines = [ln.strip() for ln in text.splitlines()]
    ranged = lines.index('oifname "wan0" meta l4proto udp masquerade to :20000-20255 fully-random')
    assert lines[ranged + 1] == 'oifname "wan0" masquerade fully-random'  # TCP (the relay) and ICMP
    without = "".join(ln for ln in text.splitlines(keepends=True) if "masquerade to" not in ln)
    assert without == nat.router_ruleset(NatKind.SYMMETRIC, "wan0")


def test_default_symmetric_is_unchanged_and_ranges_are_checked() -> None:
    assert "masquerade to" not in nat.router_ruleset(NatKind.SYMMETRIC)
    with pytest.raises(ValueError, match="symmetric NAT only"):
        nat.router_ruleset(NatKind.PORT_RESTRICTED_CONE, ports=(20000, 20255))
    for bad in ((20255, 20000), (80, 200), (65000, 70000)):
        with pytest.raises(ValueError, match="port range"):
            nat.router_ruleset(NatKind.SYMMETRIC, ports=bad)
