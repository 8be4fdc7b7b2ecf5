"""The birthday attack end to end: two real agents behind two real symmetric NATs.

A small lab of its own (unique name ``bd<hex>``: API server, relays/STUN, wireguard-go, NAT routers
in namespaces; torn down afterwards): sites ``bda`` and ``bdb``, one node each, both behind the lab's
symmetric NAT, and three STUN servers (so that a 256-port pool is never mistaken for a cone: all
three mappings would have to coincide, p = 1/65536).

1. natTraversal.birthdayAttack is off (the default): the pair is relayed, "peer symmetric and local
   symmetric", and nobody publishes a round.
2. The routers switch to the small-pool option of the lab's symmetric NAT (UDP mapped into 256 ports,
   ``wirekube.lab.nat.router_ruleset(..., ports=...)``) and the mesh enables the attack: the two agents
   agree on a round through their statuses, probe within the bounds, and move the pair onto a direct
   path through each side's loopback proxy, while a 5/s ping over the mesh keeps flowing.
3. UDP between the two routers is cut: the won path stalls, the pair falls back to the relay, the next
   round (no sooner than directRetryIntervalSeconds) fails with "birthday attack failed at <time>";
   once the cut is lifted a later round wins again.
"""

from __future__ import annotations

import calendar
import re
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.lab import running_lab
from tests.fixtures.root import require_root
from tests.fixtures.wait import wait_for
from wirekube import k8s, reports
from wirekube.lab import orchestrate
from wirekube.lab.nat import router_ruleset
from wirekube.lab.net import Lab
from wirekube.lab.plan import IF_WAN
from wirekube.lab.topology import NatKind
from wirekube.traversal import birthday

pytestmark = [pytest.mark.netns, pytest.mark.apiserver]

TOPOLOGY = """
internet:
  relay: 198.18.0.2:3478
  stun: [198.18.0.2:3478, 198.18.0.3:3478, 198.18.0.4:3478]
sites:
  - {name: bda, nat: symmetric, nodes: [{name: bda-1}]}
  - {name: bdb, nat: symmetric, nodes: [{name: bdb-1}]}
"""
A, B = "bda-1", "bdb-1"  # A leads (its name sorts first)
POOL = (20000, 20255)
RETRY = 10
SETTINGS = birthday.BirthdaySettings()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, k8s.Kube, str]]:
    require_root()
    overrides = {"relay": {"directRetryIntervalSeconds": RETRY, "handshakeTimeoutSeconds": RETRY}}
    with running_lab(TOPOLOGY, f"bd{uuid.uuid4().hex[:5]}", tmp_path_factory.mktemp("birthday-logs"),
                     mesh_overrides=overrides) as (lab_, kube, handle):
        yield lab_, kube, handle.name


def status(kube: k8s.Kube, node: str) -> dict[str, Any]:
    return reports.get_peer(kube, node).get("status") or {}


def wg_endpoint(lab_: Lab, node: str, peer_key: str) -> str:
    dump = lab_.exec(node, ["wg", "show", "wire_kube", "dump"], check=True).stdout.splitlines()[1:]
    return next(line.split("\t")[2] for line in dump if line.split("\t")[0] == peer_key)


def agent_log(lab_: Lab, node: str) -> str:
    return (lab_.log_dir / f"agent-{node}.log").read_text(errors="replace")


def small_pool_nat(lab_: Lab, ports: tuple[int, int] | None) -> None:
    """Replace both routers' NAT (existing conntrack mappings, like the relay's TCP, stay)."""
    for site in ("bda", "bdb"):
        rules = router_ruleset(NatKind.SYMMETRIC, IF_WAN, ports=ports)
        lab_.exec(lab_.routers[site].name, ["nft", "-f", "-"], input="table ip wklab\ndelete table ip wklab\n" + rules,
                  check=True)


def both(kube: k8s.Kube, transport: str) -> bool:
    return (status(kube, A).get("peerTransports", {}).get(B) == transport
            and status(kube, B).get("peerTransports", {}).get(A) == transport)


