"""``wirekube-agent --once`` plans what the running loop keeps (issue #6).

The running loop's paths come from NAT traversal: the direct keepalive (1 s) on direct peers,
a 127.0.0.1 relay proxy on relayed ones, a LAN endpoint for peers behind the same NAT.  A
one-shot runs no traversal; :func:`wirekube.agent.main.once_paths` must lead the planner to the
same WireGuard configuration, so that ``--once`` against a converged node changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.once_fixtures import FACTS, PEERS, PROXY, SELF, key, mesh
from wirekube.agent import plan as P
from wirekube.agent.main import carried_stun_endpoint, loopback_udp_ports, once_paths
from wirekube.agent.plan import PeerPath
from wirekube.agent.reconcile import Snapshot
from wirekube.agent.traversal import DIRECT_KEEPALIVE, RELAY_KEEPALIVE
from wirekube.agent.wg.base import PutPeer, RemovePeer, WgDeviceState, WgPeerState
from wirekube.models import Endpoint, EndpointDiscovery, RelayMode, Transport

NOW = 1_700_000_000.0


def running_paths(mode: RelayMode) -> dict[str, PeerPath]:
    """What Traversal.paths() hands the planner on a converged node."""
    keepalive = None if mode is RelayMode.NEVER else DIRECT_KEEPALIVE
    out = {"b": PeerPath(None, keepalive, Transport.DIRECT), "d": PeerPath(Endpoint.parse("192.168.1.4:51820"),
                                                                           keepalive, Transport.DIRECT)}
    out["c"] = (PeerPath(PROXY, RELAY_KEEPALIVE, Transport.RELAY) if mode is not RelayMode.NEVER
                else PeerPath(None, None, Transport.DIRECT))
    return out


def converged(mode: RelayMode) -> WgDeviceState:
    """The device the running loop leaves behind."""
    desired = P.plan(mesh(mode), PEERS, FACTS, running_paths(mode))
    return WgDeviceState(key(1), 51820, 0x574B,
                         {k: WgPeerState(cfg, last_handshake=NOW - 5) for k, cfg in desired.peers.items()})


def alive(ep: Endpoint) -> bool:
    return ep == PROXY


def dead(ep: Endpoint) -> bool:
    return False


def peer_ops(mode: RelayMode, paths: dict[str, PeerPath], wg: WgDeviceState) -> list[object]:
    desired = P.plan(mesh(mode), PEERS, FACTS, paths)
    observed = P.Observed(P.LinkState(exists=True), wg, (), ())
    return [op for op in P.diff(desired, observed, NOW) if isinstance(op, (PutPeer, RemovePeer))]


@pytest.mark.parametrize("mode", [RelayMode.AUTO, RelayMode.ALWAYS, RelayMode.NEVER])
def test_once_changes_nothing_on_a_converged_node(mode: RelayMode) -> None:
    wg = converged(mode)
    assert peer_ops(mode, once_paths(mesh(mode), PEERS, "a", wg, alive), wg) == []


def test_without_once_paths_the_one_shot_would_undo_traversal() -> None:
    """The bug: no paths = the relayed peer pulled off its proxy (and, were the traversal keepalive
    not the peers' own 25 s, every peer's keepalive rewritten)."""
    wg = converged(RelayMode.AUTO)
    ops = peer_ops(RelayMode.AUTO, {}, wg)
    assert any(isinstance(op, PutPeer) and op.set_endpoint and op.config.public_key == key(3) for op in ops)


def test_fresh_node_plans_the_direct_keepalive_and_never_a_dead_proxy() -> None:
    paths = once_paths(mesh(RelayMode.AUTO), PEERS, "a", WgDeviceState(), alive)
    assert set(paths) == {"b", "c", "d"}, "never the node itself"
    assert all(p == PeerPath(None, DIRECT_KEEPALIVE, Transport.DIRECT) for p in paths.values())
    # The device still points at a proxy nobody listens on (the agent is gone): direct, not a dead proxy.
    wg = converged(RelayMode.AUTO)
    assert once_paths(mesh(RelayMode.AUTO), PEERS, "a", wg, dead)["c"] == PeerPath(None, DIRECT_KEEPALIVE,
                                                                                  Transport.DIRECT)
    assert once_paths(mesh(RelayMode.AUTO), PEERS, "a", wg, alive)["c"] == PeerPath(PROXY, RELAY_KEEPALIVE,
                                                                                   Transport.RELAY)
    never = once_paths(mesh(RelayMode.NEVER), PEERS, "a", WgDeviceState(), alive)
    assert all(p.keepalive is None for p in never.values())


def test_loopback_udp_ports_reads_proc_net(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "udp").write_text(header +
                                  "  767: 0100007F:DCAE 0100007F:CA6C 01 00000000:00000000 00:00000000 00000000 0 0 1\n"
                                  "12477: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 2\n"
                                  "12478: 0A0000C0:1F90 00000000:0000 07 00000000:00000000 00:00000000 "
                                  "00000000 0 0 3\n")
    assert loopback_udp_ports(tmp_path) == {0xDCAE, 0xCA6C}, "10.0.0.192:8080 is not loopback"
    assert loopback_udp_ports(tmp_path / "missing") == set()


def test_once_keeps_the_stun_endpoint_the_loop_published() -> None:
    snap = Snapshot(mesh(RelayMode.AUTO), PEERS)
    assert carried_stun_endpoint(snap, "a") == (SELF.spec.endpoint, EndpointDiscovery.STUN)
    assert carried_stun_endpoint(snap, "b") == (None, None), "not found by STUN: nothing to carry over"
    assert carried_stun_endpoint(None, "a") == (None, None)
