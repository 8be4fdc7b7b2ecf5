"""The lab topology: what a YAML topology file says, checked, as frozen dataclasses.

A topology describes one lab (see ``wirekube.lab.net`` for how it is built):

- ``internet``: the public segment.  It holds the relay's address (optionally a load balancer
  with ``replicas`` behind it, each a relay process meshed with the others) and at least two STUN
  endpoints, all inside ``198.18.0.0/24`` (the lab's "services" block of the benchmarking range
  198.18.0.0/15, which the lab uses as its whole public address space).
- ``sites``: each a LAN behind one router, with ``nat`` one of ``none`` (public addresses on the
  nodes' NICs), ``port-restricted-cone``, ``full-cone``, ``symmetric``, ``udp-blocked`` or
  ``proxy-only`` (only TCP to ``internet.proxy``, a real squid allowing CONNECT to 443, leaves:
  the relay is reached over WSS through it), and one or more ``nodes`` (each becomes a
  Kubernetes Node).
- ``networks``: optional private networks (a "VPC" subnet) attached to named nodes, holding plain
  ``hosts`` whose ``routes`` send chosen CIDRs to a node (as a VPC route table would).
- ``management``: the CIDR of the management path from every node to the API server.

Every field is checked and every mistake is reported at once, each with the path of the field
(``sites[2].nodes[0].podCIDR: ...``), by :class:`TopologyError`.  Defaults are filled in while
parsing, so a :class:`Topology` is fully concrete (every LAN and every address is known); its
:meth:`Topology.to_dict` gives a document that parses back to an equal topology.

Example (the built-in default is ``topologies/default.yaml``, :data:`DEFAULT_TOPOLOGY_YAML`)::

    internet:
      relay: 198.18.0.2:3478          # TCP relay address (and the relay's built-in STUN port)
      stun: [198.18.0.2:3478, 198.18.0.3:3478]
    management: {cidr: 10.254.0.0/24}
    sites:
      - name: cloud
        nat: none
        lan: 198.19.1.0/24            # optional; `none` sites take public LANs in 198.19.0.0/16
        nodes:
          - name: ec2-a
            podCIDR: 10.100.1.0/24    # optional
            pods: 1                   # optional: pod namespaces behind the node
          - {name: ec2-b, address: 198.19.1.20}
          - {name: ec2-k, engine: kernel}   # optional: a qemu guest with kernel WireGuard
      - name: home
        nat: port-restricted-cone     # LAN defaults to 192.168.<site number>.0/24
        nodes: [{name: home-1}, {name: home-2}]
      - name: mobile
        nat: symmetric
        wanMTU: 1280                  # optional: the WAN link's MTU (default 1500)
        dropFragments: true           # optional: the router drops IPv4 fragments
        blockICMP: true               # optional: no "fragmentation needed" reaches anyone
        nodes: [{name: phone-1}]
    networks:
      - name: vpc
        cidr: 10.100.0.0/24
        nodes: [ec2-a, ec2-b]         # each gets a NIC on this network
        gateway: ec2-a                # default `via` of host routes
        hosts:
          - name: vpc-host
            routes: [192.168.2.0/24, {to: 10.200.0.0/16, via: ec2-b}]

The module is the lab's one entry for topologies; the work is split along its seams: the data model
(:mod:`wirekube.lab.topomodel`), parsing and validation (:mod:`wirekube.lab.topoparse`, pure but for
:func:`load_topology` reading the file it is given) and the built-in topologies, YAML files in
``topologies/`` (:mod:`wirekube.lab.topobuiltin`).
"""

from __future__ import annotations

from wirekube.lab.topobuiltin import (
    BUILTIN_DESCRIPTIONS,
    BUILTIN_DIR,
    BUILTIN_TOPOLOGIES,
    CHART_TOPOLOGY_YAML,
    DEFAULT_TOPOLOGY_YAML,
    EKS_HYBRID_TOPOLOGY_YAML,
    UnknownTopology,
    builtin_topology,
    default_topology,
    resolve_topology,
)
from wirekube.lab.topomodel import (
    DEFAULT_MANAGEMENT,
    DEFAULT_STUN_PORT,
    DEFAULT_WAN_MTU,
    FIRST_NODE_HOST,
    KUBERNETES_MODES,
    MAX_PODS_PER_NODE,
    MAX_SITES,
    MIN_WAN_MTU,
    NODE_ENGINES,
    PUBLIC_LANS,
    PUBLIC_SPACE,
    SERVICES_NET,
    Attachment,
    Endpoint,
    Host,
    Internet,
    IPv4,
    Management,
    NatKind,
    Net4,
    Node,
    PrivateNetwork,
    Route,
    Site,
    Topology,
    TopologyError,
)
from wirekube.lab.topoparse import (
    DEFAULT_PROXY,
    FIRST_REPLICA_HOST,
    MAX_RELAY_REPLICAS,
    load_topology,
    parse_topology,
    parse_topology_yaml,
)

__all__ = [
    "BUILTIN_DESCRIPTIONS",
    "BUILTIN_DIR",
    "BUILTIN_TOPOLOGIES",
    "CHART_TOPOLOGY_YAML",
    "DEFAULT_MANAGEMENT",
    "DEFAULT_PROXY",
    "DEFAULT_STUN_PORT",
    "DEFAULT_TOPOLOGY_YAML",
    "DEFAULT_WAN_MTU",
    "EKS_HYBRID_TOPOLOGY_YAML",
    "FIRST_NODE_HOST",
    "FIRST_REPLICA_HOST",
    "KUBERNETES_MODES",
    "MAX_PODS_PER_NODE",
    "MAX_RELAY_REPLICAS",
    "MAX_SITES",
    "MIN_WAN_MTU",
    "NODE_ENGINES",
    "PUBLIC_LANS",
    "PUBLIC_SPACE",
    "SERVICES_NET",
    "Attachment",
    "Endpoint",
    "Host",
    "IPv4",
    "Internet",
    "Management",
    "NatKind",
    "Net4",
    "Node",
    "PrivateNetwork",
    "Route",
    "Site",
    "Topology",
    "TopologyError",
    "UnknownTopology",
    "builtin_topology",
    "default_topology",
    "load_topology",
    "parse_topology",
    "parse_topology_yaml",
    "resolve_topology",
]
