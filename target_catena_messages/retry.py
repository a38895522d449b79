"""The retry model and failure classification, as the target's modules import them.

Both live in the client package (``catena/classify.py`` and ``catena/retry.py``) because the
client's own loops use them and the client imports nothing from the target; this module only
names them for the target's side. Where to change a policy: docs/retry.md.
"""

from __future__ import annotations

from target_catena_messages.catena.classify import (
    FailureKind,
    RequestNotSendable,
    classify_exception,
    classify_status,
    retry_after_seconds,
)
from target_catena_messages.catena.retry import (
    Attempt,
    GiveUp,
    GiveUpReason,
    RejectionBreaker,
    RetryPolicy,
    always,
)

__all__ = [
    "Attempt",
    "FailureKind",
    "GiveUp",
    "GiveUpReason",
    "RejectionBreaker",
    "RequestNotSendable",
    "RetryPolicy",
    "always",
    "classify_exception",
    "classify_status",
    "retry_after_seconds",
]
