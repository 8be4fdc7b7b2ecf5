"""The incremental planner against the from-scratch one, and the event-driven diff against the full one.

The property: after any sequence of peer additions, changes and removals, mesh, node and path
changes, ``IncrementalPlanner.plan`` returns exactly ``plan`` for the same inputs, and
``diff_since(previous, desired, ...)`` on a dataplane that holds ``previous`` returns exactly
``diff(desired, ...)``.  The generators draw from small pools of keys, mesh IPs, timestamps and
entries so that duplicate keys, mesh IP conflicts, overlapping and identical AllowedIPs, entries
covering other peers' mesh IPs and excluded ranges happen all the time.
"""

from __future__ import annotations

import base64
import ipaddress
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from wirekube.agent import incremental, planfull
from wirekube.agent import plan as P
from wirekube.agent.plan import IncrementalPlanner, LinkState, LocalFacts, Observed, PeerPath, Route, Rule
from wirekube.agent.wg.base import WgDeviceState, WgPeerState
from wirekube.models import Endpoint, LocalSubnetPolicy, Mesh, MeshSpec, Peer, PeerSpec, RoutingSpec, Transport

NOW = 1_700_000_000.0
CIDR = ipaddress.IPv4Network("10.255.0.0/16")
NAMES = [f"p{i}" for i in range(12)]


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


ME_KEY = key(1)
KEYS = [key(n) for n in range(1, 9)] + ["not-a-key"]  # key(1) is this node's own key
MESH_IPS = [f"10.255.0.{i}/32" for i in range(1, 9)]  # 10.255.0.1 is this node's usual mesh IP
EXTRA = [
    "10.20.0.0/24", "10.20.0.0/24", "10.20.0.0/16", "10.20.0.0/17", "10.21.0.0/24",
    "10.255.0.0/29", "10.255.0.4/30", "10.255.0.6/32", "10.255.1.0/24",  # inside meshCIDR
    "192.168.1.0/24", "192.168.1.1/32", "192.168.0.0/16",  # this node's LAN and address
    "203.0.113.0/24",  # contains the API server
    "127.0.0.0/8", "0.0.0.0/0", "0.0.0.0/1", "198.51.100.0/24", "fd00:1::/64", "fd00:1::/64",
]
TIMES = ["", "2025-01-01T00:00:01Z", "2025-01-01T00:00:02Z", "2025-01-01T00:00:03Z"]
EXCLUDES = [(), (net("10.20.0.0/18"),), (net("10.20.0.0/24"), net("198.51.100.128/25"))]
ROUTINGS = [
    RoutingSpec(),
    RoutingSpec(allow_default_route=True),
    RoutingSpec(local_subnet_policy=LocalSubnetPolicy.ROUTE),
]


def make_mesh(routing: RoutingSpec, excludes: tuple[ipaddress.IPv4Network, ...], mtu: int = 1420) -> Mesh:
    return Mesh("default", MeshSpec(mesh_cidr=CIDR, mtu=mtu, routing=replace(routing, exclude_cidrs=excludes)))


FACTS = LocalFacts(
    name="me",
    public_key=ME_KEY,
    addresses=(ipaddress.ip_address("192.168.1.1"),),
    subnets=(net("192.168.1.0/24"),),
    api_server_ips=(ipaddress.ip_address("203.0.113.10"),),
)
OTHER_FACTS = replace(FACTS, subnets=(net("192.168.2.0/24"),))


def random_peer(rng: random.Random, name: str) -> Peer:
    entries: list[str] = []
    if rng.random() < 0.9:
        entries.append(rng.choice(MESH_IPS))
        entries += rng.sample(EXTRA, rng.choice([0, 0, 1, 1, 2, 3]))
    endpoint = Endpoint.parse(f"192.0.2.{rng.randint(1, 3)}:51820") if rng.random() < 0.8 else None
    spec = PeerSpec(rng.choice(KEYS), endpoint, tuple(net(e) for e in entries), rng.choice([25, 25, 10]))
    return Peer(name, spec, creation_timestamp=rng.choice(TIMES), resource_version=str(rng.random()))


def random_own(rng: random.Random) -> Peer | None:
    if rng.random() < 0.15:
        return None
    ip = rng.choice(["10.255.0.1/32", "10.255.0.1/32", "10.255.0.2/32"])
    return Peer("me", PeerSpec(ME_KEY, None, (net(ip),)), creation_timestamp="2025-01-01T00:00:00Z")


