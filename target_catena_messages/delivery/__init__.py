"""Sending: lanes per driver, a global cap, the shared throttle, lookups before a resend."""
