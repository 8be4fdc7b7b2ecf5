"""WireKube: a Kubernetes-native WireGuard mesh.

Layers (see README "Architecture"):
- pure: ``models``, ``ipam``, ``errors`` and the protocol codecs never do I/O, never read the
  clock and never import ``kubernetes``, ``pyroute2`` or asyncio networking;
- adapters: ``k8s`` is the only module that imports ``kubernetes``;
- services: agent, relay and gateway controller, each a console script.
"""

__version__ = "0.1.0"

GROUP = "wirekube.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
