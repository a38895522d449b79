"""The path every sandbox request takes through the fault plan.

Number the request, ask the plan, revoke tokens and sleep if told, then either misbehave at once
(``reset``, ``status``) or let the endpoint process the request and misbehave afterwards (``drop``,
``status`` with ``after_processing``, ``refuse``). Endpoints only see a ``Context`` and supply the
faithful processing; this keeps every fault kind working the same way on every endpoint.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from target_catena_messages.sandbox import responses as r
from target_catena_messages.sandbox.config import SandboxConfig, User
from target_catena_messages.sandbox.faults import (
    NO_FAULT,
    Decision,
    FaultPlan,
    Matcher,
    RequestInfo,
    SlidingWindowLimiter,
)
from target_catena_messages.sandbox.store import Store

Process = Callable[["Context"], Awaitable[web.Response]]


@dataclass(frozen=True)
class Runtime:
    """A config with the live objects built from it; replaced as a whole by ``configure``."""

    config: SandboxConfig
    plan: FaultPlan
    fail: Matcher | None
    limiter: SlidingWindowLimiter | None
    users_by_id: dict[str, User]
    tail: Matcher | None  # which operations the list shows late (list_lag_tail)
    tail_rng: random.Random  # the tail's draws: never shifts the fault plan's

    @classmethod
    def build(cls, config: SandboxConfig) -> Runtime:
        """Fresh fault plan, failure matcher and rate limiter for ``config``."""
        fail = config.operations.fail
        rate = config.rate_limit_per_second
        return cls(
            config=config,
            plan=FaultPlan(config.faults),
            fail=None if fail is None else Matcher(fail),
            limiter=None if rate is None else SlidingWindowLimiter(rate),
            users_by_id={user.id: user for user in config.users},
            tail=None
            if config.list_lag_tail.match is None
            else Matcher(config.list_lag_tail.match),
            tail_rng=random.Random(config.faults.seed),
        )


@dataclass(frozen=True)
class Context:
    """One numbered request and the faults decided for it."""

    rt: Runtime
    endpoint: str
    n: int
    elapsed: float
    decision: Decision

    @property
    def action_kind(self) -> str | None:
        """Kind of the exclusive fault for this request, if any."""
        return None if self.decision.action is None else self.decision.action.kind


class FaultPipeline:
    """Fault handling, auth and lazy operation settling shared by every endpoint."""

    def __init__(
        self, config: SandboxConfig, store: Store, on_refuse: Callable[[float], None]
    ) -> None:
        self.store = store
        self.runtime = Runtime.build(config)
        self._on_refuse = on_refuse

    def configure(self, config: SandboxConfig) -> None:
        """Swap in a new config and fault plan; request numbers start again at 1."""
        self.runtime = Runtime.build(config)
        self.store.restart_numbering()

    def decide(
        self, endpoint: str, connection_id: str | None = None, sync: bool = False
    ) -> Context:
        """Number a request and decide its faults."""
        rt = self.runtime
        n, n_any, elapsed = self.store.next_request(endpoint)
        if rt.plan.empty:
            return Context(rt, endpoint, n, elapsed, NO_FAULT)
        decision = rt.plan.decide(RequestInfo(endpoint, n, n_any, connection_id, elapsed, sync))
        return Context(rt, endpoint, n, elapsed, decision)

    async def apply(
        self, request: web.Request, ctx: Context, process: Process
    ) -> tuple[web.StreamResponse, int | str]:
        """Run ``process`` under the decided faults; returns the answer and its status label.

        The label is the HTTP status, or ``reset``/``drop`` when the client got no answer. A
        ``status`` fault with ``after_processing`` replaces only successful answers, so the
        operation exists although the client saw an error (an ambiguous failure).
        """
        decision = ctx.decision
        if decision.revoke_tokens:
            self.store.revoke_all()
        if decision.latency_ms > 0:
            await asyncio.sleep(decision.latency_ms / 1000.0)
        action = decision.action
        kind = None if action is None else action.kind
        if kind == "reset":
            close_connection(request, reset=True)
            self.store.count_status(ctx.endpoint, "reset")
            return web.Response(status=499), "reset"  # never sent: the socket is gone
        if action is not None and kind == "status" and not action.after_processing:
            response: web.StreamResponse = r.fault_response(action, ctx.endpoint)
        else:
            response = await process(ctx)
            if kind == "drop":
                close_connection(request, reset=False)
                self.store.count_status(ctx.endpoint, "drop")
                return response, "drop"
            if action is not None and kind == "status" and response.status < 300:
                response = r.fault_response(action, ctx.endpoint)
            elif action is not None and kind == "refuse":
                response.force_close()
                self._on_refuse(action.seconds)
                # Let the closed keep-alive sockets really close (FIN sent) before this answer
                # goes out, so a client reusing one sees it dropped and gets a clean refusal.
                for _ in range(3):
                    await asyncio.sleep(0)
        self.store.count_status(ctx.endpoint, response.status)
        return response, response.status

    def authorize(self, request: web.Request, ctx: Context) -> web.Response | None:
        """401 without a valid bearer token, 403 when a ``forbid`` fault matched."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return r.api_error(401, "Not authenticated")
        if not self.store.token_valid(token.strip()):
            return r.api_error(401, "Invalid, expired or revoked token")
        if ctx.decision.action is not None and ctx.action_kind == "forbid":
            return r.fault_response(ctx.decision.action, ctx.endpoint)
        return None

    def settle(self, rt: Runtime) -> None:
        """Apply due automatic completions before a read."""
        ops = rt.config.operations
        self.store.settle(ops.complete_after_seconds, ops.error_type, ops.error_details)


def close_connection(request: web.Request, reset: bool) -> None:
    """Close the client's connection without an answer; ``reset`` sends a TCP RST (SO_LINGER 0)."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
