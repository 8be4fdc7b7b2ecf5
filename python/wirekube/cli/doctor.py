"""``wirekubectl doctor``: checks with a verdict and a fix for each.

The checks follow the troubleshooting section of the EKS Hybrid guide (CIDR overlaps, peers that
stay disconnected, relay and STUN reachability, the WireGuard engine, EPERM on the relay proxy,
clock skew). Each is a pure function of the cluster's objects (plus, for reachability, the
result of a probe passed in), returning :class:`Finding` rows; the command exits non-zero when
any finding is ``fail``.

``doctor --local`` looks at the node it runs on instead (:func:`check_local`, fed by
:mod:`wirekube.cli.nodestate`): WireKube's interface, rules, table 22347 and nft table left on a
node where no agent answers are *stale state*.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from wirekube.cli.nodestate import AgentProbe, NodeState
from wirekube.models import ROUTE_TABLE as ROUTE_TABLE_ID
from wirekube.traversal import pmtu

JSON = Mapping[str, Any]
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: str  # ok | info | warn | fail
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


def collect_ranges(mesh: JSON | None, peers: Iterable[JSON], gateways: Iterable[JSON],
                   nodes: Iterable[JSON]) -> list[NamedRange]:
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
                                    "check the agent pod on this node: "
                                    "kubectl -n wirekube-system logs ds/wirekube-agent"))
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
            findings.append(check_engine(name, engine))
        findings.extend(check_path_mtu(name, status.get("pathMTU") or {}))
        for cond in status.get("conditions") or []:
            if cond.get("type") == "RelayProxyEPERM" and cond.get("status") == "True":
                findings.append(Finding(
                    "relay-proxy-eperm", FAIL, name, cond.get("message") or "sendto() on the relay proxy returns EPERM",
                    "Cilium's socket LB hook is blocking loopback UDP; the agent retries every 3 s. If it persists, "
                    "reboot the node once (stale BPF/iptables state, see the EKS Hybrid guide)"))
    return findings


def check_path_mtu(name: str, path_mtu: Mapping[str, Any]) -> list[Finding]:
    """A warning for every peer whose measured path is below 1280 bytes (IPv6's minimum link MTU;
    such paths are broken links or tunnels more often than real constraints)."""
    out = []
    for peer, mtu in sorted(path_mtu.items()):
        if isinstance(mtu, int) and pmtu.path_below(mtu):
            out.append(Finding(
                "path-mtu", WARN, f"{name} -> {peer}",
                f"path MTU {mtu} (WireGuard packets of {pmtu.wire_size(mtu, pmtu.IPV4_OVERHEAD)} bytes): the path "
                f"between the nodes is below {pmtu.WARN_BELOW} bytes",
                "the agent clamps routes and TCP to it, but IPv6 over the mesh and UDP applications that send "
                "large datagrams with DF will fail; check the links between the two nodes (VPN, PPPoE, tunnels)"))
    return out


ENGINE_FIX = (
    "load the wireguard kernel module on the node (built in since Linux 5.6; `modprobe wireguard`, "
    "or install wireguard-dkms / the distribution's kernel modules package), then restart the agent; "
    "wireguard-go works meanwhile at a higher CPU cost"
)


def check_engine(name: str, engine: str) -> Finding:
    """status.engine: "kernel" is ok; userspace because it was asked for (spec.engine, --engine) or
    adopted from a running wireguard-go is information; userspace because kernel WireGuard is
    unavailable is a warning with the reason the agent found."""
    kind, _, rest = engine.partition(" (")
    reason = rest[:-1] if rest.endswith(")") else rest
    if kind == "kernel":
        return Finding("engine", OK, name, engine)
    if kind != "userspace":
        return Finding("engine", WARN, name, f"unknown engine {engine!r}", "upgrade the agent or wirekubectl")
    if not reason:
        return Finding("engine", INFO, name, "userspace (wireguard-go; the agent did not say why)")
    if "engine=userspace" in reason or reason.startswith("adopted"):
        return Finding("engine", INFO, name, f"userspace (wireguard-go): {reason}")
    return Finding("engine", WARN, name, f"userspace (wireguard-go): {reason}", ENGINE_FIX)


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


def check_reachability(check: str, targets: Iterable[str], probe: Callable[[str], str | None],
                       fix: str) -> list[Finding]:
    """``probe(target)`` returns None when the target answered, else why not."""
    findings = []
    for target in targets:
        error = probe(target)
        findings.append(Finding(check, OK if error is None else FAIL, target, error or "answered",
                                "" if error is None else fix))
    return findings


# ---- node-local state (doctor --local) ------------------------------------------------------------

CLEANUP_FIX = "`wirekubectl cleanup` on this node removes it (only WireKube's own state)"
RESTART_FIX = "or, if this node should be in the mesh, restart its agent (delete the wirekube-agent pod on this node)"


def check_local(state: NodeState) -> list[Finding]:
    """What is left on this node, judged against whether an agent runs here.

    With no agent answering, every WireKube object still present is stale (``fail``): nothing
    keeps the peers, routes or keys current, and the rules keep steering traffic into a tunnel no
    one maintains.  With an agent answering, the same objects are its working dataplane.
    """
    agent = state.agent
    items = _local_items(state)
    foreign = [r for r in state.rules if not r.owned]
    findings: list[Finding] = []
    stale = any(present for _, present, _, _ in items) or bool(foreign)
    where = f" (netns {state.netns})" if state.netns else ""
    if agent.healthy:
        findings.extend(_working_dataplane(agent, items, where))
    elif stale:
        findings.append(Finding("agent-running", FAIL, agent.url, f"no agent runs here: {agent.detail}{where}",
                                "restart the agent on this node, or remove the stale state with `wirekubectl cleanup`"))
        for subject, present, detail, fix in items:
            if present:
                findings.append(Finding("stale-state", FAIL, subject, f"{detail} (and no agent runs on this node)",
                                        f"{fix}; {RESTART_FIX}"))
            elif present is None:
                findings.append(Finding("stale-state", WARN, subject, detail, "run as root with nft installed"))
    else:
        findings.append(Finding("agent-running", OK, agent.url, f"no agent runs here ({agent.detail}){where}"))
        for subject, present, detail, _ in items:
            if present is None:
                findings.append(Finding("stale-state", WARN, subject, detail, "run as root with nft installed"))
        findings.append(Finding("stale-state", OK, "node", "no WireKube link, rules, table 22347 routes or nft tables "
                                                           "left: nothing stale"))
    for r in foreign:
        findings.append(Finding("foreign-rule", WARN if agent.healthy else FAIL, f"pref {r.priority}",
                                f"a rule WireKube did not write sends traffic to table {ROUTE_TABLE_ID}: {r.text}",
                                f"remove it by hand (`ip rule del pref {r.priority}`); cleanup leaves foreign rules"))
    return findings


_LocalItem = tuple[str, bool | None, str, str]
"""subject, present (None: unknown), detail, fix when stale."""


def _local_items(state: NodeState) -> list[_LocalItem]:
    """Each piece of WireKube state this node can hold, and whether it is there."""
    ifname = state.interface
    link = None
    if state.link_kind is not None:
        engine = {"wireguard": "kernel WireGuard", "tun": "wireguard-go"}.get(state.link_kind, state.link_kind)
        pid = f", daemon pid {state.daemon_pid}" if state.daemon_pid is not None else ""
        link = f"{engine} link {ifname}, {'up' if state.link_up else 'down'}{pid}"
    elif state.daemon_pid is not None:
        link = f"wireguard-go pid {state.daemon_pid} serves {ifname} but the link is gone"
    owned = [r for r in state.rules if r.owned]
    return [
        (f"link {ifname}", link is not None, link or f"no link {ifname}", CLEANUP_FIX),
        ("ip rules", bool(owned), f"{_count(len(owned), 'WireKube rule')}: " + "; ".join(r.text for r in owned)
         if owned else "no WireKube rules", CLEANUP_FIX),
        (f"table {ROUTE_TABLE_ID}", bool(state.routes), _routes_detail(state.routes), CLEANUP_FIX),
        ("nft inet wirekube", state.nft.present, state.nft.detail or "no table inet wirekube", CLEANUP_FIX),
        ("nft inet wirekube_mss", state.mss.present, state.mss.detail or "no table inet wirekube_mss", CLEANUP_FIX),
    ]


def _working_dataplane(agent: AgentProbe, items: Sequence[_LocalItem], where: str) -> list[Finding]:
    """With an agent answering: the agent's readiness, and each piece as part of its dataplane."""
    findings: list[Finding] = []
    ready = "" if agent.ready is None else (", ready" if agent.ready else ", NOT ready")
    if agent.ready is False:
        findings.append(Finding("agent-running", WARN, agent.url, f"{agent.detail}{ready}{where}",
                                "the agent has not applied a plan yet: check its log (API server reachable? "
                                "WireKubeMesh 'default' present?)"))
    else:
        findings.append(Finding("agent-running", OK, agent.url, f"{agent.detail}{ready}{where}"))
    for subject, present, detail, _ in items:
        if present is None:
            findings.append(Finding("local-dataplane", WARN, subject, detail, "run as root with nft installed"))
        elif present or subject.startswith(("table", "nft")):
            # no routes (no peers yet) and no nft table (not a gateway node, a fixed MTU) are normal
            findings.append(Finding("local-dataplane", OK, subject, detail))
        else:
            findings.append(Finding("local-dataplane", WARN, subject, f"{detail} although the agent runs",
                                    "the agent sets it up on its next pass; if it stays missing, check its log"))
    return findings


