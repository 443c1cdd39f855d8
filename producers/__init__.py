"""Placeholder; the producer lands with issue 3."""
