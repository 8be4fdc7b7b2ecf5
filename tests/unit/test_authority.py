"""wirekube.authority: the remembered answer is always the fresh one."""

from __future__ import annotations

import base64
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from wirekube.authority import Authorizer, Guarded
from wirekube.models import Endpoint, Mesh, MeshSpec, Peer, PeerSpec

MESH = Mesh("default", MeshSpec())
NETS = ["10.50.0.0/24", "10.50.0.0/16", "10.60.1.0/24", "203.0.113.0/24", "203.0.113.7/32", "0.0.0.0/1",
        "10.255.0.0/16", "192.0.2.0/24"]


def peer(i: int, extra: list[str], endpoint: int) -> Peer:
    return Peer(f"p{i}", PeerSpec(base64.b64encode(bytes([i + 1]) * 32).decode(),
                                  Endpoint.parse(f"192.0.2.{endpoint}:51820"),
                                  (ipaddress.ip_network(f"10.255.0.{i + 1}/32"),
                                   *(ipaddress.ip_network(n) for n in extra))))


step = st.tuples(
    st.lists(st.tuples(st.lists(st.sampled_from(NETS), max_size=3, unique=True), st.integers(1, 9)),
             min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(["p0", "p1", "p2", "p3"]),
                    st.lists(st.sampled_from(NETS), max_size=3, unique=True), max_size=4),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(step, min_size=1, max_size=6))
def test_remembered_answers_equal_fresh_ones(steps: list) -> None:  # type: ignore[type-arg]
    kept = Authorizer()
    for peers_spec, grants, guard_relay in steps:
        peers = [peer(i, extra, ep) for i, (extra, ep) in enumerate(peers_spec)]
        granted = {k: tuple(ipaddress.ip_network(n) for n in v) for k, v in grants.items()}
        extra = (Guarded(ipaddress.ip_address("203.0.113.7"), "the relay"),) if guard_relay else ()
        fresh = Authorizer()
        want = fresh.authorize(MESH, peers, granted, fresh.guarded(MESH, peers, resolved=extra))
        got = kept.authorize(MESH, peers, granted, kept.guarded(MESH, peers, resolved=extra))
        assert got == want
        for p, out in zip(peers, got[0], strict=True):
            assert set(out.spec.allowed_ips) <= set(p.spec.allowed_ips)
            assert out.spec.allowed_ips[0] == p.spec.allowed_ips[0]  # the mesh IP always stays
