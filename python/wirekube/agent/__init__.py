"""The WireKube node agent: turns WireKubePeer objects into a WireGuard mesh on its node.

Layers:
- pure: ``plan`` (desired state and diff), ``registration`` and ``status`` (what to publish),
  ``wg.uapi`` (wireguard-go's text protocol) and ``wg.kernel`` message construction;
- adapters: ``netlink`` (the only module importing pyroute2), ``wg.userspace`` / ``wg.kernel``
  (WireGuard engines), ``source`` (where mesh and peers come from: the API server or a file);
- service: ``reconcile`` (observe -> plan -> diff -> apply loop) and ``main`` (the CLI).
"""
