"""The reconciler's passes against an in-memory dataplane: full passes, event-driven passes, resync."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from wirekube.agent import plan as P
from wirekube.agent import reconcile as R
from wirekube.agent.keys import KeyPair
from wirekube.agent.plan import LinkState, Route, Rule, Skipped
from wirekube.agent.reconcile import Reconciler, ReconcilerSettings, Snapshot
from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgDeviceState, WgOp, WgPeerConfig, WgPeerState
from wirekube.authority import Refusal
from wirekube.errors import DataplaneError
from wirekube.models import Endpoint, IPNetwork, Mesh, MeshSpec, Peer, PeerSpec, PeerStatus

MY_KEY = base64.b64encode(bytes([1]) * 32).decode()
NOW = 1_700_000_000.0


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def peer(name: str, n: int, *extra: str, ip: str | None = None, ts: str = "") -> Peer:
    entries = (ipaddress.ip_network(ip or f"10.255.0.{n}/32"), *(ipaddress.ip_network(e) for e in extra))
    return Peer(name, PeerSpec(key(n), Endpoint.parse(f"192.0.2.{n}:51820"), entries),
                creation_timestamp=ts or f"2025-01-01T00:00:{n:02d}Z")


ME = peer("me", 1)
MESH = Mesh("default", MeshSpec())


class FakeNetlink:
    """Link, rules and table 22347 of one node, in memory."""

    def __init__(self) -> None:
        self.link: LinkState = LinkState(False)
        self.rule_list: list[Rule] = [Rule(4, 0, 255), Rule(4, 32766, 254)]
        self.route_list: list[Route] = []
        self.route_dumps = 0
        self.fail_next_route: bool = False

    def node_addresses(self, exclude_ifname: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (ipaddress.ip_address("192.168.1.1"),), (ipaddress.ip_network("192.168.1.0/24"),)

    def link_state(self, ifname: str, sysctls: Sequence[str]) -> LinkState:
        return self.link

    def rules(self) -> tuple[Rule, ...]:
        return tuple(self.rule_list)

    def routes(self, table: int) -> tuple[Route, ...]:
        self.route_dumps += 1
        return tuple(self.route_list)

    def set_mtu(self, ifname: str, mtu: int) -> None:
        self.link = replace(self.link, mtu=mtu)

    def set_up(self, ifname: str) -> None:
        self.link = replace(self.link, up=True)

    def add_address(self, ifname: str, address: Any) -> None:
        self.link = replace(self.link, addresses=self.link.addresses | {address})

    def del_address(self, ifname: str, address: Any) -> None:
        self.link = replace(self.link, addresses=self.link.addresses - {address})

    def set_sysctl(self, ifname: str, name: str, value: str) -> None:
        self.link = replace(self.link, sysctls={**self.link.sysctls, name: value})

    def add_route(self, route: Route) -> None:
        if self.fail_next_route:
            self.fail_next_route = False
            raise DataplaneError("injected failure")
        self.route_list.append(route)

    def del_route(self, route: Route) -> None:
        self.route_list.remove(route)

    def add_rule(self, rule: Rule) -> None:
        self.rule_list.append(rule)

    def del_rule(self, rule: Rule) -> None:
        self.rule_list.remove(rule)


@dataclass
class FakeEngine:
    netlink: FakeNetlink
    name: str = "fake"
    ifname: str = "wire_kube"
    state: WgDeviceState = field(default_factory=WgDeviceState)
    gets: int = 0
    on_restart: Callable[[], None] | None = None

    def ensure_device(self) -> bool:
        if self.netlink.link.exists:
            return False
        self.netlink.link = LinkState(True, 1500)
        self.netlink.route_list.clear()  # routes leave with their interface
        self.state = WgDeviceState()
        return True

    def get(self) -> WgDeviceState:
        self.gets += 1
        return self.state

    def apply(self, ops: Sequence[WgOp], private_key: str) -> None:
        peers = dict(self.state.peers)
        s = self.state
        for op in ops:
            if isinstance(op, SetDevice):
                s = replace(s, public_key=MY_KEY if op.private_key else s.public_key,
                            listen_port=op.listen_port or s.listen_port, fwmark=op.fwmark or s.fwmark)
            elif isinstance(op, PutPeer):
                old = peers.get(op.config.public_key)
                cur = old.config if old and not op.create else WgPeerConfig(op.config.public_key, None, ())
                cfg = WgPeerConfig(
                    cur.public_key,
                    op.config.endpoint if op.set_endpoint else cur.endpoint,
                    op.config.allowed_ips if op.set_allowed_ips else cur.allowed_ips,
                    op.config.persistent_keepalive if op.set_keepalive else cur.persistent_keepalive,
                )
                peers[cfg.public_key] = WgPeerState(cfg, last_handshake=old.last_handshake if old else 0.0)
            elif isinstance(op, RemovePeer):
                peers.pop(op.public_key, None)
        self.state = replace(s, peers=peers)

    def set_on_restart(self, callback: Callable[[], None]) -> None:
        self.on_restart = callback

    def close(self) -> None:
        pass


class FakeSource:
    def __init__(self, peers: list[Peer], granted: dict[str, tuple[IPNetwork, ...]] | None = None) -> None:
        self.peers = peers
        self.granted = granted
        self.published: list[tuple[PeerStatus, list[Skipped]]] = []
        self.refusals: list[tuple[Refusal, ...]] = []

    def snapshot(self) -> Snapshot:
        return Snapshot(MESH, tuple(self.peers), granted=self.granted)

    def report_refusals(self, refusals: Sequence[Refusal]) -> None:
        self.refusals.append(tuple(refusals))

    def register(self, public_key: str) -> None:
        pass

    def publish(self, status: PeerStatus, skipped: Sequence[Skipped]) -> None:
        self.published.append((status, list(skipped)))

    def own_status(self) -> PeerStatus:
        return self.published[-1][0] if self.published else PeerStatus()


@dataclass
class Agent:
    reconciler: Reconciler
    netlink: FakeNetlink
    engine: FakeEngine
    source: FakeSource
    clock: list[float]

    def once(self, **kw: Any) -> R.Result:
        result = self.reconciler.reconcile_once(**kw)
        assert result is not None
        return result


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Agent:
    netlink = FakeNetlink()
    engine = FakeEngine(netlink)
    monkeypatch.setattr(R, "select_engine", lambda *a: engine)
    source = FakeSource([ME, peer("b", 2), peer("c", 3, "10.50.0.0/24")])
    clock = [100.0]
    rec = Reconciler(ReconcilerSettings("me", resync_seconds=30.0), KeyPair("unused", MY_KEY), source,
                     netlink, clock=lambda: NOW, monotonic=lambda: clock[0])  # type: ignore[arg-type]
    return Agent(rec, netlink, engine, source, clock)


def full_diff(a: Agent) -> tuple[P.Op, ...]:
    """What a from-scratch plan and a full read of the fake dataplane would still change."""
    observed = P.Observed(a.netlink.link, a.engine.state, a.netlink.rules(), tuple(a.netlink.route_list))
    return P.diff(P.plan(MESH, a.source.peers, a.reconciler._facts("wire_kube")), observed, NOW)


def test_first_pass_is_full_and_a_converged_agent_applies_nothing(agent: Agent) -> None:
    first = agent.once()
    assert first.full and len([o for o in first.ops if isinstance(o, PutPeer)]) == 2
    assert full_diff(agent) == ()
    dumps = agent.netlink.route_dumps
    again = agent.once()
    assert not again.full and again.ops == ()
    assert agent.netlink.route_dumps == dumps  # an event pass does not read table 22347
    resync = agent.once(full=True)
    assert resync.full and resync.ops == () and agent.netlink.route_dumps == dumps + 1


def test_one_changed_peer_costs_its_own_operations_only(agent: Agent) -> None:
    agent.once()
    agent.source.peers[2] = peer("c", 3, "10.50.0.0/24", "10.60.0.0/24")
    result = agent.once()
    assert not result.full
    assert [type(o).__name__ for o in result.ops] == ["PutPeer", "AddRoute"]
    assert result.ops[1] == P.AddRoute(Route(ipaddress.ip_network("10.60.0.0/24"), "wire_kube"))
    assert full_diff(agent) == ()


def test_removing_a_peer_unskips_the_one_it_conflicted_with(agent: Agent) -> None:
    b = agent.source.peers[1]
    late = peer("late", 4, ip="10.255.0.2/32", ts="2026-01-01T00:00:00Z")  # wants b's mesh IP
    agent.source.peers.append(late)
    agent.once()
    assert [s.peer for s in agent.source.published[-1][1]] == ["late"]
    assert key(4) not in agent.engine.state.peers
    agent.source.peers.remove(b)
    result = agent.once()
    assert not result.full
    assert PutPeer(result.desired.peers[key(4)], create=True) in result.ops and RemovePeer(key(2)) in result.ops
    assert agent.source.published[-1][1] == []
    assert full_diff(agent) == ()


def test_drift_is_repaired_by_the_periodic_full_pass(agent: Agent) -> None:
    agent.once()
    lost = agent.netlink.route_list.pop()  # deleted behind the agent's back
    assert not agent.once().full  # an event pass trusts what it applied last
    agent.clock[0] += 30.0
    result = agent.once()
    assert result.full and result.ops == (P.AddRoute(lost),)
    assert not agent.once().full  # and the next resync is 30 s away again


def test_a_recreated_device_or_a_failed_pass_makes_the_next_pass_full(agent: Agent) -> None:
    agent.once()
    assert agent.engine.on_restart is not None
    agent.engine.on_restart()
    assert agent.once().full
    agent.source.peers.append(peer("d", 5, "10.70.0.0/24"))
    agent.netlink.fail_next_route = True
    with pytest.raises(DataplaneError, match='injected failure'):
        agent.once()
    result = agent.once()
    assert result.full and P.AddRoute(Route(ipaddress.ip_network("10.70.0.0/24"), "wire_kube")) in result.ops
    assert full_diff(agent) == ()


def test_a_vanished_interface_is_rebuilt_by_a_full_pass(agent: Agent) -> None:
    agent.once()
    agent.netlink.link = LinkState(False)
    result = agent.once()
    assert result.full and len([o for o in result.ops if isinstance(o, P.AddRoute)]) == 3
    assert full_diff(agent) == ()


def test_dry_run_is_full_and_leaves_the_next_pass_event_driven(agent: Agent) -> None:
    agent.once()
    agent.source.peers.append(peer("d", 5))
    dry = agent.once(dry_run=True)
    assert dry.full and any(isinstance(o, PutPeer) and o.create for o in dry.ops)
    assert key(5) not in agent.engine.state.peers
    real = agent.once()
    assert not real.full and PutPeer(real.desired.peers[key(5)], create=True) in real.ops
    assert full_diff(agent) == ()


def test_the_published_status_uses_the_device_read_by_the_pass(agent: Agent) -> None:
    agent.once()
    gets = agent.engine.gets
    agent.once()
    assert agent.engine.gets == gets + 1  # one device read per pass, not two
    status, skipped = agent.source.published[-1]
    assert set(status.peer_transports) == {"b", "c"} and skipped == []


# ---- route authority (wirekube.authority) through the reconciler ------------------------------


def test_ungranted_entries_are_not_routed_and_are_reported(agent: Agent) -> None:
    """With grants from the API server, only granted entries carry traffic; the refused ones are
    told to the source (Events) and, for this node's own peer, put in a RoutesGranted condition."""
    agent.source.granted = {"c": (ipaddress.ip_network("10.50.0.0/16"),)}
    agent.source.peers[0] = peer("me", 1, "172.31.0.0/24")  # this node claims what it was not granted
    agent.source.peers.append(peer("evil", 9, "10.50.0.0/25", "0.0.0.0/1"))  # inside c's grant: not evil's
    result = agent.once()
    routes = {str(op.route.dst) for op in result.ops if isinstance(op, P.AddRoute)}
    assert routes == {"10.255.0.2/32", "10.255.0.3/32", "10.255.0.9/32", "10.50.0.0/24"}
    assert result.desired.peers[key(9)].allowed_ips == (ipaddress.ip_network("10.255.0.9/32"),)
    refused = {(r.peer, str(r.entry)) for r in agent.source.refusals[-1]}
    assert refused == {("evil", "10.50.0.0/25"), ("evil", "0.0.0.0/1"), ("me", "172.31.0.0/24")}
    assert all("WireKubeRouteGrant" in r.fix for r in agent.source.refusals[-1])
    status = agent.source.published[-1][0]
    (c,) = [c for c in status.conditions if c["type"] == R.CONDITION_ROUTES]
    assert c["status"] == "False" and "172.31.0.0/24" in c["message"]
    # The grant arrives: routed, and the condition turns True.
    agent.source.granted = {**agent.source.granted, "me": (ipaddress.ip_network("172.31.0.0/24"),),
                            "evil": (ipaddress.ip_network("10.50.0.0/25"),)}
    result = agent.once()
    assert P.AddRoute(Route(ipaddress.ip_network("10.50.0.0/25"), "wire_kube")) in result.ops
    (c,) = [c for c in agent.source.published[-1][0].conditions if c["type"] == R.CONDITION_ROUTES]
    assert c["status"] == "True"
    # ... and is withdrawn again: so is the route.
    agent.source.granted = {"c": (ipaddress.ip_network("10.50.0.0/16"),)}
    result = agent.once()
    assert P.DelRoute(Route(ipaddress.ip_network("10.50.0.0/25"), "wire_kube")) in result.ops
    assert full_diff_authorized(agent) == ()


