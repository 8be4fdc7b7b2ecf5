"""``wirekubectl doctor``: checks with a verdict and a fix for each.

The checks follow the troubleshooting section of the EKS Hybrid guide (CIDR overlaps, peers that
stay disconnected, relay and STUN reachability, the WireGuard engine, EPERM on the relay proxy,
clock skew). Each is a pure function of the cluster's objects (plus, for reachability, the
result of a probe passed in), returning :class:`Finding` rows; the command exits non-zero when
any finding is ``fail``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

JSON = Mapping[str, Any]
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: str  # ok | warn | fail
    subject: str
    detail: str
    fix: str = ""


def _net(text: Any) -> Net | None:
    try:
        return ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        return None


def _status(obj: JSON) -> JSON:
    return obj.get("status") or {}


def _spec(obj: JSON) -> JSON:
    return obj.get("spec") or {}


# ---- CIDR overlaps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedRange:
    kind: str  # mesh | service | pod | route | node
    owner: str
    net: Net

    def __str__(self) -> str:
        return f"{self.kind} {self.net} ({self.owner})"


def collect_ranges(mesh: JSON | None, peers: Iterable[JSON], gateways: Iterable[JSON], nodes: Iterable[JSON]) -> list[NamedRange]:
    out: list[NamedRange] = []
    spec = _spec(mesh or {})
    if (n := _net(spec.get("meshCIDR", "10.255.0.0/16"))) is not None:
        out.append(NamedRange("mesh", "WireKubeMesh default", n))
    for cidr in spec.get("serviceCIDRs") or []:
        if (n := _net(cidr)) is not None:
            out.append(NamedRange("service", "WireKubeMesh serviceCIDRs", n))
    for node in nodes:
        name = node["metadata"]["name"]
        for cidr in _spec(node).get("podCIDRs") or []:
            if (n := _net(cidr)) is not None:
                out.append(NamedRange("pod", f"Node {name}", n))
        for addr in _status(node).get("addresses") or []:
            if addr.get("type") == "InternalIP" and (n := _net(addr.get("address"))) is not None:
                out.append(NamedRange("node", f"Node {name} InternalIP", n))
    for gw in gateways:
        for route in _spec(gw).get("routes") or []:
            if (n := _net(route.get("cidr"))) is not None:
                out.append(NamedRange("route", f"WireKubeGateway {gw['metadata']['name']}", n))
    return out


# Pairs of kinds that must never overlap, and the fix for each.
_OVERLAP_RULES: dict[frozenset[str], str] = {
    frozenset({"mesh", "service"}): "choose a meshCIDR outside the Service CIDR",
    frozenset({"mesh", "pod"}): "choose a meshCIDR outside every pod CIDR",
    frozenset({"mesh", "route"}): "choose a meshCIDR outside the gateway's routes",
    frozenset({"mesh", "node"}): "choose a meshCIDR that holds no node address",
    frozenset({"pod", "service"}): "the CNI's pod CIDR overlaps the Service CIDR: change the CNI's IPAM pool",
    frozenset({"pod", "route"}): (
        "a pod CIDR overlaps a gateway route (e.g. Cilium's cluster-pool defaulting to the VPC CIDR): "
        "use a separate RFC 1918 range for pods"
    ),
    frozenset({"pod"}): "two nodes claim overlapping pod CIDRs: fix the CNI's IPAM",
    frozenset({"service", "route"}): "the Service CIDR overlaps a gateway route: remove it from the gateway",
}


def check_cidr_overlaps(ranges: Sequence[NamedRange]) -> list[Finding]:
    findings = []
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            if a.net.version != b.net.version or not a.net.overlaps(b.net) or a.owner == b.owner:
                continue
            fix = _OVERLAP_RULES.get(frozenset({a.kind, b.kind}))
            if fix is None:
                continue
            findings.append(Finding("cidr-overlap", FAIL, f"{a.net} / {b.net}", f"{a} overlaps {b}", fix))
    if not findings:
        findings.append(Finding("cidr-overlap", OK, "cluster", f"{len(ranges)} ranges, no forbidden overlap"))
    return findings


# ---- peers ---------------------------------------------------------------------------------------


def check_peers(peers: Sequence[JSON], node_filter: str | None = None) -> list[Finding]:
    findings = []
    names = {p["metadata"]["name"] for p in peers}
    for p in peers:
        name = p["metadata"]["name"]
        if node_filter and name != node_filter:
            continue
        status = _status(p)
        if not status:
            findings.append(Finding("peer-connected", FAIL, name, "the agent has never reported status",
                                    "check the agent pod on this node: kubectl -n wirekube-system logs ds/wirekube-agent"))
            continue
        transports = status.get("peerTransports") or {}
        missing = sorted(names - set(transports) - {name})
        reasons = status.get("relayReasons") or {}
        if not status.get("connected"):
            why = "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no handshake with any peer"
            findings.append(Finding(
                "peer-connected", FAIL, name, f"connected=false ({why})",
                "check UDP to the node's WireGuard port and TCP to the relay; `wirekubectl status` shows the pairs"))
        elif missing:
            findings.append(Finding("peer-connected", WARN, name, f"no transport to {', '.join(missing)}",
                                    "those peers may be new or their agents down"))
        else:
            findings.append(Finding("peer-connected", OK, name, f"{len(transports)} peers reachable"))
        engine = status.get("engine") or ""
        if engine:
            findings.append(Finding("engine", OK, name, engine))
        for cond in status.get("conditions") or []:
            if cond.get("type") == "RelayProxyEPERM" and cond.get("status") == "True":
                findings.append(Finding(
                    "relay-proxy-eperm", FAIL, name, cond.get("message") or "sendto() on the relay proxy returns EPERM",
                    "Cilium's socket LB hook is blocking loopback UDP; the agent retries every 3 s. If it persists, "
                    "reboot the node once (stale BPF/iptables state, see the EKS Hybrid guide)"))
    return findings


def check_clock_skew(peers: Sequence[JSON], now: dt.datetime, *, max_skew_seconds: float = 120.0) -> list[Finding]:
    """Agents stamp status.lastHandshake; a stamp in the future betrays a node clock ahead of ours."""
    findings = []
    for p in peers:
        stamp = _status(p).get("lastHandshake")
        if not stamp:
            continue
        try:
            t = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            continue
        ahead = (t - now).total_seconds()
        if ahead > max_skew_seconds:
            findings.append(Finding("clock-skew", FAIL, p["metadata"]["name"],
                                    f"reports a handshake {ahead:.0f}s in the future",
                                    "enable NTP (chrony/systemd-timesyncd) on the node"))
    return findings


# ---- reachability (the probe is injected) ---------------------------------------------------------


def check_reachability(check: str, targets: Iterable[str], probe: Callable[[str], str | None], fix: str) -> list[Finding]:
    """``probe(target)`` returns None when the target answered, else why not."""
    findings = []
    for target in targets:
        error = probe(target)
        findings.append(Finding(check, OK if error is None else FAIL, target, error or "answered", "" if error is None else fix))
    return findings


# ---- output ---------------------------------------------------------------------------------------

_MARK = {OK: "\033[32mok\033[0m", WARN: "\033[33mwarn\033[0m", FAIL: "\033[31mFAIL\033[0m"}


def render(findings: Sequence[Finding], *, colour: bool, output: str = "table") -> str:
    if output == "json":
        return json.dumps([asdict(f) for f in findings], indent=2) + "\n"
    lines = []
    for f in findings:
        mark = _MARK[f.verdict] if colour else f.verdict.upper()
        lines.append(f"[{mark}] {f.check}: {f.subject}: {f.detail}")
        if f.fix:
            lines.append(f"       fix: {f.fix}")
    return "\n".join(lines) + "\n"


def exit_code(findings: Iterable[Finding]) -> int:
    return 1 if any(f.verdict == FAIL for f in findings) else 0


def run_static(mesh: JSON | None, peers: Sequence[JSON], gateways: Sequence[JSON], nodes: Sequence[JSON],
               *, node: str | None, now: dt.datetime) -> list[Finding]:
    return [
        *check_cidr_overlaps(collect_ranges(mesh, peers, gateways, nodes)),
        *check_peers(peers, node),
        *check_clock_skew(peers, now),
    ]


def print_findings(findings: Sequence[Finding], output: str) -> int:
    sys.stdout.write(render(findings, colour=sys.stdout.isatty(), output=output))
    return exit_code(findings)
