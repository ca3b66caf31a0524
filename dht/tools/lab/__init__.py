"""``dht lab``: a real anycast lab in network namespaces (docs/lab.md)."""
