"""pops layer: see docs/architecture.md."""