def test_a_granted_entry_holding_a_guarded_address_is_not_routed(agent: Agent) -> None:
    """The relay, the API server, a peer's endpoint: never captured, whatever is granted."""
    agent.source.granted = {"c": (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("10.50.0.0/24"))}
    agent.source.peers[2] = peer("c", 3, "10.50.0.0/24", "192.0.2.0/25")  # holds b's endpoint 192.0.2.2
    result = agent.once()
    assert result.desired.peers[key(3)].allowed_ips == tuple(
        ipaddress.ip_network(n) for n in ("10.50.0.0/24", "10.255.0.3/32"))
    (r,) = agent.source.refusals[-1]
    assert r.peer == "c" and r.entry == ipaddress.ip_network("192.0.2.0/25")
    assert "contains 192.0.2.1, the endpoint of peer me" in r.reason  # the lowest guarded address inside


def full_diff_authorized(a: Agent) -> tuple[P.Op, ...]:
    observed = P.Observed(a.netlink.link, a.engine.state, a.netlink.rules(), tuple(a.netlink.route_list))
    snap, _ = a.reconciler._authorize(a.source.snapshot(), a.reconciler._facts("wire_kube"))
    return P.diff(P.plan(MESH, snap.peers, a.reconciler._facts("wire_kube")), observed, NOW)


