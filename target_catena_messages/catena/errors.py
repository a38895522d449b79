"""Exceptions of the Catena client, one per way a caller must react differently.

Per-message HTTP outcomes are values (``Failure``), not exceptions; these are for what a single
message cannot absorb. No message here ever carries a token or the client secret.

The client is a package of its own: it knows nothing of the target's run, so it has no notion of
a "fatal" error. :class:`ClientConfigError` and :class:`CredentialsRefused` mean "every further
request would fail the same way"; the target maps them to its own fatal errors where it builds
the client (``connect.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from target_catena_messages.catena.classify import FailureKind


class ClientConfigError(ValueError):
    """A URL, the CA bundle, the proxy or the token setting is unusable; nothing was sent."""


class RequestNotSendable(ValueError):
    """The transport refused to build a request (e.g. a header value with a newline).

    Raised before any byte is sent, and deterministic: resending the same request cannot help.
    Its message never quotes the offending value, which may be a token.
    """


class CredentialsRefused(Exception):
    """The token endpoint (or the API, for a static token) refused our credentials.

    Every further request would be refused too, so the run stops instead of dead-lettering the
    whole backlog.
    """


class TokenNotRefreshable(CredentialsRefused):
    """A fixed ``access_token`` was refused and cannot be renewed.

    Ends the run after a 401 (every request would fail). After a 403 the client makes it a
    rejection of that one request instead: the token may merely lack access to one connection.
    """


class TokenUnavailable(Exception):
    """No token could be obtained for now (token endpoint down, throttled or unreachable).

    Not fatal by itself: nothing was sent, so the caller treats it as a SAFE failure of the
    message and lets its own retry budget decide.
    """


class CatenaApiError(Exception):
    """A read request (LIST/GET) failed; raised where an iterator cannot return a value.

    Attributes:
        status: The HTTP status, or None when no response arrived.
        kind: How the failure classifies for a retry (see ``classify.FailureKind``).
        api_error: Catena's error body (parsed JSON, or ``{"text": ...}``), or None.
        retry_after: Seconds the server asked us to wait, when it said so.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        kind: FailureKind,
        api_error: Any | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.api_error = api_error
        self.retry_after = retry_after
