"""WireGuard engines behind one interface (:class:`~wirekube.agent.wg.base.WireGuardEngine`):
``kernel`` (netlink) and ``userspace`` (supervised wireguard-go, UAPI); ``select`` picks one."""
