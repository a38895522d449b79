"""The Catena endpoints the target talks to, answered faithfully to catena-api.md.

Token and revoke (Keycloak form errors), create message in either body version (rate limit, auth,
every validation problem in one 422, the operation stored with its normalised payload), one and
many resource operations (cursor pages, list lag), and users. Faults are applied around each
handler by ``FaultPipeline``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from target_catena_messages import jsonutil
from target_catena_messages.sandbox import queries as q
from target_catena_messages.sandbox import responses as r
from target_catena_messages.sandbox.config import SandboxConfig, User, is_uuid
from target_catena_messages.sandbox.pages import CursorError, paginate
from target_catena_messages.sandbox.pipeline import Context, FaultPipeline
from target_catena_messages.sandbox.schemas import detail, known_fields, validate_body
from target_catena_messages.sandbox.store import Operation

log = logging.getLogger(__name__)

AUTH_PREFIX = "/realms/catena/protocol/openid-connect"
MESSAGES_PATH = "/v2/telematics/messages"
OPERATIONS_PATH = "/v2/integrations/connections/resource-operations"
OPERATION_PATH = "/v2/integrations/connections/{connection_id}/resource-operations/{operation_id}"
USERS_PATH = "/v2/telematics/users"


@dataclass(frozen=True)
class _Message:
    """A create-message request as read: parsed body (or raw text) and its received entry."""

    body: Any
    parse_error: str | None
    is_sync: bool
    entry: dict[str, Any]


class CatenaApi(FaultPipeline):
    """Handlers of the Catena endpoints over one ``Store``."""

    def routes(self) -> list[web.RouteDef]:
        """The aiohttp routes of every Catena endpoint."""
        return [
            web.post(AUTH_PREFIX + "/token", self.token),
            web.post(AUTH_PREFIX + "/revoke", self.revoke),
            web.post(MESSAGES_PATH, self.create_message),
            web.get(OPERATIONS_PATH, self.list_operations),
            web.get(OPERATION_PATH, self.get_operation),
            web.get(USERS_PATH, self.list_users),
        ]

    # -- OAuth ------------------------------------------------------------------------------

    def _client_ok(self, config: SandboxConfig, client_id: str, secret: str) -> bool:
        if not client_id or not secret:
            return False
        if not config.credentials:
            return True
        return any(
            c.client_id == client_id and hmac.compare_digest(c.client_secret, secret)
            for c in config.credentials
        )

    def _token_form_error(
        self, form: Mapping[str, Any], config: SandboxConfig
    ) -> web.Response | None:
        """Keycloak's checks of a client-credentials form, in its order."""
        grant = form.get("grant_type")
        if grant is None:
            return r.oauth_error(400, "invalid_request", "Missing form parameter: grant_type")
        if grant != "client_credentials":
            return r.oauth_error(400, "unsupported_grant_type", "Unsupported grant_type")
        client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        if not self._client_ok(config, client_id, secret):
            return r.oauth_error(
                401, "invalid_client", "Invalid client or Invalid client credentials"
            )
        scope = form.get("scope")
        if scope is None:
            return r.oauth_error(400, "invalid_request", "Missing form parameter: scope")
        if scope != "organization":
            return r.oauth_error(400, "invalid_scope", "Invalid scopes: only organization")
        return None

    async def token(self, request: web.Request) -> web.StreamResponse:
        """POST token: client-credentials grant (Keycloak realm ``catena``)."""
        ctx = self.decide("token")

        async def process(ctx: Context) -> web.Response:
            try:
                form = await request.post()
            except ValueError:  # e.g. multipart without a boundary: Keycloak reads no form
                return r.oauth_error(400, "invalid_request", "Missing form parameter: grant_type")
            error = self._token_form_error(form, ctx.rt.config)
            if error is not None:
                return error
            if ctx.decision.action is not None and ctx.action_kind == "forbid":
                return r.fault_response(ctx.decision.action, "token")
            lifetime = ctx.rt.config.token_lifetime_seconds
            body = {
                "access_token": self.store.issue_token(str(form["client_id"]), lifetime),
                "expires_in": lifetime,
                "refresh_expires_in": 0,
                "token_type": "Bearer",
                "not-before-policy": 0,
                "scope": "organization telematics:read telematics:write",
            }
            return r.json_response(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

        response, _ = await self.apply(request, ctx, process)
        return response

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        """POST revoke: the token stops working at once (RFC 7009: 200 even when unknown)."""
        ctx = self.decide("revoke")

        async def process(ctx: Context) -> web.Response:
            try:
                form = await request.post()
            except ValueError:
                return r.oauth_error(400, "invalid_request", "Missing form parameter: token")
            client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
            if not self._client_ok(ctx.rt.config, client_id, secret):
                return r.oauth_error(
                    401, "invalid_client", "Invalid client or Invalid client credentials"
                )
            token = form.get("token")
            if not token:
                return r.oauth_error(400, "invalid_request", "Missing form parameter: token")
            self.store.revoke_token(str(token))
            return web.Response(status=200)

        response, _ = await self.apply(request, ctx, process)
        return response

    # -- messages -------------------------------------------------------------------------

    async def create_message(self, request: web.Request) -> web.StreamResponse:
        """POST /v2/telematics/messages in the configured body version."""
        raw = await request.read()
        try:
            body: Any = jsonutil.loads(raw)
            parse_error = None
        except ValueError as exc:
            body, parse_error = raw.decode(errors="replace"), str(exc)
        conn = body.get("connection_id") if isinstance(body, dict) else None
        conn = conn if isinstance(conn, str) else None
        schema = self.runtime.config.message_schema
        is_sync = schema == "catena_ids" and request.query.get("is_sync", "").lower() == "true"
        ctx = self.decide("messages", conn, is_sync)
        scheme = request.headers.get("Authorization", "").partition(" ")[0]
        entry = self.store.begin_message(
            {
                "n": ctx.n,
                "at": None,
                "body": body,
                "query": dict(request.query),
                "status": None,
                "operation_id": None,
                "connection_id": conn,
                "fault": ctx.decision.label,
                "latency_ms": ctx.decision.latency_ms,
                "unknown_fields": sorted(body.keys() - known_fields(schema))
                if isinstance(body, dict)
                else [],
                "authorization": f"{scheme} ***" if scheme else None,
            }
        )
        message = _Message(body, parse_error, is_sync, entry)
        outcome: dict[str, Any] = {"status": None}

        async def process(ctx: Context) -> web.Response:
            return self._reject(request, ctx, message) or self._accept(ctx, message)

        try:
            response, status = await self.apply(request, ctx, process)
            outcome["status"] = status if isinstance(status, int) else None
        finally:
            self.store.end_message(entry, **outcome)
        return response

    def _reject(self, request: web.Request, ctx: Context, message: _Message) -> web.Response | None:
        """Rate limit, then auth, then the body: the first that fails answers."""
        config = ctx.rt.config
        if ctx.rt.limiter is not None:
            admitted, wait = ctx.rt.limiter.admit(self.store.clock.now())
            if not admitted:
                retry_after = wait if config.rate_limit_retry_after else None
                return r.too_many_requests(retry_after, header=False)
        denied = self.authorize(request, ctx)
        if denied is not None:
            return denied
        if message.parse_error is not None:
            text = message.body[:200]
            return r.unprocessable([detail("body", text, "JSON decode error", "json_invalid")])
        details = validate_body(config.message_schema, message.body)
        sync_param = request.query.get("is_sync")
        if (
            config.message_schema == "catena_ids"
            and sync_param is not None
            and sync_param.lower() not in ("true", "false")
        ):
            details.append(
                detail(
                    "query.is_sync", sync_param, "Input should be a valid boolean", "bool_parsing"
                )
            )
        return r.unprocessable(details) if details else None

    def _accept(self, ctx: Context, message: _Message) -> web.Response:
        """Store the operation and answer in the configured body version's way."""
        config, body = ctx.rt.config, message.body
        fail = ctx.rt.fail
        tail = ctx.rt.tail
        conn = body["connection_id"]
        op = self.store.create_operation(
            body,
            body["connection_id"],
            _normalise(
                body,
                config.message_schema,
                ctx.rt.users_by_id,
                config.payload_normalisation.message_text,
            ),
            partner_id=config.partner_id,
            source_name=config.source_name,
            fleet_ref=body.get("fleet_ref") or _fleet_ref(body, ctx.rt.users_by_id),
            fail_planned=fail is not None
            and fail.check(ctx.n, body["connection_id"], ctx.elapsed, ctx.rt.plan.rng),
            list_delay=config.list_lag_tail.seconds
            if tail is not None and tail.check(ctx.n, conn, ctx.elapsed, ctx.rt.tail_rng)
            else 0.0,
        )
        message.entry["operation_id"] = op.id
        if config.message_schema == "source_ids":
            return r.json_response(202, {"id": op.id})
        if not message.is_sync:
            return r.json_response(202, self.store.render(op))
        action = ctx.decision.action
        if action is not None and action.kind == "sync_fail":
            failed = self.store.complete_sync(
                op, "failed", action.error_type, action.error_details, action.response_status_code
            )
            return r.json_response(502, failed)
        return r.json_response(200, self.store.complete_sync(op, "success"))

    # -- resource operations --------------------------------------------------------------

    async def get_operation(self, request: web.Request) -> web.StreamResponse:
        """GET one operation of one connection (404 for unknown ids and other connections)."""
        conn = request.match_info["connection_id"]
        op_id = request.match_info["operation_id"]
        ctx = self.decide("operations", conn if is_uuid(conn) else None)

        async def process(ctx: Context) -> web.Response:
            denied = self.authorize(request, ctx)
            if denied is not None:
                return denied
            details = [
                detail(f"path.{name}", value, "Input should be a valid UUID", "uuid_parsing")
                for name, value in (("connection_id", conn), ("resource_operation_id", op_id))
                if not is_uuid(value)
            ]
            if details:
                return r.unprocessable(details)
            self.settle(ctx.rt)
            op = self.store.get_operation(op_id)
            if op is None or op["connection_id"] != conn:
                return r.api_error(404, "Resource operation not found")
            op.pop("_seq")
            return r.json_response(200, op)

        response, _ = await self.apply(request, ctx, process)
        return response

    async def list_operations(self, request: web.Request) -> web.StreamResponse:
        """GET the cursor-paged list of operations, oldest first, ``list_lag_seconds`` behind."""
        query = request.query
        conn = query.get("connection_id")
        ctx = self.decide("operations", conn if is_uuid(conn) else None)

        async def process(ctx: Context) -> web.Response:
            denied = self.authorize(request, ctx)
            if denied is not None:
                return denied
            details: list[dict[str, str]] = []
            clock = self.store.clock
            filters = q.operation_filters(query, clock.wall(clock.now()), details)
            size = q.page_size(query, details)
            if details:
                return r.unprocessable(details)
            self.settle(ctx.rt)
            visible_before = clock.now() - ctx.rt.config.list_lag_seconds
            # A millisecond of slack around the window; the exact test is on the rendered time.
            window = self.store.operations_between(
                clock.mono(filters.start) - 1e-3,
                min(clock.mono(filters.end) + 1e-3, visible_before),
            )
            items = [
                op
                for op in window
                if op.created + op.list_delay <= visible_before
                and q.operation_matches(_filterable(op), filters, clock.wall(op.created))
            ]
            keys = [op.seq for op in items]
            try:
                page = paginate(items, keys, query.get("cursor"), size)
            except CursorError:
                bad = query.get("cursor", "")
                return r.unprocessable(
                    [detail("query.cursor", bad, "Invalid cursor", "value_error")]
                )
            return r.json_response(200, {**page.as_dict(), "items": self.store.reads(page.items)})

        response, _ = await self.apply(request, ctx, process)
        return response

    # -- users ------------------------------------------------------------------------------

    async def list_users(self, request: web.Request) -> web.StreamResponse:
        """GET seeded users, filtered like Catena's list (id filters capped at 100 values)."""
        query = request.query
        conn = query.get("connection_id")
        ctx = self.decide("users", conn if is_uuid(conn) else None)

        async def process(ctx: Context) -> web.Response:
            denied = self.authorize(request, ctx)
            if denied is not None:
                return denied
            details: list[dict[str, str]] = []
            source_ids = q.many(query, "source_ids", details)
            user_ids = q.many(query, "user_ids", details, uuids=True)
            fleet_refs = q.many(query, "fleet_refs", details)
            fleet_ids = q.many(query, "fleet_ids", details, uuids=True)
            conn_filter = q.one_uuid(query, "connection_id", details)
            is_driver = q.bool_param(query, "is_driver", details)
            with_source = q.bool_param(query, "include_source_data", details)
            order = q.sort_order(query, details)
            size = q.page_size(query, details)
            if details:
                return r.unprocessable(details)
            source_name = ctx.rt.config.source_name
            items = [
                read
                for read in (_user_read(user, source_name) for user in ctx.rt.config.users)
                if (source_ids is None or read["source_id"] in source_ids)
                and (user_ids is None or read["id"] in user_ids)
                and (fleet_refs is None or read["fleet_ref"] in fleet_refs)
                and (fleet_ids is None or read["fleet_id"] in fleet_ids)
                and (conn_filter is None or read["connection_id"] == conn_filter)
                and (is_driver is None or read["is_driver"] == is_driver)
            ]
            if order == "desc":
                items.reverse()
            if not with_source:
                for read in items:
                    del read["source_data"]
            try:
                page = paginate(items, range(len(items)), query.get("cursor"), size)
            except CursorError:
                bad = query.get("cursor", "")
                return r.unprocessable(
                    [detail("query.cursor", bad, "Invalid cursor", "value_error")]
                )
            return r.json_response(200, page.as_dict(total=len(items)))

        response, _ = await self.apply(request, ctx, process)
        return response


_SEEDED_AT = "2025-01-01T00:00:00Z"  # seeded users carry a fixed creation time
_FLEET_NAMESPACE = uuid.UUID("6f1c2a4e-8b3d-4e5f-9a7b-0c1d2e3f4a5b")


def _user_read(user: User, source_name: str) -> dict[str, Any]:
    """A seeded user as Catena's UserRead, with every field the OpenAPI spec requires.

    The seed has no fleet ids or provider data, so both are derived from it: a fleet id stable
    per (connection, fleet_ref), the seed itself as ``source_data`` and its SHA-256 as
    ``source_data_hash``, as Catena hashes what the provider sent.
    """
    source_data = dict(user.__dict__)
    fleet = f"{user.connection_id}/{user.fleet_ref or ''}"
    return {
        **source_data,
        "fleet_id": str(uuid.uuid5(_FLEET_NAMESPACE, fleet)),
        "source_name": source_name,
        "source_data": source_data,
        "source_data_hash": hashlib.sha256(jsonutil.canonical(source_data)).hexdigest(),
        "created_at": _SEEDED_AT,
        "updated_at": _SEEDED_AT,
    }


def _normalise(
    body: dict[str, Any], schema: str, users: dict[str, User], text: str | None = None
) -> dict[str, Any]:
    """The payload Catena stores: nulls dropped, keys sorted, source ids resolved when known.

    ``text``: the configured ``payload_normalisation.message_text`` (trim or collapse), for
    testing a matcher against a Catena that stores the text differently from how it was sent.
    """
    payload = {key: value for key, value in body.items() if value is not None}
    stored = payload.get("message_text")
    if text is not None and isinstance(stored, str):
        payload["message_text"] = stored.strip() if text == "trim" else " ".join(stored.split())
    if schema == "catena_ids":
        for catena_key, source_key in (
            ("sender_id", "source_sender_id"),
            ("recipient_id", "source_recipient_id"),
        ):
            user = users.get(payload.get(catena_key, ""))
            if user is not None:
                payload[source_key] = user.source_id
    return dict(sorted(payload.items()))


def _fleet_ref(body: dict[str, Any], users: dict[str, User]) -> str | None:
    user = users.get(body.get("recipient_id") or "") or users.get(body.get("sender_id") or "")
    return None if user is None else user.fleet_ref


def _filterable(op: Operation) -> dict[str, Any]:
    """The fields of an operation the LIST filters look at, without rendering all of it."""
    return {
        "connection_id": op.connection_id,
        "resource": "message",
        "operation_type": "create",
        "source_name": op.source_name,
        "source_id": op.source_id,
        "fleet_ref": op.fleet_ref,
    }
