"""The embedded procedural world."""