def _routes_detail(routes: Sequence[str]) -> str:
    if not routes:
        return f"no routes in table {ROUTE_TABLE_ID}"
    shown = ", ".join(routes[:3]) + (f", ... ({len(routes) - 3} more)" if len(routes) > 3 else "")
    return f"{_count(len(routes), 'route')}: {shown}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ---- output ---------------------------------------------------------------------------------------

_MARK = {OK: "\033[32mok\033[0m", INFO: "\033[36minfo\033[0m", WARN: "\033[33mwarn\033[0m",
         FAIL: "\033[31mFAIL\033[0m"}


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


# ---- route claims without a grant ---------------------------------------------------------------


def check_route_claims(mesh: JSON | None, peers: Sequence[JSON], gateways: Sequence[JSON],
                       grants: Sequence[JSON], node: str | None = None, nodes: Sequence[JSON] = (),
                       api_server_ips: Sequence[Any] = ()) -> list[Finding]:
    """Every AllowedIPs entry the agents do not route (wirekube.authority), with the grant to add.

    The guarded set is the agents' as far as the cluster shows it: the API server as this client
    reaches it, and every Node's addresses in place of each agent's own."""
    from wirekube import authority
    from wirekube.errors import InvalidObject
    from wirekube.models import Mesh, MeshSpec, gateway_from_cr, mesh_from_cr, peer_from_cr, route_grant_from_cr

    def parsed(objs: Sequence[JSON], parse: Callable[[JSON], Any]) -> list[Any]:
        out = []
        for obj in objs:
            try:
                out.append(parse(obj))
            except InvalidObject:
                pass  # reported by the API server's validation and by the agents
        return out

    try:
        m = mesh_from_cr(mesh) if mesh is not None else Mesh("default", MeshSpec())
    except InvalidObject:
        m = Mesh("default", MeshSpec())
    ps = parsed(peers, peer_from_cr)
    active: dict[str, list[Net]] = {}
    for gw in parsed(gateways, gateway_from_cr):
        if gw.status.active_peer:
            active.setdefault(gw.status.active_peer, []).extend(r.cidr for r in gw.spec.routes)
    granted = authority.merge_grants(authority.grants_by_node(parsed(grants, route_grant_from_cr)), active)
    node_addresses = []
    for obj in nodes:
        for addr in _status(obj).get("addresses") or []:
            try:
                ip = ipaddress.ip_address(addr.get("address", ""))
            except ValueError:
                continue
            node_addresses.append(authority.Guarded(ip, f"an address of node {obj['metadata']['name']}",
                                                    obj["metadata"]["name"]))
    guarded = authority.guarded_addresses(m, ps, api_server_ips, resolved=node_addresses)
    _, refusals = authority.Authorizer().authorize(m, ps, granted, guarded)
    findings = [Finding("route-claims", WARN, f"{r.peer} {r.entry}", r.reason, r.fix)
                for r in refusals if node is None or r.peer == node]
    return findings or [Finding("route-claims", OK, node or "cluster", "every AllowedIPs entry is granted")]


def run_static(mesh: JSON | None, peers: Sequence[JSON], gateways: Sequence[JSON], nodes: Sequence[JSON],
               *, node: str | None, now: dt.datetime, grants: Sequence[JSON] = (),
               api_server_ips: Sequence[Any] = ()) -> list[Finding]:
    return [
        *check_cidr_overlaps(collect_ranges(mesh, peers, gateways, nodes)),
        *check_peers(peers, node),
        *check_clock_skew(peers, now),
        *check_route_claims(mesh, peers, gateways, grants, node, nodes, api_server_ips),
    ]


def print_findings(findings: Sequence[Finding], output: str) -> int:
    sys.stdout.write(render(findings, colour=sys.stdout.isatty(), output=output))
    return exit_code(findings)
