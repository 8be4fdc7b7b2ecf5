"""NAT classification and the direct/relay path matrix (pure: no I/O, no clock).

Classification (RFC 4787 terms, behaviour observed with STUN from the WireGuard port):

* ``open``: the mapped address is one of the node's own addresses and the port is unchanged;
* ``symmetric``: the mapped port (or address) differs per STUN server: address- or
  address-and-port-dependent *mapping*; the step between successive mapped ports is kept for
  port prediction;
* ``cone``: one mapping for every destination (endpoint-independent mapping) and unsolicited
  packets from a port we never contacted arrive (the relay's NATProbe from its second port):
  endpoint-independent *filtering*, i.e. a full cone;
* ``port-restricted-cone``: one mapping, but the NATProbe from the second port is filtered;
* ``""`` (unknown): fewer than two STUN servers answered.

A node whose STUN requests get no answer at all while the relay's TCP port works is *UDP-blocked*
(reported separately: it is not a NAT type).

The matrix (who can reach whom directly) is the measured one in environment-notes.md and the
reference's: open<->any, cone<->any, port-restricted<->port-restricted (both send) go direct;
port-restricted<->symmetric and symmetric<->symmetric cannot (the latter may with the birthday
attack); UDP-blocked always relays; two nodes behind the same public address use their LAN
(host) endpoints.
"""

from __future__ import annotations

import ipaddress
import itertools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from wirekube.models import NatType, RelayMode


@dataclass(frozen=True)
class StunSample:
    """One STUN Binding answer: which server, and the reflexive (mapped) address it saw."""

    server: str  # "host:port" of the STUN server, for distinctness
    mapped_ip: str
    mapped_port: int


@dataclass(frozen=True)
class Classification:
    nat_type: NatType
    public_ip: str = ""
    public_port: int = 0
    port_step: int = 0  # symmetric only: typical increment of the mapped port per new destination


def classify(
    samples: Sequence[StunSample],
    local_port: int,
    local_addresses: Iterable[str],
    *,
    unsolicited_probe_received: bool | None = None,
) -> Classification:
    """Classify from STUN answers (in the order they were sent).

    ``unsolicited_probe_received``: whether the relay's NATProbe from its *second* port reached
    us (None = no probe was done, in which case a one-mapping NAT is reported as ``cone``).
    """
    answered = {s.server: s for s in samples}
    if len(answered) < 2:
        return Classification(NatType.UNKNOWN)
    ordered = list(answered.values())
    ips = {s.mapped_ip for s in ordered}
    ports = [s.mapped_port for s in ordered]
    first = ordered[0]
    if len(ips) > 1 or len(set(ports)) > 1:
        return Classification(NatType.SYMMETRIC, first.mapped_ip, first.mapped_port, port_step(ports))
    local = {str(ipaddress.ip_address(a)) for a in local_addresses}
    if first.mapped_ip in local and first.mapped_port == local_port:
        return Classification(NatType.OPEN, first.mapped_ip, first.mapped_port)
    if unsolicited_probe_received is False:
        return Classification(NatType.PORT_RESTRICTED_CONE, first.mapped_ip, first.mapped_port)
    return Classification(NatType.CONE, first.mapped_ip, first.mapped_port)


def settle(
    last: Classification,
    fresh: Classification,
    samples: Sequence[StunSample],
    *,
    probed: bool,
) -> tuple[Classification, bool]:
    """What to publish after a discovery round, and whether the round was conclusive.

    ``probed``: the relay's unsolicited probe gave an answer (either way). A round that learned
    less than ``last`` about the same mapping says nothing new and keeps ``last``: no STUN answer
    at all (every relay replica down during a rollout), one answer where two are needed, or a
    single mapping with the probe impossible (relay connection down). Publishing ``unknown`` or
    ``cone`` then would flip every peer's path decision until the next round. A different mapping
    is new information and is classified afresh. An inconclusive round should be retried soon.
    """
    kind = fresh.nat_type
    if kind in (NatType.SYMMETRIC, NatType.OPEN, NatType.PORT_RESTRICTED_CONE) or (kind is NatType.CONE and probed):
        return fresh, True
    mapping = (last.public_ip, last.public_port)
    same = not samples or any((s.mapped_ip, s.mapped_port) == mapping for s in samples)
    if same and last.nat_type is not NatType.UNKNOWN:
        return last, False
    return fresh, False


