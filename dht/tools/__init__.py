"""tools layer: see docs/architecture.md."""
