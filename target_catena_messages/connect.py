"""The Catena client a run (or the ledger report) uses, built from the settings.

One place decides how settings become a client: the token flow (a ready ``access_token`` or
client credentials), a connection pool sized to the concurrency cap, and every issued token
registered with the redactor, so no log line can carry it.

It is also the boundary between the client package, which knows nothing of runs, and the target:
what the client says "every further request would fail the same way" with (an unusable URL, CA
bundle or proxy; refused credentials) becomes a :class:`FatalError` here, so the run ends with
one clear line.
"""

from __future__ import annotations

from target_catena_messages.catena.auth import (
    ClientCredentialsTokenProvider,
    StaticTokenProvider,
    TokenProvider,
)
from target_catena_messages.catena.client import CatenaClient, make_session
from target_catena_messages.catena.errors import (
    ClientConfigError,
    CredentialsRefused,
    TokenNotRefreshable,
)
from target_catena_messages.errors import ConfigError, FatalError
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import Settings


class FatalCredentialsRefused(CredentialsRefused, FatalError):
    """The token endpoint refused our credentials: the run ends."""


class FatalTokenNotRefreshable(TokenNotRefreshable, FatalError):
    """The fixed ``access_token`` was refused (401) and cannot be renewed: the run ends.

    Still a ``TokenNotRefreshable``, so the client can make a 403 with it one rejection.
    """


class RedactingTokens:
    """A token provider that registers every token it hands out with the redactor.

    And the boundary for refused credentials: they leave it as fatal errors of the run.
    """

    def __init__(self, inner: TokenProvider, redactor: Redactor) -> None:
        self.inner = inner
        self._redactor = redactor

    def token(self) -> str:
        """Return the current token (masked in logs from now on)."""
        try:
            token = self.inner.token()
        except CredentialsRefused as exc:
            raise _fatal(exc) from None
        self._redactor.add(token)
        return token

    def refresh_after_failure(self, failed_token: str) -> str:
        """Refresh after a 401/403 with ``failed_token``."""
        try:
            token = self.inner.refresh_after_failure(failed_token)
        except CredentialsRefused as exc:
            raise _fatal(exc) from None
        self._redactor.add(token)
        return token


def _fatal(exc: CredentialsRefused) -> CredentialsRefused:
    if isinstance(exc, TokenNotRefreshable):
        return FatalTokenNotRefreshable(str(exc))
    return FatalCredentialsRefused(str(exc))


def client_from_settings(
    settings: Settings, redactor: Redactor
) -> tuple[CatenaClient, RedactingTokens]:
    """The client, and its token provider (whose ``inner`` counts token requests).

    Raises:
        ConfigError: A URL, the CA bundle, the proxy or ``access_token`` is unusable.
    """
    try:
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
            session.prepare(settings.auth_url)
        tokens = RedactingTokens(inner, redactor)
        client = CatenaClient(
            settings.api_url, tokens, session, timeout=settings.request_timeout_seconds
        )
        session.prepare(settings.api_url)
    except ClientConfigError as exc:
        raise ConfigError(str(exc)) from None
    return client, tokens
