"""Run inside a kernel node's guest: the kernel engine against the real WireGuard module.

Usage: python kernel_engine_check.py IFNAME  -> one JSON object on stdout, what each step read
back (the test in test_lab_kernel.py asserts on it).  Works on a scratch link it creates and
deletes; never touches the agent's ``wire_kube``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import sys
import time
from typing import Any

from wirekube.agent import keys
from wirekube.agent.netlink import Netlink
from wirekube.agent.wg.base import PutPeer, RemovePeer, SetDevice, WgDeviceState, WgPeerConfig
from wirekube.agent.wg.kernel import KernelEngine
from wirekube.models import Endpoint


def _state(dev: WgDeviceState) -> dict[str, Any]:
    return {
        "public_key": dev.public_key, "listen_port": dev.listen_port, "fwmark": dev.fwmark,
        "peers": {k: {"endpoint": str(p.config.endpoint) if p.config.endpoint else None,
                      "allowed_ips": [str(n) for n in p.config.allowed_ips],
                      "keepalive": p.config.persistent_keepalive} for k, p in dev.peers.items()},
    }


_T0 = time.monotonic()


def step(what: str) -> None:
    """Progress on stderr (a timeout then shows how far the check got, and how fast)."""
    print(f"{time.monotonic() - _T0:7.1f}s {what}", file=sys.stderr, flush=True)


def main(ifname: str) -> None:
    step("imports done")
    out: dict[str, Any] = {}
    nl = Netlink()
    if nl.link(ifname) is not None:
        nl.delete_link(ifname)
    engine = KernelEngine(ifname, nl)
    try:
        step("netlink open")
        out["created"] = engine.ensure_device()
        out["created_again"] = engine.ensure_device()
        out["fresh"] = _state(engine.get())
        private = keys.generate_private_key()
        out["expected_public_key"] = keys.public_key_of(private)
        peer_a = base64.b64encode(bytes(range(32))).decode()
        peer_b = base64.b64encode(bytes(range(1, 33))).decode()
        a = WgPeerConfig(peer_a, Endpoint.parse("198.19.1.77:51820"),
                         (ipaddress.ip_network("10.255.1.1/32"), ipaddress.ip_network("10.100.9.0/24")), 1)
        b = WgPeerConfig(peer_b, Endpoint.parse("127.0.0.1:40001"), (ipaddress.ip_network("10.255.1.2/32"),), 25)
        engine.apply([SetDevice(private_key=True, listen_port=51999, fwmark=0x574B),
                      PutPeer(a, create=True), PutPeer(b, create=True)], private)
        out["configured"] = _state(engine.get())
        step("configured")
        # Replace A's allowed IPs (not add to them), move its endpoint, change its keepalive.
        a2 = WgPeerConfig(peer_a, Endpoint.parse("198.18.3.2:40000"), (ipaddress.ip_network("10.255.1.1/32"),), 0)
        engine.apply([PutPeer(a2, create=False)], private)
        out["replaced"] = _state(engine.get())
        # Only the endpoint (relay proxy -> direct): the rest must stay.
        b2 = WgPeerConfig(peer_b, Endpoint.parse("198.19.1.88:51820"), (), 0)
        engine.apply([PutPeer(b2, create=False, set_allowed_ips=False, set_keepalive=False)], private)
        out["endpoint_only"] = _state(engine.get())
        # update_only on a peer that is gone must not create it
        engine.apply([RemovePeer(peer_a)], private)
        out["removed"] = _state(engine.get())
        engine.apply([PutPeer(a, create=False)], private)
        out["update_only_absent"] = _state(engine.get())
        step("small cases done")
        # A large mesh in one pass: 300 peers x 8 AllowedIPs (~90 KB of attributes) goes in, and
        # the dump that comes back spans several netlink messages (merged per peer).
        many = [WgPeerConfig(base64.b64encode(i.to_bytes(2, "big") * 16).decode(), None,
                             tuple(ipaddress.ip_network(f"10.{100 + j}.{i // 250}.{i % 250}/32") for j in range(8)), 0)
                for i in range(300)]
        engine.apply([PutPeer(c, create=True) for c in many], private)
        step("300 peers applied")
        dev = engine.get()
        out["many"] = {"peers": len(dev.peers),
                       "all_allowed_ips": all(len(dev.peers[c.public_key].config.allowed_ips) == 8 for c in many)}
        engine.apply([RemovePeer(c.public_key) for c in many], private)
        out["many_removed"] = len(engine.get().peers)
        step("300 peers read back and removed")
        # A second apply of the same device values changes nothing (and does not fail).
        engine.apply([SetDevice(private_key=False, listen_port=51999, fwmark=0x574B)], private)
        out["device_again"] = _state(engine.get())
    finally:
        nl.delete_link(ifname)
        out["deleted"] = nl.link(ifname) is None
        nl.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "wkcheck0")
