"""The Catena API client: tokens, create message, get/list operations, list users.

Knows nothing of Singer; turns Catena's responses into typed results (``Accepted``/``Failure``)
that delivery decides on.
"""

from __future__ import annotations

from target_catena_messages.catena.auth import (
    ClientCredentialsTokenProvider,
    StaticTokenProvider,
    TokenProvider,
    require_safe_url,
)
from target_catena_messages.catena.client import (
    Accepted,
    CatenaClient,
    ClientStats,
    Failure,
    make_session,
)
from target_catena_messages.catena.errors import (
    CatenaApiError,
    CredentialsRefused,
    TokenNotRefreshable,
    TokenUnavailable,
)
from target_catena_messages.catena.transport import HttpTransport, Response

__all__ = [
    "Accepted",
    "CatenaApiError",
    "CatenaClient",
    "ClientCredentialsTokenProvider",
    "ClientStats",
    "CredentialsRefused",
    "Failure",
    "HttpTransport",
    "Response",
    "StaticTokenProvider",
    "TokenNotRefreshable",
    "TokenProvider",
    "TokenUnavailable",
    "make_session",
    "require_safe_url",
]
