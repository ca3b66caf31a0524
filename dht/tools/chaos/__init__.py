"""Chaos runs: a workload, a nemesis and a checker of the history (dht.tools.chaos.run)."""
