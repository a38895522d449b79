"""What a failed request means for sending it again: the client's failure classification.

Pure (no I/O). The client turns responses and exceptions into a :class:`FailureKind` with
:func:`classify_status` / :func:`classify_exception`; the retry policy (``retry.py`` beside this
module) decides on that kind alone.

The one question every classification answers is *could Catena have processed the request?*
Catena has no idempotency key, so guessing "not sent" wrongly duplicates a driver message; every
doubt therefore resolves to :attr:`FailureKind.AMBIGUOUS`. docs/retry.md lists the classes.
"""

from __future__ import annotations

import http.client
import math
import ssl
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any

import msgspec
import urllib3.exceptions as u3
from urllib3.util.ssl_match_hostname import CertificateError

from target_catena_messages.catena.errors import RequestNotSendable

__all__ = [
    "FailureKind",
    "RequestNotSendable",
    "classify_exception",
    "classify_status",
    "configuration_problem",
    "is_catena_error_body",
    "is_configuration_failure",
    "json_or_none",
    "retry_after_seconds",
]


class FailureKind(str, Enum):
    """What a failed send means for sending the same message again."""

    SAFE = "safe"
    """Catena cannot have processed it: resend after a backoff."""
    AMBIGUOUS = "ambiguous"
    """Catena may have processed it: look for an existing operation before any resend."""
    AUTH = "auth"
    """The token was refused: refresh it once and retry once."""
    REJECTION = "rejection"
    """Catena (or the request itself) refused the message: resending the same body cannot help."""


_ACCEPTED = frozenset({200, 201, 202})
_FIXED: dict[int, FailureKind] = {
    408: FailureKind.SAFE,
    429: FailureKind.SAFE,
    503: FailureKind.SAFE,
    401: FailureKind.AUTH,
    403: FailureKind.AUTH,
    501: FailureKind.REJECTION,  # the TSP cannot do this at all; resending will not change that
}


def classify_status(status: int, body: Any, *, is_sync: bool) -> FailureKind | None:
    """Classify an HTTP status (and, for a sync 502, its operation body).

    408 is SAFE although the brief lists "other 4xx" as rejections: a 408 says the server gave up
    *before* it had the whole request, so it cannot have been processed, and dead-lettering a
    message for a transient proxy timeout would be wrong.

    Args:
        status: The response status code (redirects are never followed, so 3xx arrive here).
        body: The parsed JSON body, or None when it was not JSON.
        is_sync: Whether the request used ``?is_sync=true``; only then does a 502 carry an
            operation whose logs tell a TSP refusal from a TSP outage.

    Returns:
        None when the request was accepted (200/201/202), else the failure kind.
    """
    if status in _ACCEPTED:
        return None
    if status == 502 and is_sync:
        return _classify_sync_502(body)
    if status in _FIXED:
        return _FIXED[status]
    if 300 <= status < 500:
        return FailureKind.REJECTION
    # 500/502/504 and unknown 5xx may have been processed; so may an unexpected 2xx or 1xx.
    return FailureKind.AMBIGUOUS


def _classify_sync_502(body: Any) -> FailureKind:
    """A sync 502 is a rejection unless the operation's last attempt failed transiently.

    A 502 without an operation body did not come from Catena's sync path (a gateway answered),
    so nothing says the request was not processed: AMBIGUOUS.
    """
    if not isinstance(body, Mapping) or not any(k in body for k in ("id", "status", "logs")):
        return FailureKind.AMBIGUOUS
    logs = body.get("logs")
    if not isinstance(logs, list) or not logs or not isinstance(logs[-1], Mapping):
        return FailureKind.REJECTION
    last = logs[-1]
    if last.get("error_type") == "network":
        return FailureKind.AMBIGUOUS
    code = last.get("response_status_code")
    if isinstance(code, int) and not isinstance(code, bool) and (code == 429 or code >= 500):
        return FailureKind.AMBIGUOUS
    return FailureKind.REJECTION


