"""What the sandbox remembers: requests received, operations, tokens and counters.

The server mutates it from its event-loop thread while tests read it from theirs, so every public
method takes one lock and returns copies. Times are kept as monotonic seconds and rendered as wall
clock through one ``Clock``, so timestamps never go backwards and ordering by ``created_at`` equals
ordering by creation.
"""

from __future__ import annotations

import base64
import copy
import os
import random
import secrets
import threading
import time
import uuid
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from target_catena_messages import jsonutil

_IDS = random.Random(os.urandom(16))  # not the fault plan's seeded generator: ids never shift it
_V4 = ~((0xF000 << 64) | (0xC000 << 48))
_V4_BITS = (0x4000 << 64) | (0x8000 << 48)


def new_id() -> str:
    """A random version-4 UUID string.

    Random bits formatted by hand: ``str(uuid.uuid4())`` costs a ``getrandom`` syscall and a
    ``UUID`` object, several times this, on every accepted create-message request.
    """
    h = f"{(_IDS.getrandbits(128) & _V4) | _V4_BITS:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Clock:
    """Monotonic time plus its wall-clock rendering (UTC, ISO 8601 with ``Z``)."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

    def wall(self, mono: float) -> datetime:
        """The UTC datetime of a monotonic instant."""
        return datetime.fromtimestamp(self._wall0 + mono - self._mono0, timezone.utc)

    def mono(self, wall: datetime) -> float:
        """The monotonic instant of a UTC datetime (inverse of ``wall``)."""
        return wall.timestamp() - self._wall0 + self._mono0

    def iso(self, mono: float) -> str:
        """ISO 8601 UTC text of a monotonic instant, as Catena writes it."""
        return self.wall(mono).isoformat().replace("+00:00", "Z")


@dataclass
class OperationLog:
    """One attempt log of an operation."""

    id: str
    at: float
    status: str
    error_type: str | None = None
    error_details: str | None = None
    response_status_code: int | None = None


@dataclass
class Operation:
    """A resource operation created by one accepted create-message request."""

    id: str
    seq: int
    connection_id: str
    partner_id: str
    source_name: str
    fleet_ref: str | None
    payload: dict[str, Any]
    created: float
    updated: float
    fail_planned: bool = False
    list_delay: float = 0.0  # beyond list_lag_seconds before LIST shows it (the lag's tail)
    status: str = "pending"
    resource_id: str | None = None
    source_id: str | None = None
    logs: list[OperationLog] = field(default_factory=list)

    def complete(
        self,
        status: str,
        at: float,
        error_type: str | None = None,
        error_details: str | None = None,
        response_status_code: int | None = None,
    ) -> None:
        """Settle the operation: success gets ids, failure gets an error log."""
        self.status = status
        self.updated = at
        if status == "success":
            self.resource_id = str(uuid.uuid4())
            self.source_id = "msg-" + secrets.token_hex(6)
            log = OperationLog(str(uuid.uuid4()), at, "success", response_status_code=200)
        else:
            log = OperationLog(
                str(uuid.uuid4()),
                at,
                "failed",
                error_type=error_type,
                error_details=error_details,
                response_status_code=response_status_code,
            )
        self.logs.append(log)

    def as_resource_operation(self, clock: Clock) -> dict[str, Any]:
        """The telematics ``ResourceOperation`` shape, as POST /messages answers it."""
        logs = [
            {
                **_log_base(log, self.id, clock),
                "response_status_code": log.response_status_code,
                "response_headers": {},
            }
            for log in self.logs
        ]
        return {
            "id": self.id,
            "created_at": clock.iso(self.created),
            "updated_at": clock.iso(self.updated),
            "deleted_at": None,
            "partner_id": self.partner_id,
            "connection_id": self.connection_id,
            "resource": "message",
            "resource_id": self.resource_id,
            "source_id": self.source_id,
            "operation_type": "create",
            "payload": copy.deepcopy(self.payload),
            "status": self.status,
            "logs": logs,
        }

    def as_read(self, clock: Clock) -> dict[str, Any]:
        """The integrations ``ResourceOperationRead`` shape, as GET/LIST answer it."""
        return {
            "id": self.id,
            "created_at": clock.iso(self.created),
            "updated_at": clock.iso(self.updated),
            "partner_id": self.partner_id,
            "connection_id": self.connection_id,
            "fleet_ref": self.fleet_ref,
            "source_name": self.source_name,
            "resource": "message",
            "resource_id": self.resource_id,
            "source_id": self.source_id,
            "operation_type": "create",
            "status": self.status,
            "payload": copy.deepcopy(self.payload),
            "logs": [_log_base(log, self.id, clock) for log in self.logs],
        }


def _log_base(log: OperationLog, operation_id: str, clock: Clock) -> dict[str, Any]:
    return {
        "id": log.id,
        "created_at": clock.iso(log.at),
        "updated_at": clock.iso(log.at),
        "resource_operation_id": operation_id,
        "status": log.status,
        "error_type": log.error_type,
        "error_details": log.error_details,
    }


@dataclass
class _Token:
    expires: float
    revoked: bool = False


def make_token(client_id: str, issued_wall: float, lifetime: int) -> str:
    """A JWT-shaped opaque token (unsigned) whose payload carries ``exp`` like Keycloak's."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "RS256", "typ": "JWT", "kid": "catena-sandbox"}
    claims = {
        "exp": int(issued_wall + lifetime),
        "iat": int(issued_wall),
        "jti": str(uuid.uuid4()),
        "azp": client_id,
        "typ": "Bearer",
        "scope": "organization telematics:read telematics:write",
    }
    parts = (jsonutil.dumps(header).encode(), jsonutil.dumps(claims).encode())
    return ".".join([*(b64(p) for p in parts), b64(secrets.token_bytes(32))])


