"""The Catena client a run (or the ledger report) uses, built from the settings.

One place decides how settings become a client: the token flow (a ready ``access_token`` or
client credentials), a connection pool sized to the concurrency cap, and every issued token
registered with the redactor, so no log line can carry it.
"""

from __future__ import annotations

from target_catena_messages.catena.auth import (
    ClientCredentialsTokenProvider,
    StaticTokenProvider,
    TokenProvider,
)
from target_catena_messages.catena.client import CatenaClient, make_session
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import Settings


class RedactingTokens:
    """A token provider that registers every token it hands out with the redactor."""

    def __init__(self, inner: TokenProvider, redactor: Redactor) -> None:
        self.inner = inner
        self._redactor = redactor

    def token(self) -> str:
        """Return the current token (masked in logs from now on)."""
        token = self.inner.token()
        self._redactor.add(token)
        return token

    def refresh_after_failure(self, failed_token: str) -> str:
        """Refresh after a 401/403 with ``failed_token``."""
        token = self.inner.refresh_after_failure(failed_token)
        self._redactor.add(token)
        return token


def client_from_settings(
    settings: Settings, redactor: Redactor
) -> tuple[CatenaClient, RedactingTokens]:
    """The client, and its token provider (whose ``inner`` counts token requests)."""
    session = make_session(settings.max_concurrency + 2)
    inner: TokenProvider
    if settings.access_token:
        inner = StaticTokenProvider(settings.access_token)
    else:
        inner = ClientCredentialsTokenProvider(
            session,
            settings.auth_url,
            settings.client_id or "",
            settings.client_secret or "",
            scope=settings.scope,
            timeout=settings.request_timeout_seconds,
        )
    tokens = RedactingTokens(inner, redactor)
    client = CatenaClient(
        settings.api_url, tokens, session, timeout=settings.request_timeout_seconds
    )
    return client, tokens
