"""edge layer: see docs/architecture.md."""
