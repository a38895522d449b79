"""The client's HTTP transport: pooled urllib3 connections that never resend and never redirect.

Why not requests: per request it merges session settings, looks up proxies and ``.netrc`` (a
filesystem read) and runs hooks, which cost 2.5-3x the CPU of urllib3 itself, the same connection
pools and TLS stack underneath. What requests gave us for free is done here once per transport
(CA bundle) or once per origin (proxy), not once per request:

- ``retries=False`` and ``redirect=False``: urllib3 must never resend a POST (Catena has no
  idempotency key) nor follow a redirect (a 307 would carry the token or secret elsewhere).
- One bounded pool per origin (``block=True``): at most ``pool_size`` sockets per host.
- TLS always verified against ``REQUESTS_CA_BUNDLE``, else ``SSL_CERT_FILE``, else certifi.
- ``HTTPS_PROXY``/``ALL_PROXY``/``NO_PROXY`` are honoured for https origins.

Errors are urllib3's own (``retries=False`` raises the underlying error, e.g.
``NewConnectionError`` or ``ReadTimeoutError``); ``classify.classify_exception`` reads them.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlencode
from urllib.request import getproxies, proxy_bypass

import certifi
import urllib3
from urllib3.exceptions import LocationValueError, URLSchemeUnknown
from urllib3.util import make_headers, parse_url
from urllib3.util.ssl_ import create_urllib3_context

from target_catena_messages.catena.errors import ClientConfigError, RequestNotSendable

__all__ = ["SEND_ERRORS", "HttpTransport", "Params", "Response", "ca_bundle_from_env"]

logger = logging.getLogger(__name__)

#: Query parameters: pairs (repeat a key for several values) or a mapping (a list value repeats).
Params = Sequence[tuple[str, str]] | Mapping[str, str | Sequence[str]]

#: What :meth:`HttpTransport.request` raises for a request that failed
#: (``classify.classify_exception`` says what each means); anything else is a programming error
#: and propagates.
SEND_ERRORS: tuple[type[Exception], ...] = (
    urllib3.exceptions.HTTPError,
    OSError,
    http.client.HTTPException,
    RequestNotSendable,
)

_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 9110 token for names; values must be printable ASCII. Checked before sending so a token
# with a newline is refused by us (RequestNotSendable) instead of by http.client with a ValueError
# that quotes the header value, i.e. the token, in its message.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class Response:
    """A complete response (the body is already read and the connection back in its pool).

    Attributes:
        status_code: The HTTP status.
        content: The body, decoded from any Content-Encoding.
        headers: Response headers; lookups are case-insensitive.
        reason: The status line's reason phrase ("" when the server sent none).
    """

    status_code: int
    content: bytes
    headers: Mapping[str, str]
    reason: str


def ca_bundle_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Where trusted CA certificates come from, and which setting said so.

    ``REQUESTS_CA_BUNDLE`` is what the README documents (and what requests honoured), so it
    wins; ``SSL_CERT_FILE`` is the OpenSSL convention some platforms set; certifi is the default.

    Returns:
        ``(path, source)``: a file or directory, and the variable name or ``"certifi"``.
    """
    env = os.environ if environ is None else environ
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = env.get(name, "").strip()
        if value:
            return value, name
    return certifi.where(), "certifi"


def _user_agent() -> str:
    try:
        return f"target-catena-messages/{version('target-catena-messages')}"
    except PackageNotFoundError:
        return "target-catena-messages"


