"""Before resending an ambiguous send, look for the operation Catena may already have created.

Catena has no idempotency key (catena-api.md §5). A send that timed out, was reset after the
request went out, or got a 500/502/504 may have created a message; so may a claim left behind by a
process that died. The only trace is the resource-operation LIST (§3c): operations of one
connection, ``resource=message``, ``operation=create``, in a time window. We match on the payload
*as Catena stores it* — keys reordered, nulls dropped, resolved source ids added — so a match means
every non-null field we sent is there with the same value.

One candidate: adopt its operation id (accepted, not resent). Several: we cannot tell which is
ours, so the message is dead-lettered as ``ambiguous`` rather than risk a second copy. None: let
delivery resend within ``max_ambiguous_resends``.

The list lags: a new operation appears only after a while. So a lookup first waits until the lag
has passed since our last attempt (for claims left by a dead process: since this run started), then
reads the list once per connection and window. After a crash hundreds of keys may need a lookup;
they share one wait and one snapshot, indexed by message text, instead of one scan each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from target_catena_messages.catena.client import CatenaClient
from target_catena_messages.catena.errors import CatenaApiError
from target_catena_messages.ledger import Ledger
from target_catena_messages.outcome import Message

logger = logging.getLogger(__name__)

_MARGIN = timedelta(minutes=2)  # clock skew between us and Catena, and claim-to-send delay
_LIST_ATTEMPTS = 4
# A refresh re-reads this much before the last read, beyond the lag: operations still appearing.
# (Not the 2-minute _MARGIN: re-reading minutes of a busy connection on every refresh was what made
# a 200k-record soak crawl.)
_REFRESH_OVERLAP = timedelta(seconds=10)


def matches(payload: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Whether a stored payload is this body: every non-null field we sent, equal."""
    for name, value in body.items():
        if value is None:
            continue
        stored = payload.get(name)
        if isinstance(value, list) and isinstance(stored, list):
            if sorted(map(str, value)) != sorted(map(str, stored)):
                return False
        elif stored != value:
            return False
    return True


@dataclass
class _Snapshot:
    """Operations of one connection from ``since`` up to ``read_at``, indexed by message text."""

    since: datetime
    read_at: datetime
    by_text: dict[Any, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)


class CatenaOperationLookup:
    """Finds an earlier operation for an ambiguous message through the LIST endpoint."""

    def __init__(
        self,
        client: CatenaClient,
        ledger: Ledger,
        *,
        lag_seconds: float,
        stop: threading.Event,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._lag = timedelta(seconds=lag_seconds)
        self._stop = stop
        self._now = now
        self._started = now()
        self._lock = threading.Lock()
        self._snapshots: dict[str, _Snapshot] = {}
        self.list_requests = 0

    def find(self, message: Message) -> tuple[str | None, int]:
        """Return (operation id, candidates): an id only when exactly one operation matches.

        Candidates is -1 when the list could not be read: not knowing is not "not found", so
        the caller must not resend.
        """
        connection_id = message.connection_id
        if connection_id is None:
            return None, 0
        since = (message.prior_claimed_at or message.first_sent_at or self._started) - _MARGIN
        settled = (message.last_sent_at or self._started) + self._lag
        wait = (settled - self._now()).total_seconds()
        if wait > 0 and self._stop.wait(wait):
            return None, -1
        snapshot = self._snapshot(connection_id, since, settled)
        if snapshot is None:
            return None, -1
        found = [
            op_id
            for op_id, payload in snapshot.by_text.get(message.body.get("message_text"), [])
            if matches(payload, message.body)
        ]
        if found:
            taken = self._ledger.operation_ids_in_use(found)
            found = [op_id for op_id in found if op_id not in taken]
        if len(found) == 1:
            logger.info(
                "adopted operation %s for %s/%s after an ambiguous send",
                found[0],
                message.stream,
                message.key,
            )
            return found[0], 1
        return None, len(found)

    def _snapshot(self, connection_id: str, since: datetime, settled: datetime) -> _Snapshot | None:
        """A snapshot read after ``settled`` that reaches back to ``since`` (cached).

        A fresher snapshot reads only what is new since the last read (minus the lag, when late
        operations may still appear), so a long run with many ambiguous sends does not re-read
        its whole window every time.
        """
        with self._lock:
            snap = self._snapshots.get(connection_id)
            if snap is not None and snap.read_at >= settled and snap.since <= since:
                return snap
            read_at = self._now()
            if snap is not None and snap.since <= since:
                start = max(snap.since, snap.read_at - self._lag - _REFRESH_OVERLAP)
            else:
                snap = _Snapshot(since=since, read_at=read_at)
                start = since
            operations = self._read(connection_id, start, read_at)
            if operations is None:
                return None
            for op in operations:
                payload = op.get("payload")
                op_id = str(op.get("id"))
                if isinstance(payload, dict) and op_id not in snap.ids:
                    snap.ids.add(op_id)
                    snap.by_text.setdefault(payload.get("message_text"), []).append(
                        (op_id, payload)
                    )
            snap.read_at = read_at
            self._snapshots[connection_id] = snap
            return snap

    def _read(
        self, connection_id: str, since: datetime, until: datetime
    ) -> list[dict[str, Any]] | None:
        for attempt in range(_LIST_ATTEMPTS):
            self.list_requests += 1
            try:
                return list(
                    self._client.list_operations(
                        connection_id,
                        from_datetime=since,
                        to_datetime=until + timedelta(seconds=5),
                    )
                )
            except CatenaApiError as exc:
                logger.warning("reading Catena's operation list failed: %s", exc)
                if attempt + 1 == _LIST_ATTEMPTS or self._stop.wait(
                    exc.retry_after or 2.0 * (attempt + 1)
                ):
                    return None
        return None