# Evidence that the request never left this process (nothing to duplicate).
_NOT_SENT: tuple[type[BaseException], ...] = (
    u3.ConnectTimeoutError,  # includes NewConnectionError and NameResolutionError
    u3.ClosedPoolError,
    u3.EmptyPoolError,  # no free socket within the timeout (the pool blocks at pool_size)
    ConnectionRefusedError,
    ssl.SSLCertVerificationError,  # only raised by the handshake, before any request byte
    CertificateError,  # urllib3's own hostname check, also during the handshake
)
# Evidence that the request (or part of it) was sent: the server may have acted on it.
_MAYBE_SENT: tuple[type[BaseException], ...] = (
    u3.ReadTimeoutError,
    u3.ProtocolError,  # "Connection aborted." around RemoteDisconnected, resets, broken bodies
    u3.DecodeError,
    u3.ResponseError,
    http.client.HTTPException,  # RemoteDisconnected, IncompleteRead, BadStatusLine
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)
# The request could not even be built: deterministic, so resending cannot help.
_UNSENDABLE: tuple[type[BaseException], ...] = (
    u3.LocationValueError,  # LocationParseError (bad URL), URLSchemeUnknown, no host
    RequestNotSendable,
)


def classify_exception(exc: BaseException) -> FailureKind:
    """Classify an exception raised while sending a request.

    Walks the whole chain (``__cause__``, ``__context__``, urllib3's ``MaxRetryError.reason`` and
    exceptions nested in ``args``), because urllib3 wraps the socket error that holds the evidence:
    ``ProtocolError("Connection aborted.", ConnectionResetError(...))``,
    ``SSLError(SSLCertVerificationError(...))``, ``ProxyError(msg, NewConnectionError(...))``.
    SAFE needs positive evidence that nothing was sent and no evidence to the contrary; anything
    else is AMBIGUOUS.

    Returns:
        SAFE, AMBIGUOUS, or REJECTION for requests that could not be built (bad URL or header).
    """
    chain = list(_exception_chain(exc))
    if any(isinstance(e, _UNSENDABLE) for e in chain):
        return FailureKind.REJECTION
    if any(isinstance(e, _MAYBE_SENT) for e in chain):
        return FailureKind.AMBIGUOUS
    if any(isinstance(e, _NOT_SENT) for e in chain):
        return FailureKind.SAFE
    return FailureKind.AMBIGUOUS