def port_step(ports: Sequence[int]) -> int:
    """The typical increment between successive mapped ports (median of the deltas; 0 = random)."""
    deltas = [b - a for a, b in itertools.pairwise(ports) if b != a]
    if not deltas:
        return 0
    step = int(statistics.median(deltas))
    # A fully random allocator shows deltas all over the place: no usable prediction.
    spread = max(deltas) - min(deltas)
    return step if spread <= max(8, abs(step) * 2) else 0


def predict_ports(last_port: int, step: int, count: int, *, low: int = 1024, high: int = 65535) -> list[int]:
    """Candidate ports for the birthday attack: around the next predicted port, nearest first."""
    centre = last_port + (step or 1)
    out: list[int] = []
    offset = 0
    while len(out) < count and offset <= high - low:
        for p in ((centre + offset,) if offset == 0 else (centre + offset, centre - offset)):
            if low <= p <= high and p not in out:
                out.append(p)
        offset += 1
    return out[:count]


# ---- the path matrix ---------------------------------------------------------------------------


class Path(str, Enum):
    DIRECT = "direct"  # both sides send to each other's published endpoint
    DIRECT_LAN = "direct-lan"  # same public address: use the peer's host (LAN) endpoint
    DIRECT_WAIT = "direct-wait"  # direct, but only the peer can open it (we are the cone side of cone<->symmetric)
    RELAY = "relay"
    BIRTHDAY = "birthday"  # symmetric<->symmetric with the birthday attack enabled


@dataclass(frozen=True)
class NodeFacts:
    nat_type: NatType
    public_ip: str = ""
    udp_blocked: bool = False
    has_host_endpoint: bool = False


@dataclass(frozen=True)
class Decision:
    path: Path
    reason: str = ""

    @property
    def relayed(self) -> bool:
        return self.path is Path.RELAY


_CONE_LIKE = {NatType.OPEN, NatType.CONE}


def choose_path(local: NodeFacts, remote: NodeFacts, *, relay_mode: RelayMode, birthday: bool) -> Decision:
    """The first transport to use toward ``remote`` (failover may still move a direct pair)."""
    if relay_mode is RelayMode.ALWAYS:
        return Decision(Path.RELAY, "relay.mode is always")
    if local.public_ip and local.public_ip == remote.public_ip and remote.has_host_endpoint:
        return Decision(Path.DIRECT_LAN, "same public address: LAN endpoint")
    if relay_mode is RelayMode.NEVER:
        return Decision(Path.DIRECT, "relay.mode is never")
    if local.udp_blocked:
        return Decision(Path.RELAY, "udp blocked (local)")
    if remote.udp_blocked:
        return Decision(Path.RELAY, "udp blocked (peer)")
    lt, rt = local.nat_type, remote.nat_type
    if NatType.UNKNOWN in (lt, rt):
        return Decision(Path.DIRECT, "NAT type not yet known: trying direct")
    if lt in _CONE_LIKE or rt in _CONE_LIKE:
        if rt is NatType.SYMMETRIC and lt is NatType.CONE:
            return Decision(Path.DIRECT_WAIT, "peer symmetric: it initiates to our stable endpoint")
        return Decision(Path.DIRECT)
    if lt is NatType.PORT_RESTRICTED_CONE and rt is NatType.PORT_RESTRICTED_CONE:
        return Decision(Path.DIRECT)
    if lt is NatType.SYMMETRIC and rt is NatType.SYMMETRIC:
        if birthday:
            return Decision(Path.BIRTHDAY, "peer symmetric and local symmetric: birthday attack")
        return Decision(Path.RELAY, "peer symmetric and local symmetric")
    local_desc = "port-restricted cone" if lt is NatType.PORT_RESTRICTED_CONE else lt.value
    remote_desc = "port-restricted cone" if rt is NatType.PORT_RESTRICTED_CONE else rt.value
    return Decision(Path.RELAY, f"peer {remote_desc} and local {local_desc}")
