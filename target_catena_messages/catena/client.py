"""A small Catena API client: create message, get/list operations, list users.

It knows nothing of Singer and decides no retries: every HTTP or network outcome of a message
becomes a typed value (:class:`Accepted` or :class:`Failure` with a ``FailureKind``) that delivery
acts on. The one retry it does itself is the auth retry (refresh the token once, send once more),
because only the client knows which token a request used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import msgspec

from target_catena_messages.catena.auth import TokenProvider, require_safe_url
from target_catena_messages.catena.classify import (
    FailureKind,
    classify_exception,
    classify_status,
    json_or_none,
    retry_after_seconds,
)
from target_catena_messages.catena.errors import (
    CatenaApiError,
    TokenNotRefreshable,
    TokenUnavailable,
)
from target_catena_messages.catena.transport import SEND_ERRORS, HttpTransport, Response

__all__ = ["Accepted", "CatenaClient", "Failure", "make_session"]

logger = logging.getLogger(__name__)

_AUTH_ROUNDS = 3  # retries after a 401/403 while other threads keep refreshing

#: Catena's ID filters take at most this many values per request.
MAX_IDS_PER_REQUEST = 100
#: Largest page size Catena's list endpoints accept.
MAX_PAGE_SIZE = 1000


class _PayloadText(msgspec.Struct):
    message_text: Any = None


class OperationSummary(msgspec.Struct, frozen=True):
    """What the operation lookup needs of a listed operation: id, creation time, message text.

    Decoded straight from the page, skipping payloads and logs: a busy connection's list is read
    again and again, and full dicts of every operation were most of that cost (and garbage).
    """

    id: str
    created_at: str | None = None
    payload: _PayloadText | None = None

    @property
    def message_text(self) -> Any:
        """The payload's ``message_text`` (None when there is no payload)."""
        return None if self.payload is None else self.payload.message_text


class _SummaryPage(msgspec.Struct):
    items: list[OperationSummary]
    next_page: str | None = None


_SUMMARY_PAGE = msgspec.json.Decoder(_SummaryPage)
# Records carry Decimal numbers (singer-sdk parses input that way): sent as JSON numbers.
_BODY = msgspec.json.Encoder(decimal_format="number")
_TEXT_LIMIT = 500


def make_session(pool_size: int) -> HttpTransport:
    """The transport shared by the client and the token provider, sized for ``pool_size``.

    It never retries, never follows a redirect and always verifies TLS (see :mod:`.transport`).

    Raises:
        ValueError: ``pool_size`` < 1.
        ClientConfigError: The CA bundle (``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE``) cannot be
            loaded.
    """
    return HttpTransport(pool_size)


@dataclass(frozen=True)
class Accepted:
    """Catena queued the message (202) or, in sync mode, created it (200).

    Attributes:
        operation_id: The resource operation's ``id``, the handle for later look-ups.
        status: The HTTP status.
        operation: The full ResourceOperation when Catena returned one (``catena_ids`` body);
            None for the bare ``{"id"}`` answer of the ``source_ids`` body.
        elapsed: Seconds spent, token and auth retry included.
    """

    operation_id: str
    status: int
    operation: dict[str, Any] | None
    elapsed: float


@dataclass(frozen=True)
class Failure:
    """A request that was not accepted, classified for the retry decision.

    Attributes:
        kind: What the failure means for a resend.
        status: The HTTP status, or None when no response arrived.
        api_error: Catena's error body (parsed JSON, or ``{"text": first 500 chars}``), or None.
        message: One human line saying what happened.
        retry_after: Seconds the server asked us to wait (429/503), when it said so.
        elapsed: Seconds spent, token and auth retry included.
    """

    kind: FailureKind
    status: int | None
    api_error: Any | None
    message: str
    retry_after: float | None
    elapsed: float


