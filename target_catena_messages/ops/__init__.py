"""Operator commands and after-the-fact checks: the ledger report, re-drive, confirmation."""
