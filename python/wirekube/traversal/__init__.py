"""NAT traversal: classification, path choice, failover state (pure) and their I/O helpers."""