class CatenaClient:
    """Typed calls to the Catena API over one shared, thread-safe transport.

    Args:
        api_url: Base URL (https, or http for loopback only).
        tokens: Where bearer tokens come from.
        session: The transport, usually from :func:`make_session`, shared with the token provider.
        timeout: Seconds per HTTP request (connect and read).
    """

    def __init__(
        self,
        api_url: str,
        tokens: TokenProvider,
        session: HttpTransport,
        *,
        timeout: float = 30.0,
    ) -> None:
        self._api_url = require_safe_url(api_url, "api_url")
        self._operations_url = f"{self._api_url}/v2/integrations/connections/resource-operations"
        self._messages_url = f"{self._api_url}/v2/telematics/messages"
        self._tokens = tokens
        self._session = session
        self._timeout = timeout

    @property
    def messages_url(self) -> str:
        """Where messages are POSTed: a configuration failure names it."""
        return self._messages_url

    @property
    def operations_url(self) -> str:
        """The operation list :meth:`probe` reads: a configuration failure names it."""
        return self._operations_url

    def create_message(
        self, body: Mapping[str, Any], *, is_sync: bool = False
    ) -> Accepted | Failure:
        """POST one message; never raises for HTTP or network outcomes.

        Raises:
            CredentialsRefused: The credentials were refused while refreshing the token (fatal).
        """
        started = time.monotonic()
        result = self._send(
            "messages",
            "POST",
            self._messages_url,
            params=[("is_sync", "true")] if is_sync else None,
            data=_BODY.encode(body),
            is_sync=is_sync,
        )
        elapsed = time.monotonic() - started
        if isinstance(result, Failure):
            return replace(result, elapsed=elapsed)
        status, parsed = result
        operation_id = parsed.get("id") if isinstance(parsed, dict) else None
        if not isinstance(operation_id, str) or not operation_id:
            return Failure(
                FailureKind.AMBIGUOUS,
                status,
                _api_error(parsed, b""),
                "accepted without id",
                None,
                elapsed,
            )
        # The bare {"id"} answer of the source_ids body, or a whole ResourceOperation.
        operation = parsed if isinstance(parsed, dict) and len(parsed) > 1 else None
        return Accepted(operation_id, status, operation, elapsed)

    def get_operation(self, connection_id: str, operation_id: str) -> dict[str, Any] | Failure:
        """One resource operation with its logs, or a Failure (404 is a REJECTION: not found).

        Raises:
            CredentialsRefused: The credentials were refused while refreshing the token (fatal).
        """
        started = time.monotonic()
        url = (
            f"{self._api_url}/v2/integrations/connections/{quote(connection_id, safe='')}"
            f"/resource-operations/{quote(operation_id, safe='')}"
        )
        result = self._send("operations", "GET", url)
        elapsed = time.monotonic() - started
        if isinstance(result, Failure):
            return replace(result, elapsed=elapsed)
        status, parsed = result
        if not isinstance(parsed, dict):
            return Failure(
                FailureKind.AMBIGUOUS,
                status,
                _api_error(parsed, b""),
                "operation answer is not a JSON object",
                None,
                elapsed,
            )
        return parsed

    def list_operations(
        self,
        connection_id: str,
        *,
        from_datetime: datetime,
        to_datetime: datetime,
        resource: str = "message",
        operation: str = "create",
        size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Resource operations of one connection created in a time window, page by page.

        Catena caps the window at 45 days. Pages are fetched lazily as the iterator advances.

        Raises:
            ValueError: A naive datetime or a size outside 1..1000 (at call time).
            CatenaApiError: A page request failed (while iterating).
            CredentialsRefused: The credentials were refused (while iterating; fatal).
        """
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise ValueError(f"size must be within 1..{MAX_PAGE_SIZE}")
        params = _operations_query(connection_id, from_datetime, to_datetime, size)
        params += [("resource", resource), ("operation", operation)]
        return self._pages("operations", self._operations_url, params)

    def list_operation_summaries(
        self, connection_id: str, *, from_datetime: datetime, to_datetime: datetime | None = None
    ) -> Iterator[OperationSummary]:
        """Like :meth:`list_operations` (message creates, pages of 1000), as summaries only.

        Without ``to_datetime`` the window ends at Catena's own now: no bound from our clock,
        which may run behind Catena's (an operation created "after" our now would be missed).

        Raises:
            ValueError: A naive datetime (at call time).
            CatenaApiError: A page request failed or did not have the expected shape.
            CredentialsRefused: The credentials were refused (while iterating; fatal).
        """
        params = _operations_query(connection_id, from_datetime, to_datetime, MAX_PAGE_SIZE)
        params += [("resource", "message"), ("operation", "create")]
        return self._pages("operations", self._operations_url, params, decode=_summary_page)

    def probe(self, connection_id: str | None = None) -> Failure | None:
        """A request that carries no message: None when Catena answered it as it should.

        The token (fetched when none is held), then a size-1 read of the operation list, the
        read exactly-once depends on. Used at start (the credentials and URLs work before any
        input is read) and during an outage (is Catena back?). A 2xx whose body is not a page
        of operations (a proxy's or captive portal's answer) is a Failure too.

        Raises:
            CredentialsRefused: The credentials were refused while fetching the token (fatal).
        """
        params = [("resource", "message"), ("operation", "create"), ("size", "1")]
        if connection_id is not None:
            params.append(("connection_id", connection_id))
        started = time.monotonic()
        result = self._send("operations", "GET", self._operations_url, params=params)
        elapsed = time.monotonic() - started
        if isinstance(result, Failure):
            return replace(result, elapsed=elapsed)
        status, page = result
        if isinstance(page, dict) and isinstance(page.get("items"), list):
            return None
        return Failure(
            FailureKind.AMBIGUOUS,
            status,
            _api_error(page, b""),
            f"HTTP {status} from {self._operations_url} is not a page of operations",
            None,
            elapsed,
        )

    def list_users(
        self, connection_id: str | None, source_ids: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Users whose TSP ``source_id`` is among ``source_ids`` (batches of 100, all pages).

        An empty ``source_ids`` returns [] without a request (the API would list every user).

        Raises:
            CatenaApiError: A request failed.
            CredentialsRefused: The credentials were refused (fatal).
        """
        if isinstance(source_ids, str):
            raise TypeError("source_ids must be a sequence of strings, not one string")
        unique = list(dict.fromkeys(source_ids))
        url = f"{self._api_url}/v2/telematics/users"
        users: list[dict[str, Any]] = []
        for start in range(0, len(unique), MAX_IDS_PER_REQUEST):
            params = [("source_ids", s) for s in unique[start : start + MAX_IDS_PER_REQUEST]]
            if connection_id:
                params.append(("connection_id", connection_id))
            params.append(("size", str(MAX_PAGE_SIZE)))
            users.extend(self._pages("users", url, params))
        return users

    # -- internals ------------------------------------------------------------------------------

    def _pages(
        self,
        endpoint: str,
        url: str,
        params: list[tuple[str, str]],
        *,
        decode: Callable[[bytes], Any] | None = None,
    ) -> Iterator[Any]:
        """Follow ``next_page`` cursors, yielding items; a failed page raises CatenaApiError.

        ``decode`` turns a successful page into a ``_SummaryPage`` (None when it is not one);
        without it pages are plain JSON and items dicts.
        """
        seen: set[str] = set()
        cursor: str | None = None
        while True:
            page_params = [*params, ("cursor", cursor)] if cursor else params
            result = self._send(endpoint, "GET", url, params=page_params, decode=decode)
            if isinstance(result, Failure):
                raise CatenaApiError(
                    f"{endpoint} list failed: {result.message}",
                    status=result.status,
                    kind=result.kind,
                    api_error=result.api_error,
                    retry_after=result.retry_after,
                )
            status, page = result
            items: Any = None
            if isinstance(page, _SummaryPage):
                items, cursor = page.items, page.next_page
            elif isinstance(page, dict):
                items, cursor = page.get("items"), page.get("next_page")
            if not isinstance(items, list):
                raise CatenaApiError(
                    f"{endpoint} list answer has no items list",
                    status=status,
                    kind=FailureKind.AMBIGUOUS,
                    api_error=_api_error(page, b""),
                )
            yield from (item for item in items if isinstance(item, (dict, OperationSummary)))
            if not isinstance(cursor, str) or not cursor:
                return
            if cursor in seen:
                raise CatenaApiError(
                    f"{endpoint} list repeated a page cursor; stopping instead of looping",
                    status=status,
                    kind=FailureKind.AMBIGUOUS,
                )
            seen.add(cursor)

    def _send(
        self,
        endpoint: str,
        method: str,
        url: str,
        *,
        params: list[tuple[str, str]] | None = None,
        data: bytes | None = None,
        is_sync: bool = False,
        decode: Callable[[bytes], Any] | None = None,
    ) -> tuple[int, Any] | Failure:
        """One request with the auth retry: (status, parsed body) when accepted, else a Failure.

        On 401/403 the token is refreshed (only if it is still the current one) and the request
        sent once more; a second 401/403 with the newest token is a rejection. (If another thread
        refreshed again meanwhile, the newer token is tried: a second revocation mid-run must
        not turn into a dead letter.) A static token cannot be refreshed, so
        its 403 is a rejection at once and its 401 ends the run (TokenNotRefreshable).
        """
        try:
            token = self._tokens.token()
        except TokenUnavailable as exc:
            return _failure(FailureKind.SAFE, None, None, str(exc))
        response = self._request(endpoint, method, url, token, params=params, data=data)
        if isinstance(response, Failure) or response.status_code not in (401, 403):
            return self._outcome(response, is_sync, decode=decode)
        try:
            token = self._tokens.refresh_after_failure(token)
        except TokenUnavailable as exc:
            return _failure(FailureKind.SAFE, None, None, str(exc))
        except TokenNotRefreshable:
            if response.status_code == 403:
                return self._outcome(response, is_sync, kind=FailureKind.REJECTION)
            raise
        for _ in range(_AUTH_ROUNDS):
            response = self._request(endpoint, method, url, token, params=params, data=data)
            if isinstance(response, Failure) or response.status_code not in (401, 403):
                return self._outcome(response, is_sync, decode=decode)
            try:
                current = self._tokens.token()
            except TokenUnavailable as exc:
                return _failure(FailureKind.SAFE, None, None, str(exc))
            if current == token:
                break  # refused again with the newest token: a real rejection
            token = current  # another thread refreshed meanwhile (a newer revocation): try it
        return self._outcome(
            response, is_sync, kind=FailureKind.REJECTION, note="again after a token refresh"
        )

    def _request(
        self,
        endpoint: str,
        method: str,
        url: str,
        token: str,
        *,
        params: list[tuple[str, str]] | None,
        data: bytes | None,
    ) -> Response | Failure:
        """Send once; a network error becomes a classified Failure (its text holds no token)."""
        headers = {"Authorization": f"Bearer {token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._session.request(
                method, url, params=params, body=data, headers=headers, timeout=self._timeout
            )
        except SEND_ERRORS as exc:
            kind = classify_exception(exc)
            logger.debug("%s %s failed (%s): %s", method, endpoint, kind.value, exc)
            return _failure(kind, None, None, _one_line(f"{type(exc).__name__}: {exc}"))
        return response

    def _outcome(
        self,
        response: Response | Failure,
        is_sync: bool,
        *,
        kind: FailureKind | None = None,
        note: str = "",
        decode: Callable[[bytes], Any] | None = None,
    ) -> tuple[int, Any] | Failure:
        """Parse and classify a response; ``kind`` overrides the classification.

        ``decode`` parses a 2xx body (error bodies are always plain JSON).
        """
        if isinstance(response, Failure):
            return response
        status = response.status_code
        if decode is not None and 200 <= status < 300 and kind is None:
            body = decode(response.content)
        else:
            body = json_or_none(response.content)
        kind = kind or classify_status(status, body, is_sync=is_sync)
        if kind is None:
            return status, body
        retry_after = retry_after_seconds(body, response.headers) if status in (429, 503) else None
        api_error = _api_error(body, response.content)
        message = _describe(status, response.reason, body, response.headers, note)
        logger.debug("HTTP %s classified %s: %s", status, kind.value, api_error)
        return _failure(kind, status, api_error, message, retry_after)


def _failure(
    kind: FailureKind,
    status: int | None,
    api_error: Any | None,
    message: str,
    retry_after: float | None = None,
) -> Failure:
    """A Failure whose ``elapsed`` the public method fills in."""
    return Failure(kind, status, api_error, message, retry_after, 0.0)


def _operations_query(
    connection_id: str, from_datetime: datetime, to_datetime: datetime | None, size: int
) -> list[tuple[str, str]]:
    params = [("connection_id", connection_id), ("from_datetime", _iso_utc(from_datetime))]
    if to_datetime is not None:  # absent: Catena's now
        params.append(("to_datetime", _iso_utc(to_datetime)))
    return [*params, ("size", str(size))]


def _summary_page(content: bytes) -> _SummaryPage | None:
    """A page of operation summaries, or None when the body is not one."""
    try:
        return _SUMMARY_PAGE.decode(content)
    except ValueError:  # msgspec's DecodeError and ValidationError are ValueErrors
        return None


def _api_error(body: Any, content: bytes) -> Any:
    """Catena's error body for the dead letter: the JSON, else the first 500 chars of text."""
    if body is not None:
        return body
    return {"text": content[:_TEXT_LIMIT].decode("utf-8", "replace")}


def _describe(status: int, reason: str, body: Any, headers: Mapping[str, str], note: str) -> str:
    """One line for logs and dead letters: status, Catena's message, and the gist of detail."""
    head = f"HTTP {status} {reason}".strip()
    if note:
        head += f" {note}"
    if 300 <= status < 400:
        return _one_line(f"{head}: redirect to {headers.get('Location', '?')} not followed")
    return _one_line(f"{head}: {_gist(body)}" if _gist(body) else head)


def _gist(body: Any) -> str:
    """The informative part of a Catena body: message, validation details, or the last log."""
    if not isinstance(body, dict):
        return ""
    parts: list[str] = []
    if isinstance(body.get("message"), str):
        parts.append(body["message"])
    detail = body.get("detail")
    if isinstance(detail, str):
        parts.append(detail)
    elif isinstance(detail, dict) and isinstance(detail.get("message"), str):
        parts.append(detail["message"])
    elif isinstance(detail, list):
        parts.append(
            "; ".join(
                f"{d.get('path', '?')}: {d.get('message', '?')}"
                for d in detail
                if isinstance(d, dict)
            )
        )
    logs = body.get("logs")
    if isinstance(logs, list) and logs and isinstance(logs[-1], dict):
        last = logs[-1]
        parts.append(f"last log {last.get('error_type')}: {last.get('error_details')}")
    return " - ".join(p for p in parts if p)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_TEXT_LIMIT]


def _iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC; a naive datetime is refused rather than guessed."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("list_operations needs timezone-aware datetimes")
    return moment.astimezone(timezone.utc).isoformat()
