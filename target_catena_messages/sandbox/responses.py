"""Error and fault answers in Catena's exact shapes (OAuth errors, 401/403/422/429/5xx envelopes).

API errors use the common envelope ``{"code", "message", "detail"}``; 500 is only
``{"message": "Internal Server Error"}``; 422 carries a list of ValidationErrorDetail; 429 carries
``detail.retry_after_seconds`` (the ``detail`` key is left out when a fault gives no wait). 502, 503
and 504 outside sync mode come from the gateway in front of the API, for which the spec has no
schema: the sandbox answers them with the same common envelope. The OAuth endpoints answer
Keycloak's ``{"error", "error_description"}`` form for every error.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from target_catena_messages.sandbox.config import FaultRule

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Request Entity Too Large",
    422: "Invalid Request Body",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_OAUTH_ERRORS = {
    400: "invalid_request",
    401: "invalid_client",
    403: "unauthorized_client",
    429: "too_many_requests",
    503: "temporarily_unavailable",
}


_ENCODE = msgspec.json.Encoder(decimal_format="number").encode  # jsonutil's, straight to bytes
_JSON = {"Content-Type": "application/json"}  # as ``content_type=`` sets it, without parsing it


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer encoded with the project's fast encoder."""
    return web.Response(
        status=status,
        body=_ENCODE(body),
        headers=_JSON if headers is None else {**_JSON, **headers},
    )


def error_body(status: int, detail: Any = None) -> dict[str, Any]:
    """The body Catena's API sends for an error ``status``."""
    if status == 500:
        return {"message": "Internal Server Error"}
    if status == 422:
        return {"code": 422, "message": "Invalid Request Body", "detail": detail or []}
    reason = REASONS.get(status) or web.Response(status=status).reason or "Error"
    return {"code": status, "message": reason, "detail": detail}


def api_error(status: int, detail: Any = None) -> web.Response:
    """An API error answer (common envelope, or the 500 / 422 special shapes)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return json_response(status, error_body(status, detail), headers)


def unprocessable(details: list[dict[str, str]]) -> web.Response:
    """422 listing every validation problem."""
    return json_response(422, error_body(422, details))


def too_many_requests(
    retry_after: int | None, header: bool, message: str = "Rate limit exceeded"
) -> web.Response:
    """429; ``detail`` only when there is a wait to announce, the header only when asked."""
    body: dict[str, Any] = {"code": 429, "message": "Too Many Requests"}
    if retry_after is not None:
        body["detail"] = {"retry_after_seconds": retry_after, "message": message}
    headers = {"Retry-After": str(retry_after)} if header and retry_after is not None else None
    return json_response(429, body, headers)


def oauth_error(status: int, error: str, description: str) -> web.Response:
    """Keycloak's token-endpoint error form."""
    return json_response(status, {"error": error, "error_description": description})


def html_error(status: int) -> web.Response:
    """A non-JSON error page, as a proxy in front of the API would send."""
    reason = REASONS.get(status, "Error")
    text = (
        f"<html><head><title>{status} {reason}</title></head>"
        f"<body><center><h1>{status} {reason}</h1></center><hr><center>nginx</center>"
        "</body></html>\n"
    )
    return web.Response(status=status, text=text, content_type="text/html")


def fault_response(rule: FaultRule, endpoint: str) -> web.Response:
    """The answer of a ``status`` (or ``forbid``) fault on ``endpoint``."""
    status = 403 if rule.kind == "forbid" else rule.status
    if rule.non_json:
        response = html_error(status)
    elif endpoint in ("token", "revoke"):
        error = _OAUTH_ERRORS.get(status, "server_error")
        response = oauth_error(status, error, f"Injected fault ({status})")
    elif status == 429:
        return too_many_requests(
            rule.retry_after_seconds, rule.retry_after_header, "Injected rate limit"
        )
    elif status == 422:
        response = unprocessable(
            [{"path": "body", "input": "", "message": "Injected fault", "error_type": "fault"}]
        )
    elif status == 403:
        response = api_error(403, "Access to this connection is forbidden")
    else:
        response = api_error(status, None if status == 500 else "Injected fault")
    if rule.retry_after_header and rule.retry_after_seconds is not None:
        response.headers["Retry-After"] = str(rule.retry_after_seconds)
    return response
