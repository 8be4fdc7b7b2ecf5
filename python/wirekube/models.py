"""Typed models of WireKube's custom resources, and CR dict <-> model conversion.

The CRDs in ``charts/wirekube/crds`` are the source of truth for the API server; these models
are what the rest of the code works on.  The API server already rejects most bad input, but an
agent can still meet malformed objects (written by an older version before a schema tightened,
restored from a backup, or applied with validation off), so every ``*_from_cr`` function checks
each field again and raises :class:`wirekube.errors.InvalidObject` naming the exact field.

Pure module: no I/O, no clock, no ``kubernetes`` import.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from wirekube import API_VERSION, ipam
from wirekube.errors import InvalidObject
from wirekube.relay.url import RelayURL

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LABEL_NODE = "wirekube.io/node"
ANNOTATION_ENDPOINT = "wirekube.io/endpoint"
ANNOTATION_INTERNAL_IP = "wirekube.io/internal-ip"
ANNOTATION_BIRTHDAY = "wirekube.io/birthday-attack"

FWMARK = 0x574B
ROUTE_TABLE = 22347
MESH_SINGLETON = "default"

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)


class NatType(_StrEnum):
    UNKNOWN = ""
    OPEN = "open"
    CONE = "cone"
    PORT_RESTRICTED_CONE = "port-restricted-cone"
    SYMMETRIC = "symmetric"


class Transport(_StrEnum):
    DIRECT = "direct"
    RELAY = "relay"


class TransportMode(_StrEnum):
    DIRECT = "direct"
    RELAY = "relay"
    MIXED = "mixed"


class RelayMode(_StrEnum):
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


class RelayProvider(_StrEnum):
    MANAGED = "managed"
    EXTERNAL = "external"


class Toggle(_StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class Engine(_StrEnum):
    AUTO = "auto"
    KERNEL = "kernel"
    USERSPACE = "userspace"


class PodCIDRSync(_StrEnum):
    NONE = "none"
    NODE = "node"
    CILIUM = "cilium"


class LocalSubnetPolicy(_StrEnum):
    """What to do with a peer AllowedIPs entry that covers one of this node's own subnets.

    ``skip`` (default): do not route it through the mesh (the LAN is reachable directly);
    ``route``: route it through the mesh anyway (more specific routes than the LAN's win).
    """

    SKIP = "skip"
    ROUTE = "route"


class EndpointDiscovery(_StrEnum):
    ANNOTATION = "annotation"
    STUN = "stun"
    IMDS = "imds"
    EXTERNAL_IP = "external-ip"
    INTERNAL_IP = "internal-ip"
    REFLECTION = "reflection"  # what peers on a working direct path see (wirekube.traversal.reflection)


# --------------------------------------------------------------------------------------------
# Field parsing helpers.  Each takes the field path so errors name it.
# --------------------------------------------------------------------------------------------

E = TypeVar("E", bound=enum.Enum)


@dataclass(frozen=True)
class _Ctx:
    kind: str
    name: str

    def fail(self, path: str, reason: str) -> InvalidObject:
        return InvalidObject(self.kind, self.name, path, reason)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {type(value).__name__}")
        return value

    def list(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, got {type(value).__name__}")
        return value

    def string(self, value: Any, path: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {type(value).__name__}")
        return value

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {value!r}")
        return value

    def integer(self, value: Any, path: str, default: int, lo: int, hi: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise self.fail(path, f"must be between {lo} and {hi}, got {value}")
        return value

    def enum(self, cls: type[E], value: Any, path: str, default: E) -> E:
        if value is None:
            return default
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise self.fail(path, f"must be one of {allowed}, got {value!r}") from None

    def cidr(self, value: Any, path: str) -> IPNetwork:
        text = self.string(value, path)
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise self.fail(path, f"not a canonical CIDR ({e}): {text!r}") from None
        return net

    def ipv4(self, value: Any, path: str) -> ipaddress.IPv4Address:
        text = self.string(value, path)
        try:
            return ipaddress.IPv4Address(text)
        except ValueError:
            raise self.fail(path, f"not an IPv4 address: {text!r}") from None

    def endpoint(self, value: Any, path: str) -> Endpoint | None:
        text = self.string(value, path)
        if not text:
            return None
        try:
            return Endpoint.parse(text)
        except ValueError as e:
            raise self.fail(path, str(e)) from None

    def hostport(self, value: Any, path: str) -> HostPort:
        text = self.string(value, path)
        try:
            return HostPort.parse(text)
        except ValueError as e:
            raise self.fail(path, str(e)) from None

    def key(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        try:
            parse_key(text)
        except ValueError as e:
            raise self.fail(path, str(e)) from None
        return text


def parse_key(text: str) -> bytes:
    """Decode a WireGuard key: standard base64 of exactly 32 bytes (44 characters)."""
    if len(text) != 44 or not text.endswith("="):
        raise ValueError(f"must be a 44-character base64 WireGuard key, got {len(text)} characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be a 44-character base64 WireGuard key (not valid base64)") from None
    if len(raw) != 32 or base64.b64encode(raw).decode() != text:
        raise ValueError("must be a 44-character base64 WireGuard key (not canonical base64)")
    return raw


def key_fingerprint(key: str) -> str:
    """A short, log-safe name for a public key (never log whole keys)."""
    return key[:8]


@dataclass(frozen=True, order=True)
class Endpoint:
    """A UDP endpoint ``ip:port`` (IPv6 as ``[addr]:port``)."""

    ip: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        m = _HOSTPORT.match(text)
        if not m:
            raise ValueError(f"must be ip:port (IPv6 as [addr]:port), got {text!r}")
        host = m["host"].strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"must be ip:port with a literal IP address, got {text!r}") from None
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {port}")
        return cls(ip, port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class HostPort:
    """A ``host:port`` where host may be a DNS name (relay and STUN servers)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        m = _HOSTPORT.match(text)
        if not m:
            raise ValueError(f"must be host:port, got {text!r}")
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {port}")
        return cls(m["host"].strip("[]"), port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --------------------------------------------------------------------------------------------
# WireKubeMesh
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelaySpec:
    mode: RelayMode = RelayMode.AUTO
    provider: RelayProvider = RelayProvider.MANAGED
    handshake_timeout_seconds: int = 30
    direct_retry_interval_seconds: int = 120
    external_endpoint: HostPort | None = None
    managed_port: int = 3478
    wss_endpoint: RelayURL | None = None
    """``spec.relay.wssEndpoint``: the relay over WebSocket over TLS (``wss://host[:port]/path``),
    dialled by an agent only while its raw TCP connections to the relay fail (issue 19)."""


@dataclass(frozen=True)
class RoutingSpec:
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    local_subnet_policy: LocalSubnetPolicy = LocalSubnetPolicy.SKIP
    allow_default_route: bool = False


@dataclass(frozen=True)
class MeshSpec:
    mesh_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network("10.255.0.0/16")
    listen_port: int = 51820
    interface_name: str = "wire_kube"
    mtu: int = 1420
    """The WireGuard interface's MTU (``spec.mtu``: a number, or ``auto``: 1420)."""
    path_mtu: bool = True
    """``spec.mtu: auto`` (the default): measure each direct peer's path MTU, set it on the peer's
    routes and clamp TCP MSS to it (issue 18); a number keeps every path at the interface MTU."""
    engine: Engine = Engine.AUTO
    include_node_internal_ip: bool = False
    stun_servers: tuple[HostPort, ...] = ()
    birthday_attack: Toggle = Toggle.DISABLED
    relay: RelaySpec = RelaySpec()
    routing: RoutingSpec = RoutingSpec()
    pod_cidr_sync: PodCIDRSync = PodCIDRSync.NONE
    service_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class MeshStatus:
    relay_endpoints: tuple[HostPort, ...] = ()
    total_peers: int = 0
    ready_peers: int = 0


@dataclass(frozen=True)
class Mesh:
    name: str
    spec: MeshSpec
    status: MeshStatus = MeshStatus()


def mesh_from_cr(obj: Mapping[str, Any]) -> Mesh:
    """A WireKubeMesh object as a :class:`Mesh`; InvalidObject names the first bad field (fields are
    checked in a fixed order: the nested maps, meshCIDR, the relay's endpoints, interfaceName,
    stunServers, mtu, then the remaining fields as they appear in :class:`MeshSpec`)."""
    name = _name(obj)
    c = _Ctx("WireKubeMesh", name)
    spec = c.mapping(obj.get("spec"), "spec")
    relay = c.mapping(spec.get("relay"), "spec.relay")
    external = c.mapping(relay.get("external"), "spec.relay.external")
    managed = c.mapping(relay.get("managed"), "spec.relay.managed")
    routing = c.mapping(spec.get("routing"), "spec.routing")
    auto = c.mapping(spec.get("autoAllowedIPs"), "spec.autoAllowedIPs")
    nat = c.mapping(spec.get("natTraversal"), "spec.natTraversal")

    mesh_cidr_text = c.string(spec.get("meshCIDR"), "spec.meshCIDR", str(MeshSpec.mesh_cidr))
    try:
        mesh_cidr = ipam.parse_mesh_cidr(mesh_cidr_text)
    except ValueError as e:
        raise c.fail("spec.meshCIDR", str(e)) from None
    relay_endpoints = _relay_endpoints(c, relay, external)
    iface = c.string(spec.get("interfaceName"), "spec.interfaceName", "wire_kube")
    if not _IFNAME.match(iface):
        raise c.fail("spec.interfaceName", f"must be 1-15 characters of [A-Za-z0-9_.-], got {iface!r}")
    stun = tuple(
        c.hostport(s, f"spec.stunServers[{i}]")
        for i, s in enumerate(c.list(spec.get("stunServers"), "spec.stunServers"))
    )
    if len(stun) == 1:
        raise c.fail("spec.stunServers", "needs at least 2 servers to tell cone from symmetric NAT")

    mtu, path_mtu = _mesh_mtu(c, spec.get("mtu"))
    return Mesh(
        name=name,
        spec=MeshSpec(
            mesh_cidr=mesh_cidr,
            listen_port=c.integer(spec.get("listenPort"), "spec.listenPort", 51820, 1, 65535),
            interface_name=iface,
            mtu=mtu,
            path_mtu=path_mtu,
            engine=c.enum(Engine, spec.get("engine"), "spec.engine", Engine.AUTO),
            include_node_internal_ip=c.boolean(
                auto.get("includeNodeInternalIP"), "spec.autoAllowedIPs.includeNodeInternalIP", False
            ),
            stun_servers=stun,
            birthday_attack=c.enum(
                Toggle, nat.get("birthdayAttack"), "spec.natTraversal.birthdayAttack", Toggle.DISABLED
            ),
            relay=_relay_spec(c, relay, managed, relay_endpoints),
            routing=_routing_spec(c, routing),
            pod_cidr_sync=c.enum(PodCIDRSync, spec.get("podCIDRSync"), "spec.podCIDRSync", PodCIDRSync.NONE),
            service_cidrs=tuple(
                c.cidr(x, f"spec.serviceCIDRs[{i}]")
                for i, x in enumerate(c.list(spec.get("serviceCIDRs"), "spec.serviceCIDRs"))
            ),
        ),
        status=_mesh_status(c, c.mapping(obj.get("status"), "status")),
    )


def _relay_endpoints(c: _Ctx, relay: Mapping[str, Any], external: Mapping[str, Any]) -> RelaySpec:
    """``spec.relay``'s provider and endpoints (checked early: they depend on each other); the
    other relay fields keep their defaults until :func:`_relay_spec`."""
    provider = c.enum(RelayProvider, relay.get("provider"), "spec.relay.provider", RelayProvider.MANAGED)
    external_endpoint = (
        c.hostport(external["endpoint"], "spec.relay.external.endpoint")
        if external.get("endpoint")
        else None
    )
    if provider is RelayProvider.EXTERNAL and external_endpoint is None:
        raise c.fail("spec.relay.external.endpoint", "required when spec.relay.provider is 'external'")
    wss_endpoint = None
    if relay.get("wssEndpoint"):
        wss_text = c.string(relay.get("wssEndpoint"), "spec.relay.wssEndpoint", "")
        try:
            wss_endpoint = RelayURL.parse(wss_text)
        except ValueError as e:
            raise c.fail("spec.relay.wssEndpoint", str(e)) from None
        if wss_endpoint.scheme != "wss" or "://" not in wss_text:
            raise c.fail("spec.relay.wssEndpoint", f"must be wss://host[:port]/path, got {wss_text!r}")
    return RelaySpec(provider=provider, external_endpoint=external_endpoint, wss_endpoint=wss_endpoint)


def _relay_spec(c: _Ctx, relay: Mapping[str, Any], managed: Mapping[str, Any], endpoints: RelaySpec) -> RelaySpec:
    """``spec.relay``: the rest of its fields on top of :func:`_relay_endpoints`' answer."""
    return replace(
        endpoints,
        mode=c.enum(RelayMode, relay.get("mode"), "spec.relay.mode", RelayMode.AUTO),
        handshake_timeout_seconds=c.integer(
            relay.get("handshakeTimeoutSeconds"), "spec.relay.handshakeTimeoutSeconds", 30, 1, 600
        ),
        direct_retry_interval_seconds=c.integer(
            relay.get("directRetryIntervalSeconds"),
            "spec.relay.directRetryIntervalSeconds",
            120,
            5,
            86400,
        ),
        managed_port=c.integer(managed.get("port"), "spec.relay.managed.port", 3478, 1, 65535),
    )


def _routing_spec(c: _Ctx, routing: Mapping[str, Any]) -> RoutingSpec:
    return RoutingSpec(
        exclude_cidrs=tuple(
            c.cidr(x, f"spec.routing.excludeCIDRs[{i}]")
            for i, x in enumerate(c.list(routing.get("excludeCIDRs"), "spec.routing.excludeCIDRs"))
        ),
        local_subnet_policy=c.enum(
            LocalSubnetPolicy,
            routing.get("localSubnetPolicy"),
            "spec.routing.localSubnetPolicy",
            LocalSubnetPolicy.SKIP,
        ),
        allow_default_route=c.boolean(
            routing.get("allowDefaultRoute"), "spec.routing.allowDefaultRoute", False
        ),
    )


def _mesh_status(c: _Ctx, status: Mapping[str, Any]) -> MeshStatus:
    relay = c.mapping(status.get("relay"), "status.relay")
    return MeshStatus(
        relay_endpoints=tuple(
            c.hostport(x, f"status.relay.endpoints[{i}]")
            for i, x in enumerate(c.list(relay.get("endpoints"), "status.relay.endpoints"))
        ),
        total_peers=c.integer(status.get("totalPeers"), "status.totalPeers", 0, 0, 2**31 - 1),
        ready_peers=c.integer(status.get("readyPeers"), "status.readyPeers", 0, 0, 2**31 - 1),
    )


# --------------------------------------------------------------------------------------------
# WireKubePeer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSpec:
    public_key: str
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int = 25


def _mesh_mtu(c: _Ctx, value: object) -> tuple[int, bool]:
    """spec.mtu: (interface MTU, path MTU detection on)."""
    if value is None or value == "auto":
        return MeshSpec.mtu, True
    if isinstance(value, bool) or not isinstance(value, int) or not 1280 <= value <= 9000:
        raise c.fail("spec.mtu", f"must be 'auto' or an integer between 1280 and 9000, got {value!r}")
    return value, False


@dataclass(frozen=True)
class PeerStatus:
    connected: bool = False
    nat_type: NatType = NatType.UNKNOWN
    transport_mode: TransportMode | None = None
    peer_transports: Mapping[str, Transport] = field(default_factory=dict)
    endpoint_discovery_method: str = ""
    last_handshake: str = ""
    nat_port_step: int = 0
    relay_reasons: Mapping[str, str] = field(default_factory=dict)
    host_endpoints: tuple[str, ...] = ()
    udp_blocked: bool = False
    # "kernel" or "userspace (<why>)": which WireGuard engine the agent picked and why.
    engine: str = ""
    # metav1.Condition dicts (type, status, reason, message, lastTransitionTime), sorted by type.
    conditions: tuple[Mapping[str, Any], ...] = ()
    # Endpoint reflection: for each peer on a healthy direct path, the endpoint our WireGuard
    # really talks to when it differs from the peer's spec.endpoint ("ip:port").
    observed_endpoints: Mapping[str, str] = field(default_factory=dict)
    # Birthday attack coordination: our part in the current round with each symmetric peer.
    birthday: Mapping[str, BirthdayRound] = field(default_factory=dict)
    # Path MTU (spec.mtu auto): the measured size, as the route MTU, of each direct peer whose path
    # is smaller than the interface's MTU (others are absent: they get the full size).
    path_mtu: Mapping[str, int] = field(default_factory=dict)


MAX_BIRTHDAY_ROUNDS = 64
"""status.birthday holds at most this many peers (rounds run one at a time per peer)."""


@dataclass(frozen=True)
class BirthdayRound:
    """One side's part in a coordinated birthday-attack round with one peer (status.birthday.<peer>).

    The leader (the node whose name sorts first) proposes ``round`` and ``not_before``; the other
    side joins by publishing the same two values. Each side adds ``port_min``..``port_max``: where
    its own NAT will map the round's probing flows (0 = unknown), so the other side aims there.
    """

    round: int
    not_before: str  # RFC 3339 UTC, when both sides start probing
    port_min: int = 0
    port_max: int = 0


@dataclass(frozen=True)
class Peer:
    name: str
    spec: PeerSpec
    status: PeerStatus = PeerStatus()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""
    creation_timestamp: str = ""

    @property
    def mesh_ip(self) -> ipaddress.IPv4Address | None:
        """The peer's overlay address: its first AllowedIPs entry when that is an IPv4 /32."""
        if self.spec.allowed_ips:
            first = self.spec.allowed_ips[0]
            if isinstance(first, ipaddress.IPv4Network) and first.prefixlen == 32:
                return first.network_address
        return None


def peer_from_cr(obj: Mapping[str, Any]) -> Peer:
    name = _name(obj)
    c = _Ctx("WireKubePeer", name)
    meta = c.mapping(obj.get("metadata"), "metadata")
    spec = c.mapping(obj.get("spec"), "spec")
    if not spec.get("publicKey"):
        raise c.fail("spec.publicKey", "required")
    allowed: list[IPNetwork] = []
    for i, x in enumerate(c.list(spec.get("allowedIPs"), "spec.allowedIPs")):
        net = c.cidr(x, f"spec.allowedIPs[{i}]")
        if net.prefixlen == 0:
            raise c.fail(
                f"spec.allowedIPs[{i}]",
                "a default route may not be claimed by a peer (use a WireKubeGateway route and "
                "WireKubeMesh spec.routing.allowDefaultRoute)",
            )
        allowed.append(net)
    return Peer(
        name=name,
        spec=PeerSpec(
            public_key=c.key(spec.get("publicKey"), "spec.publicKey"),
            endpoint=c.endpoint(spec.get("endpoint"), "spec.endpoint"),
            allowed_ips=tuple(allowed),
            persistent_keepalive=c.integer(
                spec.get("persistentKeepalive"), "spec.persistentKeepalive", 25, 0, 65535
            ),
        ),
        status=_peer_status(c, c.mapping(obj.get("status"), "status")),
        labels=dict(c.mapping(meta.get("labels"), "metadata.labels")),
        annotations=dict(c.mapping(meta.get("annotations"), "metadata.annotations")),
        resource_version=c.string(meta.get("resourceVersion"), "metadata.resourceVersion"),
        creation_timestamp=c.string(meta.get("creationTimestamp"), "metadata.creationTimestamp"),
    )


def _peer_status(c: _Ctx, status: Mapping[str, Any]) -> PeerStatus:
    mode = status.get("transportMode")
    transports = c.mapping(status.get("peerTransports"), "status.peerTransports")
    return PeerStatus(
        connected=c.boolean(status.get("connected"), "status.connected", False),
        nat_type=c.enum(NatType, status.get("natType"), "status.natType", NatType.UNKNOWN),
        transport_mode=(
            c.enum(TransportMode, mode, "status.transportMode", TransportMode.DIRECT) if mode else None
        ),
        peer_transports={
            str(k): c.enum(Transport, v, f"status.peerTransports.{k}", Transport.DIRECT)
            for k, v in transports.items()
        },
        endpoint_discovery_method=c.string(
            status.get("endpointDiscoveryMethod"), "status.endpointDiscoveryMethod"
        ),
        last_handshake=c.string(status.get("lastHandshake"), "status.lastHandshake"),
        nat_port_step=c.integer(status.get("natPortStep"), "status.natPortStep", 0, -65535, 65535),
        relay_reasons={
            str(k): c.string(v, f"status.relayReasons.{k}")
            for k, v in c.mapping(status.get("relayReasons"), "status.relayReasons").items()
        },
        host_endpoints=tuple(
            str(c.endpoint(x, f"status.hostEndpoints[{i}]"))
            for i, x in enumerate(c.list(status.get("hostEndpoints"), "status.hostEndpoints"))
        ),
        udp_blocked=c.boolean(status.get("udpBlocked"), "status.udpBlocked", False),
        engine=c.string(status.get("engine"), "status.engine"),
        conditions=tuple(
            _condition(c, x, f"status.conditions[{i}]")
            for i, x in enumerate(c.list(status.get("conditions"), "status.conditions"))
        ),
        observed_endpoints={
            str(k): str(c.endpoint(v, f"status.observedEndpoints.{k}"))
            for k, v in c.mapping(status.get("observedEndpoints"), "status.observedEndpoints").items()
            if v
        },
        birthday=_birthday(c, c.mapping(status.get("birthday"), "status.birthday")),
        path_mtu={
            str(k): c.integer(v, f"status.pathMTU.{k}", 0, 68, 65535)
            for k, v in c.mapping(status.get("pathMTU"), "status.pathMTU").items()
        },
    )


def _birthday(c: _Ctx, rounds: Mapping[str, Any], where: str = "status.birthday.{}") -> dict[str, BirthdayRound]:
    if len(rounds) > MAX_BIRTHDAY_ROUNDS:
        raise c.fail("status.birthday", f"at most {MAX_BIRTHDAY_ROUNDS} peers, got {len(rounds)}")
    out: dict[str, BirthdayRound] = {}
    for k, v in rounds.items():
        path = where.format(k)
        entry = c.mapping(v, path)
        stamp = c.string(entry.get("notBefore"), f"{path}.notBefore")
        if not _RFC3339.match(stamp):
            raise c.fail(f"{path}.notBefore",
                         f"must be an RFC 3339 time such as 2025-01-01T00:00:00.000Z, got {stamp!r}")
        low = c.integer(entry.get("portMin"), f"{path}.portMin", 0, 0, 65535)
        high = c.integer(entry.get("portMax"), f"{path}.portMax", 0, 0, 65535)
        if low > high:
            raise c.fail(f"{path}.portMax", f"must not be below portMin ({low}), got {high}")
        number = entry.get("round")
        if number is None:
            raise c.fail(f"{path}.round", "required")
        out[str(k)] = BirthdayRound(c.integer(number, f"{path}.round", 1, 1, 2**31 - 1), stamp, low, high)
    return out


def _condition(c: _Ctx, value: object, path: str) -> Mapping[str, Any]:
    cond = c.mapping(value, path)
    for key in ("type", "status"):
        if not isinstance(cond.get(key), str) or not cond.get(key):
            raise c.fail(f"{path}.{key}", "required string")
    return dict(cond)


def peer_spec_to_cr(spec: PeerSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "publicKey": spec.public_key,
        "allowedIPs": [str(n) for n in spec.allowed_ips],
        "persistentKeepalive": spec.persistent_keepalive,
    }
    if spec.endpoint is not None:
        out["endpoint"] = str(spec.endpoint)
    return out


def peer_to_cr(peer: Peer) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": peer.name}
    if peer.labels:
        meta["labels"] = dict(peer.labels)
    if peer.annotations:
        meta["annotations"] = dict(peer.annotations)
    if peer.resource_version:
        meta["resourceVersion"] = peer.resource_version
    return {
        "apiVersion": API_VERSION,
        "kind": "WireKubePeer",
        "metadata": meta,
        "spec": peer_spec_to_cr(peer.spec),
        "status": peer_status_to_cr(peer.status),
    }


def peer_status_to_cr(status: PeerStatus) -> dict[str, Any]:
    out: dict[str, Any] = {
        "connected": status.connected,
        "natType": status.nat_type.value,
        "peerTransports": {k: v.value for k, v in sorted(status.peer_transports.items())},
    }
    if status.transport_mode is not None:
        out["transportMode"] = status.transport_mode.value
    if status.endpoint_discovery_method:
        out["endpointDiscoveryMethod"] = status.endpoint_discovery_method
    if status.last_handshake:
        out["lastHandshake"] = status.last_handshake
    out["natPortStep"] = status.nat_port_step
    out["relayReasons"] = dict(sorted(status.relay_reasons.items()))
    out["hostEndpoints"] = list(status.host_endpoints)
    out["udpBlocked"] = status.udp_blocked
    if status.engine:
        out["engine"] = status.engine
    out["conditions"] = [dict(x) for x in sorted(status.conditions, key=lambda x: str(x.get("type")))]
    out["observedEndpoints"] = dict(sorted(status.observed_endpoints.items()))
    out["birthday"] = {
        name: {"round": r.round, "notBefore": r.not_before, "portMin": r.port_min, "portMax": r.port_max}
        for name, r in sorted(status.birthday.items())
    }
    if status.path_mtu:
        out["pathMTU"] = dict(sorted(status.path_mtu.items()))
    return out


# --------------------------------------------------------------------------------------------
# Where a node's status goes (issue 20): per-node facts on WireKubePeer (every agent watches it),
# per-pair observations on the node's WireKubeNodeReport (nobody watches it), per-pair
# coordination on WireKubePairSignal "<from>.<to>" (only <to> watches it).
# --------------------------------------------------------------------------------------------

LABEL_SIGNAL_FROM = "wirekube.io/from"
LABEL_SIGNAL_TO = "wirekube.io/to"

REPORT_FIELDS = ("transportMode", "peerTransports", "relayReasons", "pathMTU", "lastHandshake", "natPortStep",
                 "conditions")
"""status fields that live on the WireKubeNodeReport (and no longer on WireKubePeer).  Conditions
(RelayUnreachable, RelayProxyEPERM, RoutesGranted) are read by people and doctor, never by other
agents, and their messages are long: on the peer, one relay outage alone took it past 2 KB and
sent ~2 KB to every agent twice (measured by bench-scale's ``conditions`` part)."""
SIGNAL_FIELDS = ("observedEndpoints", "birthday")
"""status fields a v1alpha1 agent kept on its WireKubePeer and an issue-20 agent sends as pair signals."""
PAIR_FIELDS = REPORT_FIELDS + SIGNAL_FIELDS


def peer_facts_to_cr(status: PeerStatus) -> dict[str, Any]:
    """The WireKubePeer status: what every agent needs from every peer, O(1) in the mesh's size."""
    return {k: v for k, v in peer_status_to_cr(status).items() if k not in PAIR_FIELDS}


def report_status_to_cr(status: PeerStatus) -> dict[str, Any]:
    """The WireKubeNodeReport status: this node's view of each pair."""
    full = peer_status_to_cr(status)
    out = {"peerTransports": full["peerTransports"], "relayReasons": full["relayReasons"],
           "pathMTU": dict(sorted(status.path_mtu.items()))}
    if status.transport_mode is not None:  # a summary of the pairs: readers of pairs want it, agents do not
        out["transportMode"] = status.transport_mode.value
    # A symmetric NAT's port step varies from one STUN round to the next and no agent reads it.
    out["natPortStep"] = status.nat_port_step
    if status.last_handshake:
        out["lastHandshake"] = status.last_handshake
    if status.conditions:
        out["conditions"] = full["conditions"]
    return out


REFLECTION_WITNESSES = 24
"""Expected number of nodes that report where they see a given node (endpoint reflection needs
agreeing observers, not every peer's vote): each node is a witness for a subject with probability
REFLECTION_WITNESSES / peers, decided by a hash of both names (no coordination; in meshes of up
to that many peers everybody is one). With 40 % of pairs relayed, ~14 witnesses on direct paths
are expected, none with a probability near e^-14."""


def is_witness(subject: str, observer: str, peers: int) -> bool:
    """Whether ``observer`` reports its observation of ``subject`` (see REFLECTION_WITNESSES)."""
    if peers <= REFLECTION_WITNESSES:
        return True
    digest = hashlib.blake2b(f"{subject}\0{observer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < (REFLECTION_WITNESSES / peers) * 2**64


def pair_signal_specs(status: PeerStatus, sender: str = "", peers: int = 0) -> dict[str, dict[str, Any]]:
    """What this node (``sender``, in a mesh of ``peers``) tells each other node: the spec of the
    WireKubePairSignal to that node, by its name. Observed endpoints only as one of the subject's
    witnesses (:func:`is_witness`); birthday rounds always."""
    out: dict[str, dict[str, Any]] = {}
    for name, endpoint in status.observed_endpoints.items():
        if is_witness(name, sender, peers):
            out.setdefault(name, {})["observedEndpoint"] = endpoint
    for name, r in status.birthday.items():
        out.setdefault(name, {})["birthday"] = {"round": r.round, "notBefore": r.not_before,
                                                 "portMin": r.port_min, "portMax": r.port_max}
    return dict(sorted(out.items()))


def pair_signal_name(sender: str, addressee: str) -> str:
    return f"{sender}.{addressee}"


def pair_signal_body(sender: str, addressee: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "WireKubePairSignal",
            "metadata": {"name": pair_signal_name(sender, addressee),
                         "labels": {LABEL_SIGNAL_FROM: sender, LABEL_SIGNAL_TO: addressee}},
            "spec": dict(spec)}


@dataclass(frozen=True)
class PairSignal:
    sender: str
    addressee: str
    observed_endpoint: str = ""
    birthday: BirthdayRound | None = None


def pair_signal_from_cr(obj: Mapping[str, Any]) -> PairSignal:
    name = _name(obj)
    c = _Ctx("WireKubePairSignal", name)
    labels = c.mapping(c.mapping(obj.get("metadata"), "metadata").get("labels"), "metadata.labels")
    sender = c.string(labels.get(LABEL_SIGNAL_FROM), f"metadata.labels.{LABEL_SIGNAL_FROM}")
    addressee = c.string(labels.get(LABEL_SIGNAL_TO), f"metadata.labels.{LABEL_SIGNAL_TO}")
    if not sender or not addressee:
        raise c.fail("metadata.labels", f"{LABEL_SIGNAL_FROM} and {LABEL_SIGNAL_TO} are required")
    spec = c.mapping(obj.get("spec"), "spec")
    observed = spec.get("observedEndpoint")
    rounds = _birthday(c, {addressee: spec["birthday"]}, "spec.birthday") if spec.get("birthday") is not None else {}
    return PairSignal(sender, addressee, str(c.endpoint(observed, "spec.observedEndpoint")) if observed else "",
                      rounds.get(addressee))


def with_signal(peer: Peer, signal: PairSignal) -> Peer:
    """``peer`` as its addressee sees it: the signal's observed endpoint and birthday round in the
    status maps a v1alpha1 agent would have published them in (so readers need no second path)."""
    status = peer.status
    observed = dict(status.observed_endpoints)
    rounds = dict(status.birthday)
    if signal.observed_endpoint:
        observed[signal.addressee] = signal.observed_endpoint
    if signal.birthday is not None:
        rounds[signal.addressee] = signal.birthday
    return replace(peer, status=replace(status, observed_endpoints=observed, birthday=rounds))


def overlay_report(peer_obj: Mapping[str, Any], report_obj: Mapping[str, Any] | None) -> dict[str, Any]:
    """A WireKubePeer dict whose status also holds its node's report (the v1alpha1 shape), for
    readers of every pair (wirekubectl status, doctor, the lab). Without a report (an agent that
    predates issue 20) the peer's own status fields stand."""
    out = dict(peer_obj)
    status = dict(out.get("status") or {})
    rstatus = (report_obj or {}).get("status") or {}
    for k in REPORT_FIELDS:
        if k in rstatus:
            status[k] = rstatus[k]
    out["status"] = status
    return out


# --------------------------------------------------------------------------------------------
# WireKubeGateway
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayRoute:
    cidr: IPNetwork
    description: str = ""


@dataclass(frozen=True)
class Snat:
    enabled: bool = True
    source_ip: ipaddress.IPv4Address | None = None


@dataclass(frozen=True)
class HealthCheck:
    enabled: bool = False
    target: str = ""
    interval_seconds: int = 30
    timeout_seconds: int = 5
    failure_threshold: int = 3

    @property
    def target_host(self) -> str:
        return self.target.rsplit(":", 1)[0] if self.target_port else self.target

    @property
    def target_port(self) -> int | None:
        host, sep, port = self.target.rpartition(":")
        return int(port) if sep and port.isdigit() and not host.endswith(":") else None


@dataclass(frozen=True)
class GatewaySpec:
    peer_refs: tuple[str, ...]
    routes: tuple[GatewayRoute, ...]
    client_refs: tuple[str, ...] = ()
    snat: Snat = Snat()
    health_check: HealthCheck = HealthCheck()
    virtual_ip: ipaddress.IPv4Interface | None = None
    """An address (with its subnet's prefix) the active gateway peer holds on its interface in that
    subnet and announces by gratuitous ARP, so the network behind the gateway can route the mesh's
    CIDRs to one next hop that follows failover (on-premises routers, the lab's VPC host)."""


@dataclass(frozen=True)
class HealthReport:
    """One gateway peer's health check result, written by that peer's own agent after each check
    (``status.peerHealthDetail.<peer>``)."""

    last_check: str = ""
    consecutive_failures: int = 0
    message: str = ""


@dataclass(frozen=True)
class ForwardingAck:
    """A gateway peer's agent confirming forwarding and SNAT are in place for ``routes``
    (``status.forwarding.<peer>``)."""

    ready: bool = False
    routes: tuple[IPNetwork, ...] = ()
    epoch: int = 0
    """``status.handoverEpoch`` when the acknowledgement was written."""


@dataclass(frozen=True)
class GatewayStatus:
    active_peer: str = ""
    ready: bool = False
    routes_injected: int = 0
    peer_health: Mapping[str, str] = field(default_factory=dict)
    last_health_check: str = ""
    pending_peer: str = ""
    routes: tuple[IPNetwork, ...] = ()
    clients: tuple[str, ...] = ()
    peer_health_detail: Mapping[str, HealthReport] = field(default_factory=dict)
    forwarding: Mapping[str, ForwardingAck] = field(default_factory=dict)
    observed_generation: int = 0
    handover_epoch: int = 0


@dataclass(frozen=True)
class Gateway:
    name: str
    spec: GatewaySpec
    status: GatewayStatus = GatewayStatus()
    generation: int = 0


def gateway_from_cr(obj: Mapping[str, Any]) -> Gateway:
    name = _name(obj)
    c = _Ctx("WireKubeGateway", name)
    meta = c.mapping(obj.get("metadata"), "metadata")
    spec = c.mapping(obj.get("spec"), "spec")
    peer_refs = tuple(
        c.string(x, f"spec.peerRefs[{i}]") for i, x in enumerate(c.list(spec.get("peerRefs"), "spec.peerRefs"))
    )
    if not peer_refs:
        raise c.fail("spec.peerRefs", "needs at least one gateway peer")
    routes: list[GatewayRoute] = []
    for i, r in enumerate(c.list(spec.get("routes"), "spec.routes")):
        r = c.mapping(r, f"spec.routes[{i}]")
        routes.append(
            GatewayRoute(
                cidr=c.cidr(r.get("cidr"), f"spec.routes[{i}].cidr"),
                description=c.string(r.get("description"), f"spec.routes[{i}].description"),
            )
        )
    snat = c.mapping(spec.get("snat"), "spec.snat")
    hc = c.mapping(spec.get("healthCheck"), "spec.healthCheck")
    health = HealthCheck(
        enabled=c.boolean(hc.get("enabled"), "spec.healthCheck.enabled", False),
        target=c.string(hc.get("target"), "spec.healthCheck.target"),
        interval_seconds=c.integer(hc.get("intervalSeconds"), "spec.healthCheck.intervalSeconds", 30, 1, 3600),
        timeout_seconds=c.integer(hc.get("timeoutSeconds"), "spec.healthCheck.timeoutSeconds", 5, 1, 3600),
        failure_threshold=c.integer(
            hc.get("failureThreshold"), "spec.healthCheck.failureThreshold", 3, 1, 100
        ),
    )
    if health.enabled and not health.target:
        raise c.fail("spec.healthCheck.target", "required when spec.healthCheck.enabled is true")
    if health.timeout_seconds > health.interval_seconds:
        raise c.fail("spec.healthCheck.timeoutSeconds", "must not exceed intervalSeconds")
    return Gateway(
        name=name,
        spec=GatewaySpec(
            peer_refs=peer_refs,
            routes=tuple(routes),
            client_refs=tuple(
                c.string(x, f"spec.clientRefs[{i}]")
                for i, x in enumerate(c.list(spec.get("clientRefs"), "spec.clientRefs"))
            ),
            snat=Snat(
                enabled=c.boolean(snat.get("enabled"), "spec.snat.enabled", True),
                source_ip=c.ipv4(snat["sourceIP"], "spec.snat.sourceIP") if snat.get("sourceIP") else None,
            ),
            health_check=health,
            virtual_ip=_virtual_ip(c, spec.get("virtualIP")),
        ),
        status=_gateway_status(c, c.mapping(obj.get("status"), "status")),
        generation=c.integer(meta.get("generation"), "metadata.generation", 0, 0, 2**63 - 1),
    )


def _virtual_ip(c: _Ctx, value: object) -> ipaddress.IPv4Interface | None:
    if value in (None, ""):
        return None
    text = c.string(value, "spec.virtualIP")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise c.fail("spec.virtualIP",
                     f"{text!r} is not an IPv4 address with a prefix length (10.100.0.10/24)") from None
    if "/" not in text or iface.network.prefixlen >= 31 or iface.ip in (iface.network.network_address,
                                                                      iface.network.broadcast_address):
        raise c.fail("spec.virtualIP", f"{text!r} must be a host address in a subnet, like 10.100.0.10/24")
    return iface


def _gateway_status(c: _Ctx, status: Mapping[str, Any]) -> GatewayStatus:
    detail = c.mapping(status.get("peerHealthDetail"), "status.peerHealthDetail")
    forwarding = c.mapping(status.get("forwarding"), "status.forwarding")
    return GatewayStatus(
        active_peer=c.string(status.get("activePeer"), "status.activePeer"),
        ready=c.boolean(status.get("ready"), "status.ready", False),
        routes_injected=c.integer(status.get("routesInjected"), "status.routesInjected", 0, 0, 2**31 - 1),
        peer_health={
            str(k): c.string(v, f"status.peerHealth.{k}")
            for k, v in c.mapping(status.get("peerHealth"), "status.peerHealth").items()
        },
        last_health_check=c.string(status.get("lastHealthCheck"), "status.lastHealthCheck"),
        pending_peer=c.string(status.get("pendingPeer"), "status.pendingPeer"),
        routes=tuple(
            c.cidr(x, f"status.routes[{i}]") for i, x in enumerate(c.list(status.get("routes"), "status.routes"))
        ),
        clients=tuple(
            c.string(x, f"status.clients[{i}]") for i, x in enumerate(c.list(status.get("clients"), "status.clients"))
        ),
        peer_health_detail={
            str(k): _health_report(c, c.mapping(v, f"status.peerHealthDetail.{k}"), f"status.peerHealthDetail.{k}")
            for k, v in detail.items()
        },
        forwarding={
            str(k): _forwarding_ack(c, c.mapping(v, f"status.forwarding.{k}"), f"status.forwarding.{k}")
            for k, v in forwarding.items()
        },
        observed_generation=c.integer(
            status.get("observedGeneration"), "status.observedGeneration", 0, 0, 2**63 - 1
        ),
        handover_epoch=c.integer(status.get("handoverEpoch"), "status.handoverEpoch", 0, 0, 2**63 - 1),
    )


def _health_report(c: _Ctx, obj: Mapping[str, Any], path: str) -> HealthReport:
    return HealthReport(
        last_check=c.string(obj.get("lastCheck"), f"{path}.lastCheck"),
        consecutive_failures=c.integer(
            obj.get("consecutiveFailures"), f"{path}.consecutiveFailures", 0, 0, 2**31 - 1
        ),
        message=c.string(obj.get("message"), f"{path}.message"),
    )


def _forwarding_ack(c: _Ctx, obj: Mapping[str, Any], path: str) -> ForwardingAck:
    return ForwardingAck(
        ready=c.boolean(obj.get("ready"), f"{path}.ready", False),
        routes=tuple(
            c.cidr(x, f"{path}.routes[{i}]") for i, x in enumerate(c.list(obj.get("routes"), f"{path}.routes"))
        ),
        epoch=c.integer(obj.get("epoch"), f"{path}.epoch", 0, 0, 2**63 - 1),
    )


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        kind = obj.get("kind", "object")
        raise InvalidObject(str(kind), "", "metadata.name", "required")
    return name


# ---------------------------------------------------------------------------- WireKubeRouteGrant

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
GRANT_MANAGER = "wirekube-gateway"
"""``app.kubernetes.io/managed-by`` of the grants the controller derives from Node objects."""
GRANT_NODE_PREFIX = "node."
"""Controller-managed grants are named ``node.<node name>``."""


@dataclass(frozen=True)
class RouteGrant:
    """Who may route what: the peers of ``nodes`` may carry ``cidrs`` (and anything inside them).

    Written by administrators, and by the gateway controller for what the Node objects say
    (InternalIP, pod CIDRs); agents can only read grants.
    """

    name: str
    nodes: tuple[str, ...]
    cidrs: tuple[IPNetwork, ...]
    description: str = ""
    managed: bool = False
    """Derived by the controller from a Node (``node.<name>``), not written by a person."""


def route_grant_from_cr(obj: Mapping[str, Any]) -> RouteGrant:
    name = _name(obj)
    c = _Ctx("WireKubeRouteGrant", name)
    meta = c.mapping(obj.get("metadata"), "metadata")
    labels = c.mapping(meta.get("labels"), "metadata.labels")
    spec = c.mapping(obj.get("spec"), "spec")
    nodes = tuple(c.string(x, f"spec.nodes[{i}]") for i, x in enumerate(c.list(spec.get("nodes"), "spec.nodes")))
    if not nodes or any(not n for n in nodes):
        raise c.fail("spec.nodes", "needs at least one node name")
    cidrs = tuple(c.cidr(x, f"spec.cidrs[{i}]") for i, x in enumerate(c.list(spec.get("cidrs"), "spec.cidrs")))
    return RouteGrant(
        name=name,
        nodes=nodes,
        cidrs=cidrs,
        description=c.string(spec.get("description"), "spec.description"),
        managed=labels.get(LABEL_MANAGED_BY) == GRANT_MANAGER and name.startswith(GRANT_NODE_PREFIX),
    )


def route_grant_to_cr(grant: RouteGrant) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": grant.name}
    if grant.managed:
        meta["labels"] = {LABEL_MANAGED_BY: GRANT_MANAGER, LABEL_NODE: grant.nodes[0]}
    spec: dict[str, Any] = {"nodes": list(grant.nodes), "cidrs": [str(n) for n in grant.cidrs]}
    if grant.description:
        spec["description"] = grant.description
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeRouteGrant", "metadata": meta, "spec": spec}