def _verifying_context(path: str, source: str) -> ssl.SSLContext:
    """One TLS context for every connection, with the CA bundle loaded once, up front.

    A missing or unreadable bundle is a configuration error now, not a per-request TLS failure
    later (which could not be told apart from a network fault).
    """
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    try:
        if Path(path).is_dir():
            context.load_verify_locations(capath=path)
        else:
            context.load_verify_locations(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ClientConfigError(
            f"cannot load the CA bundle {path!r} (from {source}): {exc}"
        ) from exc
    return context


@lru_cache(maxsize=256)
def _split(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path?query)``; cached because the client reuses a few URLs.

    Raises:
        LocationValueError: The URL cannot be parsed, has no host, or is not http(s).
    """
    parsed = parse_url(url)  # raises LocationParseError, a LocationValueError
    scheme = (parsed.scheme or "").lower()
    if scheme not in _DEFAULT_PORTS:
        raise URLSchemeUnknown(scheme or "(none)")
    if not parsed.host:
        raise LocationValueError(f"no host in {url!r}")
    return scheme, parsed.host, parsed.port or _DEFAULT_PORTS[scheme], parsed.request_uri


def _check_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if not _sendable(name, value):
            raise RequestNotSendable(f"invalid header {name!r} (value not shown)")


@lru_cache(maxsize=64)
def _sendable(name: str, value: str) -> bool:
    """Cached: the same few headers (one bearer token at a time) go out on every request."""
    return bool(value.isascii() and value.isprintable() and _HEADER_NAME.fullmatch(name))


def _proxy_for(scheme: str, host: str) -> str | None:
    """The environment's proxy URL for an https origin, or None (also for every http origin).

    http is only allowed for loopback (the sandbox), where a proxy never makes sense.
    """
    if scheme != "https":
        return None
    proxies = getproxies()  # the environment (HTTPS_PROXY, ALL_PROXY), else the OS settings
    proxy = proxies.get("https") or proxies.get("all")
    if not proxy or proxy_bypass(host.strip("[]")):  # NO_PROXY
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class HttpTransport:
    """Thread-safe HTTP/1.1 over urllib3: one bounded connection pool per origin.

    Args:
        pool_size: Most sockets open to one origin; a request beyond that waits for a free one
            (at most its timeout, then ``EmptyPoolError``: nothing was sent).
        ca_bundle: A CA file or directory; default from :func:`ca_bundle_from_env`.
        user_agent: The User-Agent header; default ``target-catena-messages/<version>``.

    Raises:
        ValueError: ``pool_size`` < 1.
        ClientConfigError: The CA bundle cannot be loaded.
    """

    def __init__(
        self, pool_size: int, *, ca_bundle: str | None = None, user_agent: str | None = None
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        path, source = (ca_bundle, "ca_bundle") if ca_bundle else ca_bundle_from_env()
        self.pool_size = pool_size
        self.ca_bundle = path
        self._context = _verifying_context(path, source)
        if source != "certifi":
            logger.info("Trusting the CA certificates in %s (from %s)", path, source)
        self.headers: dict[str, str] = {
            "User-Agent": user_agent or _user_agent(),
            "Accept": "application/json",
        }
        _check_headers(self.headers)
        self._lower = {name.lower() for name in self.headers}
        self._timeouts: dict[float, urllib3.Timeout] = {}
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, str, int], urllib3.HTTPConnectionPool] = {}
        self._managers: list[urllib3.ProxyManager] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pool_size={self.pool_size}, ca_bundle={self.ca_bundle!r})"

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        body: bytes | None = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Response:
        """Send one request, exactly once, and read the whole response.

        Args:
            method: The HTTP method.
            url: An absolute http(s) URL; ``params`` are appended to its query.
            params: Query parameters, urlencoded (a repeated key stays repeated).
            body: The raw body (the caller sets its Content-Type).
            form: Fields to send form-encoded instead of ``body``.
            headers: Added to the defaults (User-Agent, Accept); same name replaces a default.
            timeout: Seconds for connecting, for each read, and for waiting for a free socket.

        Returns:
            The response, whatever its status (3xx included: redirects are never followed).

        Raises:
            urllib3.exceptions.HTTPError: The request failed (urllib3's underlying error).
            OSError: A socket error urllib3 did not wrap.
            RequestNotSendable: A header value cannot be sent (nothing was sent).
            ValueError: Both ``body`` and ``form`` were given (a programming error).
        """
        if body is not None and form is not None:
            raise ValueError("pass body or form, not both")
        scheme, host, port, target = _split(url)
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params, doseq=True)
        merged = dict(self.headers)
        if headers:
            _check_headers(headers)
            if not self._lower.isdisjoint(name.lower() for name in headers):
                replaced = {name.lower() for name in headers}
                merged = {k: v for k, v in merged.items() if k.lower() not in replaced}
            merged.update(headers)
        if form is not None:
            body = urlencode(form).encode()
            merged["Content-Type"] = "application/x-www-form-urlencoded"
        timeouts = self._timeouts.get(timeout)
        if timeouts is None:  # one per value: urllib3 clones it per request anyway
            timeouts = self._timeouts[timeout] = urllib3.Timeout(connect=timeout, read=timeout)
        answer = self._pool(scheme, host, port).urlopen(
            method,
            target,
            body=body,
            headers=merged,
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=timeouts,
            pool_timeout=timeout,  # type: ignore[arg-type]  # typed int, a float works (queue.get)
            preload_content=True,
        )
        return Response(answer.status, answer.data, answer.headers, answer.reason or "")

    def prepare(self, url: str) -> None:
        """Set up the pool for ``url``'s origin now (no socket is opened).

        So an unusable proxy setting is an error where the client is built, not a failure of
        the first request.

        Raises:
            ClientConfigError: The proxy URL is unusable, or ``url`` cannot be parsed.
        """
        try:
            scheme, host, port, _ = _split(url)
        except LocationValueError as exc:
            raise ClientConfigError(f"not a usable URL: {type(exc).__name__}") from None
        self._pool(scheme, host, port)

    def close(self) -> None:
        """Close every pooled socket; a request after this raises ``ClosedPoolError``."""
        with self._lock:
            self._closed = True
            for pool in self._pools.values():
                pool.close()
            for manager in self._managers:
                manager.clear()

    def _pool(self, scheme: str, host: str, port: int) -> urllib3.HTTPConnectionPool:
        """The origin's pool, created on first use (the proxy decision is made then, once)."""
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is not None:
            return pool
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._new_pool(scheme, host, port)
                if self._closed:  # no new sockets after close(): fail as a closed pool does
                    pool.close()
                self._pools[key] = pool
            return pool

    def _new_pool(self, scheme: str, host: str, port: int) -> urllib3.HTTPConnectionPool:
        """A pool for one origin: direct, or tunnelled through the environment's proxy.

        Raises:
            ClientConfigError: The proxy URL is unusable (every request would fail the same way).
        """
        size = self.pool_size
        if scheme == "http":
            return urllib3.HTTPConnectionPool(host, port, maxsize=size, block=True, retries=False)
        proxy = _proxy_for(scheme, host)
        if proxy is None:
            return urllib3.HTTPSConnectionPool(
                host,
                port,
                maxsize=size,
                block=True,
                retries=False,
                ssl_context=self._context,
                cert_reqs="CERT_REQUIRED",
            )
        try:
            parsed = parse_url(proxy)
            auth = make_headers(proxy_basic_auth=unquote(parsed.auth)) if parsed.auth else None
            manager = urllib3.ProxyManager(
                proxy,
                num_pools=1,
                proxy_headers=auth,
                proxy_ssl_context=self._context,
                maxsize=size,
                block=True,
                retries=False,
                ssl_context=self._context,
                cert_reqs="CERT_REQUIRED",
            )
        except LocationValueError as exc:  # a bad URL or scheme (socks5://): the same for all
            raise ClientConfigError(
                f"the proxy set for {host} (HTTPS_PROXY or ALL_PROXY) is not an http(s) proxy URL: "
                f"{type(exc).__name__}"
            ) from None
        logger.info("Connecting to %s:%s through the proxy %s", host, port, parsed.netloc)
        self._managers.append(manager)
        return manager.connection_from_host(host, port, scheme)
