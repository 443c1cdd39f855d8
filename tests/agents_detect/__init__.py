"""Helpers and agent scripts for the detector tests (tests/test_detect_*.py)."""