def _created(op: Operation) -> float:
    return op.created


class Store:
    """All mutable sandbox state behind one lock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self._tokens_issued: list[str] = []
        self._clear()
        self._origin = self.clock.now()
        self._n_any = 0
        self._requests: Counter[str] = Counter()

    def _clear(self) -> None:
        self._received: list[dict[str, Any]] = []
        self._ops: dict[str, Operation] = {}
        self._ops_order: list[Operation] = []
        self._pending: deque[Operation] = deque()
        self._accepted_bodies: list[Any] = []
        self._accepted = 0
        self._status_counts: dict[str, Counter[str]] = {}
        self._in_flight = 0
        self._peak_in_flight = 0

    # -- counters -------------------------------------------------------------------------

    def next_request(self, endpoint: str) -> tuple[int, int, float]:
        """Number a request: ``(n on its endpoint, n across endpoints, seconds since origin)``."""
        with self._lock:
            self._requests[endpoint] += 1
            self._n_any += 1
            return self._requests[endpoint], self._n_any, self.clock.now() - self._origin

    def count_status(self, endpoint: str, status: int | str) -> None:
        """Count one answer (an HTTP status, or ``reset``/``drop`` when there was none)."""
        with self._lock:
            self._status_counts.setdefault(endpoint, Counter())[str(status)] += 1

    def restart_numbering(self) -> None:
        """Request numbers start again at 1 and fault time windows at 0 (a new fault plan)."""
        with self._lock:
            self._requests.clear()
            self._n_any = 0
            self._origin = self.clock.now()

    def reset(self) -> None:
        """Forget requests, operations and counters; issued tokens stay valid."""
        with self._lock:
            self._clear()
        self.restart_numbering()

    # -- messages received ----------------------------------------------------------------

    def begin_message(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Record a create-message request as it arrives (counted as in flight until ``end``).

        ``at`` is kept as the monotonic instant and rendered as ISO text by ``received``: the
        arrival is still stamped here, but the formatting is paid only by readers.
        """
        with self._lock:
            entry["at"] = self.clock.now()
            self._received.append(entry)
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            return entry

    def end_message(self, entry: dict[str, Any], **outcome: Any) -> None:
        """Fill in how a create-message request ended and take it out of flight."""
        with self._lock:
            entry.update(outcome)
            self._in_flight -= 1
            if outcome.get("status") in (200, 202):
                self._accepted += 1

    def received(self) -> list[dict[str, Any]]:
        """Copies of every create-message request received, in arrival order."""
        with self._lock:
            received = copy.deepcopy(self._received)
        for entry in received:
            entry["at"] = self.clock.iso(entry["at"])
        return received

    def accepted_bodies(self) -> list[Any]:
        """The bodies that created an operation, in order (dropped answers included)."""
        with self._lock:
            return copy.deepcopy(self._accepted_bodies)

    # -- tokens -----------------------------------------------------------------------------

    def issue_token(self, client_id: str, lifetime: int) -> str:
        """Issue a bearer token valid for ``lifetime`` seconds."""
        token = make_token(client_id, time.time(), lifetime)
        with self._lock:
            self._tokens[token] = _Token(self.clock.now() + lifetime)
            self._tokens_issued.append(token)
        return token

    def token_valid(self, token: str) -> bool:
        """Known, unrevoked and unexpired."""
        with self._lock:
            record = self._tokens.get(token)
            return record is not None and not record.revoked and self.clock.now() < record.expires

    def revoke_token(self, token: str) -> bool:
        """Revoke one token; False when it was never issued."""
        with self._lock:
            record = self._tokens.get(token)
            if record is not None:
                record.revoked = True
            return record is not None

    def revoke_all(self) -> None:
        """Revoke every token issued so far (tokens issued later are valid)."""
        with self._lock:
            for record in self._tokens.values():
                record.revoked = True

    # -- operations -------------------------------------------------------------------------

    def create_operation(
        self, body: Any, connection_id: str, payload: dict[str, Any], **fields: Any
    ) -> Operation:
        """Store an operation (pending) for an accepted body."""
        with self._lock:
            now = self.clock.now()
            op = Operation(
                id=new_id(),
                seq=len(self._ops_order) + 1,
                connection_id=connection_id,
                payload=payload,
                created=now,
                updated=now,
                **fields,
            )
            self._ops[op.id] = op
            self._ops_order.append(op)
            self._pending.append(op)
            # No copy: the server parsed ``body`` for this request and never changes it, and
            # ``accepted_bodies`` returns copies (a deep copy here was 10 % of a request's CPU).
            self._accepted_bodies.append(body)
            return op

    def complete_sync(
        self,
        op: Operation,
        status: str,
        error_type: str | None = None,
        error_details: str | None = None,
        response_status_code: int | None = None,
    ) -> dict[str, Any]:
        """Settle a synchronous operation at once and return its ResourceOperation shape."""
        with self._lock:
            op.complete(status, self.clock.now(), error_type, error_details, response_status_code)
            return op.as_resource_operation(self.clock)

    def render(self, op: Operation) -> dict[str, Any]:
        """ResourceOperation shape of a stored operation, read under the lock."""
        with self._lock:
            return op.as_resource_operation(self.clock)

    def settle(self, complete_after: float | None, error_type: str, error_details: str) -> None:
        """Complete pending operations whose time has come (``complete_after`` seconds old).

        Done lazily on every read, with ``updated_at`` set to when the operation became due, so
        readers see exactly what a background worker would have produced.
        """
        if complete_after is None:
            return
        with self._lock:
            now = self.clock.now()
            while self._pending and self._pending[0].created + complete_after <= now:
                op = self._pending.popleft()
                if op.status == "pending":
                    status = "failed" if op.fail_planned else "success"
                    op.complete(status, op.created + complete_after, error_type, error_details)

    def complete(
        self, status: str, ids: list[str] | None, error_type: str, error_details: str
    ) -> int:
        """Complete pending operations now (all, or those in ``ids``); returns how many."""
        with self._lock:
            now = self.clock.now()
            wanted = None if ids is None else set(ids)
            done = 0
            for op in self._ops_order:
                if op.status == "pending" and (wanted is None or op.id in wanted):
                    op.complete(status, now, error_type, error_details)
                    done += 1
            return done

    def get_operation(self, operation_id: str) -> dict[str, Any] | None:
        """ResourceOperationRead of one operation, or None."""
        with self._lock:
            op = self._ops.get(operation_id)
            return None if op is None else {**op.as_read(self.clock), "_seq": op.seq}

    def operations(self) -> list[dict[str, Any]]:
        """ResourceOperationRead of every operation, oldest first."""
        with self._lock:
            return [op.as_read(self.clock) for op in self._ops_order]

    def operations_between(self, start: float, end: float) -> list[Operation]:
        """Operations created within ``start..end`` (monotonic), oldest first.

        A bisection, not a scan: the LIST endpoint is asked for a few seconds of a run that may
        have stored a million operations, and must not cost the whole history per page.
        Callers render the ones they answer with through ``reads``.
        """
        with self._lock:
            ops = self._ops_order
            lo = bisect_left(ops, start, key=_created)
            hi = bisect_right(ops, end, lo=lo, key=_created)
            return ops[lo:hi]

    def reads(self, ops: list[Operation]) -> list[dict[str, Any]]:
        """ResourceOperationRead of each operation, rendered under the lock."""
        with self._lock:
            return [op.as_read(self.clock) for op in ops]

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for tests and the bench (see the ``Sandbox.stats`` docstring)."""
        with self._lock:
            return {
                "requests": dict(self._requests),
                "status_counts": {k: dict(v) for k, v in self._status_counts.items()},
                "peak_in_flight": self._peak_in_flight,
                "in_flight": self._in_flight,
                "token_requests": self._requests["token"],
                "tokens_issued": list(self._tokens_issued),
                "operations": len(self._ops_order),
                "accepted": self._accepted,
            }
