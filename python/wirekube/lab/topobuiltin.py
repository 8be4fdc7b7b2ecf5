"""The built-in topologies (``wirekube-lab topologies`` lists them), and resolving a topology
reference: a built-in's name or a topology file's path.

Each built-in is a commented YAML file in ``topologies/`` next to this module, read once at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from wirekube.errors import WireKubeError
from wirekube.lab.topomodel import Topology
from wirekube.lab.topoparse import load_topology, parse_topology_yaml

BUILTIN_DIR = Path(__file__).with_name("topologies")
"""Where the built-in topologies' YAML files are (``<name>.yaml``)."""

BUILTIN_TOPOLOGIES: Mapping[str, str] = {
    name: (BUILTIN_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    for name in ("default", "eks-hybrid", "chart")
}
"""Each built-in topology's YAML text, by name, in the order ``wirekube-lab topologies`` lists them."""

DEFAULT_TOPOLOGY_YAML = BUILTIN_TOPOLOGIES["default"]
EKS_HYBRID_TOPOLOGY_YAML = BUILTIN_TOPOLOGIES["eks-hybrid"]
CHART_TOPOLOGY_YAML = BUILTIN_TOPOLOGIES["chart"]

BUILTIN_DESCRIPTIONS: Mapping[str, str] = {
    "default": "what `make lab` runs: 2 EC2 nodes + a VPC host, 6 hybrid nodes behind every NAT kind, "
               "a pod per node",
    "eks-hybrid": "the EKS Hybrid guide's CIDRs: 2 EC2 nodes + a VPC host, 3 hybrid nodes behind "
                  "port-restricted cone and symmetric NAT, a pod per node",
    "chart": "the Helm chart on 3 real kubelet nodes (open, port-restricted cone, symmetric): "
             "`make images` first",
}


class UnknownTopology(WireKubeError):
    """Neither a built-in topology's name nor a readable file."""


def builtin_topology(name: str = "default") -> Topology:
    """A built-in topology by name (``default``, ``eks-hybrid`` or ``chart``; see BUILTIN_TOPOLOGIES)."""
    if name not in BUILTIN_TOPOLOGIES:
        raise KeyError(f"no built-in topology {name!r} (have: {', '.join(BUILTIN_TOPOLOGIES)})")
    return parse_topology_yaml(BUILTIN_TOPOLOGIES[name], f"built-in topology {name!r}")


def default_topology() -> Topology:
    return builtin_topology("default")


def resolve_topology(ref: str) -> Topology:
    """``ref`` names a built-in topology or is the path of a topology file.

    Raises :class:`UnknownTopology` (neither, or the file cannot be read) or
    :class:`TopologyError` (the file has mistakes).
    """
    if ref in BUILTIN_TOPOLOGIES:
        return builtin_topology(ref)
    choices = f"built-in topologies: {', '.join(BUILTIN_TOPOLOGIES)}, or the path of a topology file"
    path = Path(ref)
    if not path.exists():
        raise UnknownTopology(f"no topology {ref!r}: {choices}")
    if not path.is_file():
        raise UnknownTopology(f"topology {ref!r} is not a file: {choices}")
    try:
        return load_topology(path)
    except OSError as e:
        raise UnknownTopology(f"cannot read topology file {ref}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UnknownTopology(f"topology file {ref} is not UTF-8 text ({e.reason} at byte {e.start})") from e