def _exception_chain(exc: BaseException, limit: int = 32) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception linked from it, each once, breadth-first."""
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue and len(seen) < limit:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked: list[object] = [current.__cause__, current.__context__]
        linked.append(getattr(current, "reason", None))  # urllib3 MaxRetryError
        linked.extend(current.args)
        queue.extend(e for e in linked if isinstance(e, BaseException))


def signals_outage(status: int | None) -> bool:
    """Whether a failure may mean Catena (or the way to it) is down, not that one request failed.

    No answer at all (a network error or an unreachable token endpoint), or a gateway's 502, 503
    or 504. Never a 429 (a rate limit answers: Catena is up) nor a 500 (one request broke).
    Only a hint: the run confirms an outage with a probe that carries no message.
    """
    return status is None or status in _OUTAGE_STATUSES


_OUTAGE_STATUSES = frozenset({502, 503, 504})


def is_catena_error_body(body: Any) -> bool:
    """Whether an error body has the shape of Catena's own error objects.

    Catena answers every error with a JSON object carrying ``code``, ``message`` or ``detail``
    (``{"code": 404, "message": "Not Found", "detail": null}``; a 500 has only ``message``). An
    HTML page, plain text, an empty body (the client keeps those as ``{"text": ...}``) or JSON
    of another shape (``{"error": ...}``) came from a proxy, a load balancer or another server.
    """
    return isinstance(body, Mapping) and any(k in body for k in ("code", "message", "detail"))


def is_configuration_failure(status: int | None, body: Any, *, read: bool = False) -> bool:
    """Whether a refused request says the URL, a proxy or the credentials are wrong.

    Such an answer is about the target's settings, not about one message: dead-lettering every
    message of the backlog for it would be wrong, so the run ends instead. The caller decides
    when the rule applies (a create's answer before any message of the run was accepted, or
    the probe before input is read; a 401 after a token refresh always).

    True for a 401 or 403 (the client has already refreshed the token and tried again), a 404
    or 405 (no such endpoint: a wrong path, e.g. an ``api_url`` ending in ``/v2``), a redirect
    (Catena never redirects; they are not followed) and any other 4xx but 408 and 429 whose
    body is not Catena's (:func:`is_catena_error_body`). For a ``read`` (the probe's size-1
    list, whose query is the target's own) every answer below 500 but 408 and 429 counts,
    including a 2xx that is not a page of operations. Never for no answer (a network error) nor
    a 5xx: those may mean Catena is down, which is not a setting.
    """
    if status is None or status >= 500 or status in (408, 429):
        return False
    if read:
        return True
    if status < 300:  # a create's 2xx without an operation id: ambiguous, not a setting
        return False
    if status < 400 or status in (401, 403, 404, 405):
        return True
    return not is_catena_error_body(body)


def configuration_problem(method: str, url: str, status: int | None, *, when: str = "") -> str:
    """The one line that ends a run for a configuration failure: the URL, the status, a hint.

    ``url`` is the endpoint's URL without its query (no token is ever in it); ``when`` says
    what had not happened yet ("before any message was accepted").
    """
    try:
        phrase = http.HTTPStatus(status).phrase if status is not None else "no answer"
    except ValueError:
        phrase = ""
    answer = f"{method} {url} answered {status} {phrase}".rstrip()
    if when:
        answer += f" {when}"
    if status == 401:
        hint = (
            "the credentials are refused, also with a fresh token: check client_id, "
            "client_secret (or access_token) and scope"
        )
    elif status == 403:
        hint = (
            "access is refused: check the credentials' grants "
            "(and default_connection_id or the records' connection_id)"
        )
    elif status in (404, 405):
        hint = (
            "check api_url (it must not end in /v2: the target adds /v2/... itself) "
            "and any proxy in between"
        )
    elif status is not None and 300 <= status < 400:
        hint = "check api_url's scheme, host and path (redirects are never followed)"
    else:
        hint = (
            "that answer is not Catena's (a proxy or another server answered): "
            "check api_url and the proxy settings"
        )
    return f"{answer}: {hint}"


def retry_after_seconds(
    body: Any, headers: Mapping[str, str], *, now: datetime | None = None
) -> float | None:
    """How long the server asked us to wait, in seconds.

    Catena puts the wait in the 429 body (``detail.retry_after_seconds``); a ``Retry-After``
    header (delta-seconds or an HTTP date) is the fallback a proxy or a future API may use.

    Args:
        body: The parsed JSON body, or None.
        headers: Response headers (any mapping; looked up case-insensitively).
        now: The current time for HTTP-date headers; defaults to the wall clock.

    Returns:
        A non-negative number of seconds, or None when neither source gives a usable value.
    """
    if isinstance(body, Mapping):
        detail = body.get("detail")
        if isinstance(detail, Mapping):
            seconds = _as_seconds(detail.get("retry_after_seconds"))
            if seconds is not None:
                return seconds
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    seconds = _as_seconds(raw.strip())
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = now or datetime.now(timezone.utc)
    return max(0.0, (when - current).total_seconds())


def _as_seconds(value: Any) -> float | None:
    """A finite non-negative float from an int, float or numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return max(0.0, float(value))
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts too."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value if isinstance(value, str) else None


def json_or_none(content: bytes) -> Any:
    """The decoded JSON body, or None when it is empty or not JSON (an HTML error page)."""
    try:
        return msgspec.json.decode(content)
    except ValueError:  # msgspec.DecodeError is a ValueError
        return None