def random_path(rng: random.Random) -> PeerPath:
    return rng.choice([
        PeerPath(),
        PeerPath(None, 1, Transport.DIRECT),
        PeerPath(Endpoint.parse("127.0.0.1:40001"), 1, Transport.RELAY),
        PeerPath(Endpoint.parse("192.168.1.77:51820"), None, Transport.DIRECT),
    ])


def converged(d: P.Desired) -> Observed:
    """What a node looks like after ``d`` was applied and nothing else happened."""
    return Observed(
        link=LinkState(True, d.link.mtu, True, frozenset({d.link.address}) if d.link.address else frozenset(),
                       dict(d.link.sysctls)),
        wg=WgDeviceState(d.public_key, d.listen_port, d.fwmark,
                         {k: WgPeerState(c, last_handshake=NOW - 10) for k, c in d.peers.items()}),
        rules=tuple(sorted(d.rules, key=str)) + (Rule(4, 0, 255), Rule(4, 32766, 254)),
        routes=tuple(sorted(d.routes, key=str)),
    )


class World:
    """The inputs, the incremental planner, and the checks after every step."""

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self.own: Peer | None = Peer("me", PeerSpec(ME_KEY, None, (net("10.255.0.1/32"),)),
                                     creation_timestamp="2025-01-01T00:00:00Z")
        self.mesh = make_mesh(RoutingSpec(), ())
        self.facts = FACTS
        self.paths: dict[str, PeerPath] = {}
        self.planner = IncrementalPlanner()
        self.previous: P.Desired | None = None
        self.steps = 0

    def inputs(self) -> list[Peer]:
        return [*self.peers.values(), *([self.own] if self.own else [])]

    def check(self, rng: random.Random | None = None) -> P.Desired:
        peers = self.inputs()
        if rng is not None:
            rng.shuffle(peers)  # the order of the input never matters
        got = self.planner.plan(self.mesh, peers, self.facts, self.paths)
        want = P.plan(self.mesh, peers, self.facts, self.paths)
        assert got == want, f"after {self.steps} steps"
        assert got.skipped == want.skipped and got.dropped == want.dropped  # order too
        if self.previous is not None:
            observed = converged(self.previous)
            full = P.diff(got, observed, NOW)
            since = P.diff_since(self.previous, got, observed.link, observed.wg, observed.rules, NOW)
            assert since == full, f"after {self.steps} steps"
        assert P.diff(got, converged(got), NOW) == ()  # a converged node gets no operations
        assert P.diff_since(got, got, *_parts(converged(got)), NOW) == ()
        self.previous = got
        self.steps += 1
        return got

    def step(self, rng: random.Random) -> None:
        r = rng.random()
        if r < 0.35 or not self.peers:
            name = rng.choice(NAMES)
            self.peers[name] = random_peer(rng, name)  # add or replace
        elif r < 0.55:
            del self.peers[rng.choice(sorted(self.peers))]
        elif r < 0.65:
            name = rng.choice(sorted(self.peers))
            p = self.peers[name]  # a status-only change: new object, same planning inputs
            self.peers[name] = replace(p, resource_version=str(rng.random()))
        elif r < 0.72:
            name = rng.choice(sorted(self.peers))
            p = self.peers[name]
            what = rng.randrange(4)
            if what == 0:
                spec = replace(p.spec, endpoint=Endpoint.parse(f"192.0.2.{rng.randint(1, 9)}:51820"))
            elif what == 1:
                spec = replace(p.spec, public_key=rng.choice(KEYS))
            elif what == 2 and p.spec.allowed_ips:
                spec = replace(p.spec, allowed_ips=(net(rng.choice(MESH_IPS)), *p.spec.allowed_ips[1:]))
            else:
                spec = p.spec
                p = replace(p, creation_timestamp=rng.choice(TIMES))
            self.peers[name] = replace(p, spec=spec)
        elif r < 0.82:
            self.paths[rng.choice(NAMES)] = random_path(rng)
            if rng.random() < 0.3:
                self.paths.pop(rng.choice(NAMES), None)
        elif r < 0.88:
            self.mesh = make_mesh(rng.choice(ROUTINGS), rng.choice(EXCLUDES), rng.choice([1420, 1380]))
        elif r < 0.94:
            self.own = random_own(rng)
        else:
            self.facts = rng.choice([FACTS, OTHER_FACTS])


