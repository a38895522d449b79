"""Bearer tokens for the Catena API: one token shared by all threads, refreshed one at a time.

Catena's docs ask clients to reuse a token until it expires (a token per call "may trigger rate
limits"), and the official Go SDK single-flights its refresh. So a provider hands out the cached
token, refreshes it shortly before ``expires_in`` runs out, and after a 401/403 refreshes only if
the token that failed is still the current one: eight threads refused at once cause one refresh.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from target_catena_messages.catena.classify import FailureKind, json_or_none, retry_after_seconds
from target_catena_messages.catena.errors import (
    ClientConfigError,
    CredentialsRefused,
    TokenNotRefreshable,
    TokenUnavailable,
)
from target_catena_messages.catena.retry import GiveUp, RetryPolicy
from target_catena_messages.catena.transport import SEND_ERRORS, HttpTransport

__all__ = [
    "ClientCredentialsTokenProvider",
    "StaticTokenProvider",
    "TokenProvider",
    "require_safe_url",
]

logger = logging.getLogger(__name__)

#: Most of the lifetime a token is reused for: refresh this long before it runs out, but never
#: earlier than 10 % of the lifetime (a 5 s token is reused for 4.5 s).
MAX_REFRESH_MARGIN_SECONDS = 60.0
#: Assumed lifetime when a token response lacks a usable ``expires_in`` (Keycloak always sends it).
FALLBACK_LIFETIME_SECONDS = 60.0
#: Total waiting budget for retrying the token endpoint before giving up on this message.
TOKEN_RETRY_SECONDS = 30.0


def token_policy(max_attempts: int = 5) -> RetryPolicy:
    """How the token endpoint is retried (docs/retry.md): a token request creates nothing.

    So every transient failure, a 429 included, uses up one of ``max_attempts`` and the server's
    retry-after is honoured; full-jitter backoff from 0.5 s up to 8 s, 30 s of waiting in all.
    """
    return RetryPolicy(
        max_retries=max(0, max_attempts - 1),
        max_retry_seconds=TOKEN_RETRY_SECONDS,
        base_seconds=0.5,
        cap_seconds=8.0,
        idempotent=True,
        count_throttled=True,
    )


class TokenProvider(Protocol):
    """Where the client gets its bearer token from."""

    def token(self) -> str:
        """The current token, fetching or refreshing it if needed."""
        ...

    def refresh_after_failure(self, failed_token: str) -> str:
        """A token to retry with after ``failed_token`` was refused (401/403).

        Refreshes only if ``failed_token`` is still the current token; otherwise another thread
        already refreshed and its newer token is returned.
        """
        ...


def _never() -> bool:
    return False


def require_safe_url(url: str, setting: str) -> str:
    """Refuse a URL that would send credentials in clear text to another machine.

    Tokens and the client secret travel to both ``api_url`` and ``auth_url``, so ``http://`` is
    allowed only for loopback hosts (the local sandbox). Credentials in the URL itself are
    refused too: they would end up in logs and error messages. The settings check calls this, so
    a URL is judged by one rule at start and again where it is used.

    Parsed the way the transport parses it, so a URL accepted here can be sent (a bad port or
    bracket is a configuration error now, not a failure of every request later).

    Returns:
        The URL without a trailing slash.

    Raises:
        ClientConfigError: The URL is not https (or loopback http), has no host, carries credentials
            or cannot be parsed.
    """
    try:
        parts = parse_url(url)
    except LocationParseError as exc:
        raise ClientConfigError(f"{setting} is not a valid URL: {exc}") from None
    if parts.auth:
        raise ClientConfigError(f"{setting} must not carry credentials")
    scheme = (parts.scheme or "").lower()
    host = (parts.host or "").strip("[]")
    if scheme == "https" and host:
        return url.rstrip("/")
    if scheme == "http" and is_loopback(host):
        return url.rstrip("/")
    raise ClientConfigError(
        f"{setting} must be an https:// URL (plain http:// only for loopback hosts: "
        f"127.0.0.0/8, ::1, localhost), got {scheme or 'no'} scheme for host {host or '(none)'!r}"
    )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the only hosts plain http may reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StaticTokenProvider:
    """A ready token from the ``access_token`` setting; no token request is ever made."""

    def __init__(self, access_token: str) -> None:
        if not access_token or not access_token.strip():
            raise ClientConfigError("access_token is empty")
        self._token = access_token.strip()

    def token(self) -> str:
        """The configured token."""
        return self._token

    def refresh_after_failure(self, failed_token: str) -> str:
        """A static token cannot be renewed, so its refusal ends the run.

        Raises:
            TokenNotRefreshable: Always (a CredentialsRefused, so fatal unless the client
                decides otherwise for a 403).
        """
        raise TokenNotRefreshable(
            "the Catena API refused the configured access_token and it cannot be refreshed; "
            "set a fresh access_token, or client_id and client_secret"
        )


@dataclass(frozen=True)
class _Issued:
    token: str
    lifetime: float


@dataclass(frozen=True)
class _Transient:
    reason: str
    retry_after: float | None
    status: int | None = None


class ClientCredentialsTokenProvider:
    """OAuth2 client-credentials tokens from Catena's Keycloak token endpoint.

    Thread-safe: the lock is held while fetching, so concurrent callers wait for the one refresh
    in progress and then share its token instead of requesting their own.

    Attributes:
        requests_made: Token requests sent so far (for the summary and for tests).
    """

    def __init__(  # noqa: PLR0917 - positional order is the agreed public signature
        self,
        session: HttpTransport,
        auth_url: str,
        client_id: str,
        client_secret: str,
        scope: str = "organization",
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_attempts: int = 5,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._session = session
        self._auth_url = require_safe_url(auth_url, "auth_url")
        self._client_id = client_id
        self._secret = client_secret
        self._scope = scope
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._policy = policy or token_policy(max_attempts)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self.requests_made = 0
        self.outage: Callable[[], bool] = _never
        """The run's word that Catena may be unavailable: a fetch then makes one attempt and
        does not warn, because the run's prober is the one retrying (one request at a time)."""

    def __repr__(self) -> str:
        cls = type(self).__name__
        return f"{cls}(auth_url={self._auth_url!r}, client_id={self._client_id!r})"

    def token(self) -> str:
        """The cached token while it is fresh, else a new one.

        Raises:
            CredentialsRefused: The token endpoint refused the client (fatal).
            TokenUnavailable: The endpoint stayed unavailable through the retries.
        """
        with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token
            return self._fetch()

    def refresh_after_failure(self, failed_token: str) -> str:
        """A new token, unless another thread already replaced ``failed_token``.

        Raises:
            CredentialsRefused: The token endpoint refused the client (fatal).
            TokenUnavailable: The endpoint stayed unavailable through the retries.
        """
        with self._lock:
            fresh = self._token is not None and self._clock() < self._refresh_at
            if fresh and self._token != failed_token:
                assert self._token is not None
                return self._token
            self._token = None
            return self._fetch()

    def _fetch(self) -> str:
        """Request a token, retrying transient failures; the caller holds the lock."""
        state = self._policy
        while True:
            started = self._clock()
            outcome = self._attempt()
            if isinstance(outcome, _Issued):
                margin = min(MAX_REFRESH_MARGIN_SECONDS, 0.1 * outcome.lifetime)
                self._token = outcome.token
                self._refresh_at = started + outcome.lifetime - margin
                logger.info(
                    "Obtained an access token from %s (expires in %.0f s)",
                    self._auth_url,
                    outcome.lifetime,
                )
                return outcome.token
            step = state.increment(
                FailureKind.SAFE, outcome.status, outcome.retry_after, rng=self._rng
            )
            if isinstance(step, GiveUp) or self.outage():
                raise TokenUnavailable(
                    f"no access token from {self._auth_url} after {len(step.history)} "
                    f"attempt(s): {outcome.reason}"
                )
            logger.warning(
                "Token request to %s failed (%s); retrying in %.1f s",
                self._auth_url,
                outcome.reason,
                step.wait,
            )
            self._sleep(step.wait)
            state = step

    def _attempt(self) -> _Issued | _Transient:
        """One token request: a token, a transient failure, or CredentialsRefused."""
        self.requests_made += 1
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret,
            "scope": self._scope,
        }
        try:
            response = self._session.request(
                "POST", self._auth_url, form=form, timeout=self._timeout
            )
        except SEND_ERRORS as exc:
            return _Transient(self._redact(f"{type(exc).__name__}: {exc}"), None)
        body = json_or_none(response.content)
        status = response.status_code
        if status == 200:
            return self._issued(body)
        if status in (408, 429) or status >= 500:
            return _Transient(f"HTTP {status}", retry_after_seconds(body, response.headers), status)
        raise CredentialsRefused(self._refusal(status, body))

    def _issued(self, body: Any) -> _Issued | _Transient:
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            return _Transient("HTTP 200 without an access_token", None, 200)
        lifetime = body.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
            logger.warning(
                "Token response from %s has no usable expires_in; assuming %.0f s",
                self._auth_url,
                FALLBACK_LIFETIME_SECONDS,
            )
            lifetime = FALLBACK_LIFETIME_SECONDS
        return _Issued(token, float(lifetime))

    def _refusal(self, status: int, body: Any) -> str:
        """One line naming the endpoint, the client id and Keycloak's reason; never the secret."""
        if status in (400, 401, 403):
            text = f"the token endpoint {self._auth_url} refused client_id {self._client_id!r}"
        else:
            text = (
                f"the token endpoint {self._auth_url} answered HTTP {status} for client_id "
                f"{self._client_id!r} (is auth_url right?)"
            )
        reason = ""
        if isinstance(body, dict):
            parts = [body.get("error"), body.get("error_description")]
            reason = ": ".join(str(p) for p in parts if isinstance(p, str) and p)
        text += f" (HTTP {status}{': ' + reason[:200] if reason else ''})"
        return self._redact(" ".join(text.split()))

    def _redact(self, text: str) -> str:
        """Belt and braces: the secret never leaves in a message, whatever a server echoes."""
        return text.replace(self._secret, "***") if self._secret else text
