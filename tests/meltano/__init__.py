"""Helpers for the tests that drive the real Meltano CLI."""
