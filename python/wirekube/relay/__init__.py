"""The WireKube relay: WireGuard datagrams over framed TCP for nodes that cannot meet over UDP.

- :mod:`~wirekube.relay.protocol`: the wire format (sans-I/O codec);
- :mod:`~wirekube.relay.auth`: proof of key ownership at registration;
- :mod:`~wirekube.relay.server`: the asyncio server (``RelayServer``, ``RelaySettings``);
- :mod:`~wirekube.relay.client`: ``RelayClient``, used by the agent;
- :mod:`~wirekube.relay.stun`: the built-in STUN Binding responder;
- :mod:`~wirekube.relay.authz`: ``--authorize-peers`` (allowed keys from WireKubePeer objects);
- :mod:`~wirekube.relay.metrics` and :mod:`~wirekube.relay.cli`.
"""