def _parts(o: Observed) -> tuple[LinkState, WgDeviceState, tuple[Rule, ...]]:
    return o.link, o.wg, o.rules


@pytest.mark.parametrize("seed", range(8))
def test_random_sequences_match_the_full_plan(seed: int) -> None:
    rng = random.Random(seed)
    world = World()
    for _ in range(250):
        world.step(rng)
        world.check(rng)
    assert world.steps == 250


class PlannerMachine(RuleBasedStateMachine):
    """The same property, with hypothesis choosing (and shrinking) the sequence of events."""

    @initialize(seed=st.integers(0, 2**32))
    def start(self, seed: int) -> None:
        self.world = World()
        self.rng = random.Random(seed)

    @rule(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32))
    def put_peer(self, name: str, seed: int) -> None:
        self.world.peers[name] = random_peer(random.Random(seed), name)

    @rule(name=st.sampled_from(NAMES))
    def remove_peer(self, name: str) -> None:
        self.world.peers.pop(name, None)

    @rule(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32))
    def set_path(self, name: str, seed: int) -> None:
        self.world.paths[name] = random_path(random.Random(seed))

    @rule(routing=st.sampled_from(ROUTINGS), excludes=st.sampled_from(EXCLUDES))
    def change_mesh(self, routing: RoutingSpec, excludes: tuple[ipaddress.IPv4Network, ...]) -> None:
        self.world.mesh = make_mesh(routing, excludes)

    @rule(seed=st.integers(0, 2**32))
    def change_own(self, seed: int) -> None:
        self.world.own = random_own(random.Random(seed))

    @invariant()
    def same_as_full_plan(self) -> None:
        if hasattr(self, "world"):
            self.world.check(self.rng)


PlannerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPlannerMachine = PlannerMachine.TestCase


# ------------------------------------------------------------------ conflicts decided by others


def peer(name: str, k: int, *entries: str, ts: str) -> Peer:
    return Peer(name, PeerSpec(key(k), Endpoint.parse("192.0.2.1:51820"), tuple(net(e) for e in entries)),
                creation_timestamp=ts)


ME = Peer("me", PeerSpec(ME_KEY, None, (net("10.255.0.1/32"),)), creation_timestamp="2025-01-01T00:00:00Z")
MESH = make_mesh(RoutingSpec(), ())


def both(peers: list[Peer], planner: IncrementalPlanner) -> P.Desired:
    got = planner.plan(MESH, [ME, *peers], FACTS)
    assert got == P.plan(MESH, [ME, *peers], FACTS)
    return got


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        (peer("a", 2, "10.255.0.2/32", ts="1"), peer("b", 2, "10.255.0.3/32", ts="2"), "same key as peer 'a'"),
        (peer("a", 2, "10.255.0.2/32", ts="1"), peer("b", 3, "10.255.0.2/32", ts="2"), "already claimed by peer 'a'"),
        (peer("a", 2, "10.255.0.2/32", ts="1"), peer("b", 3, "10.255.0.3/32", "10.255.0.2/31", ts="2"),
         "contains the mesh IP 10.255.0.2 of peer 'a'"),
    ],
)
def test_removing_the_older_peer_unskips_the_younger(a: Peer, b: Peer, reason: str) -> None:
    planner = IncrementalPlanner()
    d = both([a, b], planner)
    assert [s.peer for s in d.skipped] == ["b"] and reason in d.skipped[0].reason
    d = both([b], planner)
    assert d.skipped == () and d.peer_names.get(b.spec.public_key) == "b"
    d = both([a, b], planner)  # and back
    assert [s.peer for s in d.skipped] == ["b"]


def test_removing_the_older_route_owner_gives_the_route_to_the_next() -> None:
    a = peer("a", 2, "10.255.0.2/32", "10.30.0.0/24", ts="1")
    b = peer("b", 3, "10.255.0.3/32", "10.30.0.0/24", ts="2")
    planner = IncrementalPlanner()
    d = both([a, b], planner)
    assert net("10.30.0.0/24") in d.peers[key(2)].allowed_ips
    assert net("10.30.0.0/24") not in d.peers[key(3)].allowed_ips
    assert [(x.peer, x.reason) for x in d.dropped] == [("b", "already routed to an older peer")]
    d = both([b], planner)
    assert net("10.30.0.0/24") in d.peers[key(3)].allowed_ips and d.dropped == ()
    assert Route(net("10.30.0.0/24"), "wire_kube") in d.routes