def test_a_peers_own_endpoint_may_be_its_granted_internal_ip(agent: Agent) -> None:
    """A node without STUN publishes its InternalIP as its endpoint; that address is still its own
    to route (another peer claiming it is refused, as above)."""
    agent.source.granted = {"c": (ipaddress.ip_network("192.0.2.3/32"),)}
    agent.source.peers[2] = peer("c", 3, "192.0.2.3/32")
    result = agent.once()
    assert P.AddRoute(Route(ipaddress.ip_network("192.0.2.3/32"), "wire_kube")) in result.ops
    assert agent.source.refusals[-1] == ()


def test_relay_and_stun_hosts_named_by_dns_are_guarded_by_their_addresses(agent: Agent) -> None:
    """An NLB's DNS name as the relay: its resolved address is never routed, whatever is granted;
    the name is looked up again only after the TTL, and a failed lookup keeps the last answer."""
    from wirekube.agent.main import NamedHostGuard
    from wirekube.models import HostPort, MeshStatus

    answers = {"relay.example.com": (ipaddress.ip_address("10.50.0.9"),)}
    lookups: list[str] = []

    def resolve(host: str) -> tuple[Any, ...]:
        lookups.append(host)
        return answers.get(host, ())

    guard = NamedHostGuard(ttl=300.0, resolve=resolve)
    mesh = replace(MESH, status=MeshStatus(relay_endpoints=(HostPort("relay.example.com", 3478),
                                                             HostPort("198.51.100.7", 3478))))
    (g,) = guard(mesh)
    assert g.address == ipaddress.ip_address("10.50.0.9") and "relay.example.com" in g.what
    answers.clear()
    assert guard(mesh) == (g,) and lookups == ["relay.example.com"]  # cached within the TTL
    agent.reconciler.guarded = lambda _mesh: (g,)
    agent.source.granted = {"c": (ipaddress.ip_network("10.50.0.0/24"),)}
    result = agent.once()
    assert key(3) in result.desired.peers
    assert result.desired.peers[key(3)].allowed_ips == (ipaddress.ip_network("10.255.0.3/32"),)
    (r,) = agent.source.refusals[-1]
    assert "contains 10.50.0.9, the relay relay.example.com:3478" in r.reason