def test_off_relay_on_direct_then_fallback_and_retry(lab: Any) -> None:
    lab_, kube, _ = lab
    keys = {n: kube.get(k8s.PEERS, n)["spec"]["publicKey"] for n in (A, B)}
    mesh_ip = {n: kube.get(k8s.PEERS, n)["spec"]["allowedIPs"][0].split("/")[0] for n in (A, B)}

    # 1. Off: relayed by the matrix, no round published.
    wait_for(lambda: both(kube, "relay"), 60, "the symmetric pair relayed")
    for node, other in ((A, B), (B, A)):
        st = status(kube, node)
        assert st["natType"] == "symmetric"
        assert st["relayReasons"][other] == "peer symmetric and local symmetric"
        assert not st.get("birthday")
    # Per node: loopback ports are per namespace, so A's and B's proxies may share a number.
    relay_ep = {A: wg_endpoint(lab_, A, keys[B]), B: wg_endpoint(lab_, B, keys[A])}
    assert all(ep.startswith("127.0.0.1:") for ep in relay_ep.values()), relay_ep
    assert "birthday" not in agent_log(lab_, A)

    # 2. On, against small-pool symmetric NATs: direct, with traffic flowing throughout.
    small_pool_nat(lab_, POOL)
    pinger = lab_.spawn(A, ["ping", "-n", "-i", "0.2", "-W", "1", mesh_ip[B]], pipe=True)
    try:
        wait_for(lambda: orchestrate.ping(lab_, A, mesh_ip[B]) is not None, 20, "ping over the relay")
        kube.patch_merge(k8s.MESHES, "default", {"spec": {"natTraversal": {"birthdayAttack": "enabled"}}})
        proposal = wait_for(lambda: status(kube, A).get("birthday", {}).get(B), 30, "the leader's proposal")
        joined = wait_for(lambda: status(kube, B).get("birthday", {}).get(A), 30, "the follower joining")
        assert (joined["round"], joined["notBefore"]) == (proposal["round"], proposal["notBefore"])
        for entry in (proposal, joined):  # each side's window lies inside its NAT's small pool
            assert POOL[0] <= entry["portMin"] <= entry["portMax"] <= POOL[1], entry
        wait_for(lambda: both(kube, "direct"), 60, "the pair direct after the birthday attack", interval=0.5)
        time.sleep(3)  # a few more pings over the won path, then count what was lost
        pinger.send_signal(signal.SIGINT)  # ping prints its summary
        out, _ = pinger.communicate(timeout=10)
    finally:
        if pinger.poll() is None:
            lab_.stop(pinger)
    sent = int(re.search(r"(\d+) packets transmitted", out).group(1))
    replies = sorted({int(m) for m in re.findall(r"icmp_seq=(\d+) ", out)})
    assert sent >= 20 and replies, out[-400:]
    missing = [q for q in range(replies[0], sent + 1) if q not in replies]  # from the first reply on
    print(f"relay -> birthday switch: {sent} echoes sent, unanswered after the first reply: {missing}")
    # relay -> direct without a gap (one echo lost to a loaded machine is tolerated, not a switch)
    assert len(missing) <= 1, (missing, out[-400:])

    for node, other in ((A, B), (B, A)):
        ep = wg_endpoint(lab_, node, keys[other])
        assert ep.startswith("127.0.0.1:") and ep != relay_ep[node], ep  # the won socket's proxy, not the relay's
        won = re.findall(r"birthday round (\d+) won: (\d+) sockets, (\d+) flows, (\d+) datagrams sent.*?, "
                         r"([\d.]+)s \(estimated success ([\d.]+)%\)", agent_log(lab_, node))
        assert won, agent_log(lab_, node)[-2000:]
        _, sockets, flows, sent_n, seconds, estimate = won[-1]
        assert int(sockets) == SETTINGS.sockets and int(flows) == SETTINGS.flows
        assert int(sent_n) <= SETTINGS.max_probes and float(seconds) <= SETTINGS.budget
        assert float(estimate) > 50
        remote = re.findall(r"birthday attack won: direct over 127\.0\.0\.1:\d+ <-> ([\d.]+):(\d+)",
                            agent_log(lab_, node))
        assert remote and POOL[0] <= int(remote[-1][1]) <= POOL[1]
        assert not status(kube, node).get("birthday")  # the round is over: entries withdrawn
    assert orchestrate.ping(lab_, A, mesh_ip[B], count=3) is not None

    # 3. Cut UDP between the routers: back to the relay; rounds fail (spaced by the retry interval).
    wan_b = str(lab_.routers["bdb"].wan_ip)
    lab_.cut("bda", "udp", peer=wan_b)
    try:
        wait_for(lambda: both(kube, "relay"), 30, "the pair relayed after the cut", interval=0.5)
        assert orchestrate.ping(lab_, A, mesh_ip[B], count=3) is not None  # traffic continues over the relay
        failed = wait_for(lambda: status(kube, A).get("relayReasons", {}).get(B, "").startswith(
            "birthday attack failed at ") and status(kube, A)["relayReasons"][B], 3 * RETRY + 40,
            "a failed round's reason", interval=0.5)
        assert "estimated success" in failed
    finally:
        lab_.restore("bda")
    wait_for(lambda: both(kube, "direct"), 3 * RETRY + 60, "direct again after the cut", interval=0.5)

    log = agent_log(lab_, A)
    starts = [birthday.parse_stamp(s) for s in re.findall(r"birthday round \d+ at (\S+) ", log)]
    ends = [calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ"))
            for s in re.findall(r"birthday attack failed at (\S+) ", log)]
    assert len(starts) >= 3 and ends, log[-3000:]
    for end in ends:  # every round after a failure starts no sooner than the retry interval
        later = [s for s in starts if s > end]
        assert not later or min(later) - end >= RETRY, (end, later)