def test_a_chain_of_conflicts_is_redecided_when_its_head_goes() -> None:
    # a holds 10.255.0.2; b wants it too (skipped) and holds key 3; c uses key 3 as well (valid
    # only while b is skipped).  Removing a makes b valid, which in turn skips c.
    a = peer("a", 2, "10.255.0.2/32", ts="1")
    b = peer("b", 3, "10.255.0.2/32", ts="2")
    c = peer("c", 3, "10.255.0.4/32", ts="3")
    planner = IncrementalPlanner()
    d = both([a, b, c], planner)
    assert [s.peer for s in d.skipped] == ["b"] and d.peer_names[key(3)] == "c"
    d = both([b, c], planner)
    assert [s.peer for s in d.skipped] == ["c"] and d.peer_names[key(3)] == "b"


def test_one_change_redecides_one_peer_and_keeps_the_others_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    peers = [peer(f"n{i}", 0, f"10.255.{1 + i // 200}.{i % 200 + 1}/32", f"10.{100 + i // 200}.{i % 200}.0/24",
                  ts=f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z") for i in range(500)]
    peers = [replace(p, spec=replace(p.spec, public_key=base64.b64encode(i.to_bytes(32, "big")).decode()))
             for i, p in enumerate(peers, start=100)]
    planner = IncrementalPlanner()
    before = both(peers, planner)
    calls: list[str] = []
    real = incremental._local
    monkeypatch.setattr(incremental, "_local", lambda p, *a: calls.append(p.name) or real(p, *a))
    moved = replace(peers[7], spec=replace(peers[7].spec, persistent_keepalive=15))
    after = planner.plan(MESH, [ME, *peers[:7], moved, *peers[8:]], FACTS)
    assert calls == ["n7"]
    changed = [k for k, c in after.peers.items() if c is not before.peers[k]]
    assert changed == [moved.spec.public_key]
    assert after.routes is before.routes  # the very same frozenset: nothing to compare
    ops = P.diff_since(before, after, *_parts(converged(before)), NOW)
    assert [type(o).__name__ for o in ops] == ["PutPeer"]
    monkeypatch.undo()
    assert after == P.plan(MESH, [ME, *peers[:7], moved, *peers[8:]], FACTS)


def test_repeated_names_fall_back_to_the_full_plan() -> None:
    a = peer("a", 2, "10.255.0.2/32", ts="1")
    a2 = peer("a", 3, "10.255.0.3/32", ts="2")
    planner = IncrementalPlanner()
    assert planner.plan(MESH, [ME, a, a2], FACTS) == P.plan(MESH, [ME, a, a2], FACTS)
    assert not planner.warm
    assert both([a], planner).peer_names == {key(2): "a"}


# ------------------------------------------------------------------ the mesh IP index


@settings(max_examples=200, deadline=None)
@given(
    ips=st.lists(st.integers(0, 63), unique=True, max_size=20),
    ranks=st.lists(st.integers(0, 1000), min_size=20, max_size=20),
    prefix=st.integers(26, 32),
    base=st.integers(0, 63),
    skip=st.integers(0, 63),
)
def test_mesh_ip_index_finds_the_oldest_owner_in_range(
    ips: list[int], ranks: list[int], prefix: int, base: int, skip: int
) -> None:
    index = planfull._MeshIps()
    owners = {}
    for i, n in enumerate(ips):
        ip = ipaddress.IPv4Address(f"10.255.0.{n}")
        owners[ip] = ((ranks[i], i), f"o{i}")
        index.add(ip, f"o{i}", (ranks[i], i))
    if ips:
        index.remove(ipaddress.IPv4Address(f"10.255.0.{ips[-1]}"))
        del owners[ipaddress.IPv4Address(f"10.255.0.{ips[-1]}")]
    entry = ipaddress.IPv4Network(f"10.255.0.{base}/{prefix}", strict=False)
    not_ip = ipaddress.IPv4Address(f"10.255.0.{skip}")
    inside = [(rank, ip, name) for ip, (rank, name) in owners.items() if ip in entry and ip != not_ip]
    want = min(inside)[1:] if inside else None
    assert index.oldest_in(entry, "nobody", not_ip) == want
