"""The Catena API client: tokens, create message, get/list operations, list users.

Knows nothing of Singer nor of the rest of the target (it imports nothing from it): turns
Catena's responses into typed results (``Accepted``/``Failure``) classified by ``classify``, and
owns the retry model (``retry``) that every caller retries with.
"""

from __future__ import annotations

from target_catena_messages.catena.auth import (
    ClientCredentialsTokenProvider,
    StaticTokenProvider,
    TokenProvider,
    require_safe_url,
)
from target_catena_messages.catena.classify import FailureKind
from target_catena_messages.catena.client import (
    Accepted,
    CatenaClient,
    Failure,
    make_session,
)
from target_catena_messages.catena.errors import (
    CatenaApiError,
    ClientConfigError,
    CredentialsRefused,
    RequestNotSendable,
    TokenNotRefreshable,
    TokenUnavailable,
)
from target_catena_messages.catena.retry import GiveUp, RejectionBreaker, RetryPolicy
from target_catena_messages.catena.transport import HttpTransport, Response

__all__ = [
    "Accepted",
    "CatenaApiError",
    "CatenaClient",
    "ClientConfigError",
    "ClientCredentialsTokenProvider",
    "CredentialsRefused",
    "Failure",
    "FailureKind",
    "GiveUp",
    "HttpTransport",
    "RejectionBreaker",
    "RequestNotSendable",
    "Response",
    "RetryPolicy",
    "StaticTokenProvider",
    "TokenNotRefreshable",
    "TokenProvider",
    "TokenUnavailable",
    "make_session",
    "require_safe_url",
]
