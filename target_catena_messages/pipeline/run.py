"""One run of the target: wires preparation, admission, delivery and the recorder; ends the run.

The run owns what lives for the whole process and is shared by all sinks: the ledger, the dead
letters, the checkpointer, the report, the delivery engine, and the run lock (see the package
docstring for the threads and the lock order). Reader thread: :meth:`Run.prepare` per record
(kept in :attr:`Run.buffered`, one batch shared by every stream), :meth:`Run.dispatch_buffered`
per batch (admitted inline; see :mod:`.admission`), then :meth:`Run.finish` or
:meth:`Run.abort`. Either ending writes the newest safe STATE, then the summary
(docs/design.md, "Durability order").
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from target_catena_messages.catena.auth import ClientCredentialsTokenProvider, TokenProvider
from target_catena_messages.catena.client import CatenaClient, Failure
from target_catena_messages.catena.retry import RetryPolicy
from target_catena_messages.connect import client_from_settings
from target_catena_messages.dead_letters import DeadLetterWriter
from target_catena_messages.delivery.availability import Availability
from target_catena_messages.delivery.engine import Delivery
from target_catena_messages.delivery.lookup import CatenaOperationLookup
from target_catena_messages.delivery.throttle import Throttle
from target_catena_messages.errors import FatalError, FatalKind, Interrupted
from target_catena_messages.ledger import Ledger, new_run_id
from target_catena_messages.ops.confirm import (
    confirm_operations,
    dead_letter_fields,
    ledger_updates,
    summary_counts,
)
from target_catena_messages.outcome import Message
from target_catena_messages.pipeline.admission import Admission
from target_catena_messages.pipeline.backlog import Backlog
from target_catena_messages.pipeline.checkpoint import Checkpointer
from target_catena_messages.pipeline.preflight import preflight
from target_catena_messages.pipeline.prepare import Preparer
from target_catena_messages.pipeline.recorder import QueueItem, Recorder
from target_catena_messages.pipeline.report import RunReport, emit_summary, plural
from target_catena_messages.pipeline.users import UserResolver
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import Settings
from target_catena_messages.tuning import outage_probe_cap_seconds, outage_quiet_seconds

logger = logging.getLogger(__name__)


class Run:
    """Everything one target process shares across its sinks."""

    def __init__(
        self,
        settings: Settings,
        *,
        write_state: Callable[[dict[str, Any]], None],
        redactor: Redactor,
        stderr: Callable[[str], None] | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.settings = settings
        self.run_id = new_run_id()
        self._stderr = stderr or _write_stderr
        self._started = time.monotonic()
        self.ledger = Ledger.open(
            settings.ledger_url, run_id=self.run_id, read_only=settings.dry_run
        )
        logger.info(
            "Ledger %s holds %s (run %s)%s",
            self.ledger.location,
            plural(self.ledger.count(), "key"),
            self.run_id,
            " — dry run: read-only, nothing will be sent" if settings.dry_run else "",
        )
        self.dead_letters = DeadLetterWriter(
            settings.dead_letter_path, self.run_id, secrets=redactor.secrets
        )
        self.checkpointer = Checkpointer(self.run_id)
        self.report = RunReport(self.run_id)
        self._lock = threading.RLock()  # the run lock: see the package docstring
        self._backlog = Backlog(self._lock, 2 * batch_size)
        outcomes: queue.SimpleQueue[QueueItem] = queue.SimpleQueue()
        self.critical = False
        self.stop_requested = False
        self.tokens: TokenProvider | None = None
        self._client: CatenaClient | None = None
        self._stop: threading.Event | None = None
        self._confirmation: dict[str, Any] | None = None
        self._throttle: Throttle | None = None
        self.availability: Availability | None = None  # whether Catena is reachable at all
        self.delivery: Delivery | None = None
        resolver: UserResolver | None = None
        if not settings.dry_run:
            self.delivery, resolver = self._make_delivery(redactor, outcomes.put)
        preparer = Preparer(
            settings,
            lock=self._lock,
            checkpointer=self.checkpointer,
            backlog=self._backlog,
            lanes=self.delivery is not None,
        )
        self.prepare = preparer.prepare
        """Record → Message (the per-record path; see :meth:`Preparer.prepare`)."""
        self.buffered: list[Message] = []
        """Prepared records of every stream not yet dispatched, in input order: the sinks' one
        batch. One list for all streams, so a full batch never sends a driver's later message
        while an earlier one (of another stream) waits. Cleared in place: sinks keep its
        ``append``."""
        self._admission = Admission(
            settings,
            lock=self._lock,
            ledger=self.ledger,
            preparer=preparer,
            outcomes=outcomes,
            delivery=self.delivery,
            resolver=resolver,
        )
        self._recorder = Recorder(
            settings,
            outcomes=outcomes,
            lock=self._lock,
            backlog=self._backlog,
            ledger=self.ledger,
            dead_letters=self.dead_letters,
            checkpointer=self.checkpointer,
            report=self.report,
            pending=self._admission.pending,
            claimed=self._admission.claimed,
            hand_back=self._admission.hand_back,
            renew_leases=self._admission.renew_leases,
            write_state=write_state,
            delivery=self.delivery,
            http_counters=self.http_counters,
            availability=self.availability,
        )
        self._recorder_error_told = False  # the reader raised it: its line is written
        self._recorder.start()
        self._admission.start()

    def _make_delivery(
        self, redactor: Redactor, on_outcome: Callable[[QueueItem], None]
    ) -> tuple[Delivery, UserResolver | None]:
        s = self.settings
        client, tokens = client_from_settings(s, redactor)
        self.tokens = tokens.inner
        # One throttle for every request to Catena: a 429 pauses sends and reads alike.
        self._throttle = throttle = Throttle(max_rate=s.max_requests_per_second)
        stop = threading.Event()
        # One view of whether Catena is reachable, shared by everything that talks to it: an
        # outage is the run's, probed once, not each message's (delivery/availability.py).
        connection_id = s.default_connection_id or None
        self.availability = available = Availability(
            lambda: client.probe(connection_id),
            quiet_seconds=outage_quiet_seconds(),
            limit_seconds=s.max_retry_seconds,
            stop=stop,
            probe_cap_seconds=outage_probe_cap_seconds(),
        )
        if isinstance(self.tokens, ClientCredentialsTokenProvider):
            self.tokens.outage = available.doubtful  # the prober retries, not each fetch
        resolver = (
            UserResolver(client, throttle=throttle, availability=available)
            if s.body_version.resolves_user_ids
            else None
        )
        self._client, self._stop = client, stop
        lookup = CatenaOperationLookup(
            client,
            self.ledger,
            lag_seconds=s.operation_lookup_lag_seconds,
            stop=stop,
            throttle=throttle,
            availability=available,
        )
        delivery = Delivery(
            client,
            lookup=lookup,
            before_resend=self._note_resend,
            stop=stop,
            on_outcome=on_outcome,
            policy=RetryPolicy(
                max_retries=s.max_retries,
                max_retry_seconds=s.max_retry_seconds,
                max_ambiguous_resends=s.max_ambiguous_resends,
                available=available.available,
            ),
            throttle=throttle,
            max_concurrency=s.max_concurrency,
            max_consecutive_rejections=s.max_consecutive_rejections,
            is_sync=s.is_sync,
            availability=available,
        )
        available.on_fatal = delivery.fail  # the outage limit ends the run like any fatal
        return delivery, resolver

    def on_unavailable(self, failure: Failure) -> None:
        """The start-up probe found Catena unavailable: probe until it answers, or end the run.

        Returns once Catena has answered three probes in a row; one warning, one request at a
        time, with backoff (delivery/availability.py).

        Raises:
            FatalError: ``catena_unavailable`` after max_retry_seconds; Interrupted on a signal.
        """
        available = self.availability
        if available is None:
            return
        available.begin(failure)
        if not available.wait():
            raise available.fatal or Interrupted("interrupted by a signal")

    def preflight(self) -> None:
        """Before input is read: the token and a size-1 operation-list read (not in a dry run).

        Raises:
            FatalError: The URL, a proxy or the credentials are wrong (``configuration``), or
                Catena is unavailable (``catena_unavailable``, from ``on_unavailable``).
        """
        if self._client is None or self._stop is None:
            return  # a dry run: no request at all
        preflight(
            self._client,
            connection_id=self.settings.default_connection_id or None,
            on_unavailable=self.on_unavailable,
            stop=self._stop,
        )

    def _note_resend(self, message: Message) -> int:
        """Delivery is about to resend after an ambiguous attempt: count it, committed first.

        The count spans runs (``max_ambiguous_resends`` caps it per key); the engine never
        touches the ledger itself.
        """
        return self.ledger.note_resend(message.namespace, message.key)

    # -- reader thread -----------------------------------------------------------------------

    def dispatch(self, messages: Sequence[Message]) -> None:
        """One sink batch: decide each message with the ledger, send the new ones."""
        self._raise_if_failed()
        self.critical = True  # a signal must not cut a claim transaction in two
        try:
            self._admission.admit_batch(messages)
        finally:
            self.critical = False
        if self.stop_requested:
            raise Interrupted("interrupted by a signal")
        self._wait_for_room()

    def dispatch_buffered(self) -> None:
        """Dispatch every record waiting, of every stream, in input order (see ``buffered``)."""
        buffered = self.buffered
        if buffered:
            messages = buffered.copy()
            buffered.clear()
            self.dispatch(messages)

    def add_tap_state(self, value: dict[str, Any]) -> None:
        """A tap STATE: tied to every record read before it."""
        with self._lock:
            self.checkpointer.add_tap_state(value)

    def _wait_for_room(self) -> None:
        """Backpressure: keep at most ~two batches of records in memory."""
        while not self._backlog.wait_for_room(0.5):
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        error = self._admission.error
        if error is not None:
            raise error if isinstance(error, FatalError) else FatalError(f"admission: {error}")
        if self._recorder.error is not None:
            self._recorder_error_told = True
            raise FatalError(
                f"recording outcomes failed: {self._recorder.error}", kind=FatalKind.CONFIGURATION
            )
        if self.delivery is not None and self.delivery.fatal is not None:
            fatal = self.delivery.fatal
            raise fatal if isinstance(fatal, FatalError) else FatalError(str(fatal))

    def http_counters(self) -> dict[str, float]:
        """Request counters from delivery and the token provider."""
        counters = self.delivery.counters() if self.delivery else {}
        if self.availability is not None:
            counters.update(self.availability.counters())
        made = getattr(self.tokens, "requests_made", None)
        if made is not None:
            counters["token_requests"] = made
        return counters

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> int:
        """End of input: wait for every outcome, write the last STATE and the summary."""
        while not self._backlog.wait_until_empty(0.25):
            self._raise_if_failed()
        self._admission.stop()
        self._confirm()
        return self._close(fatal=None)

    def _confirm(self) -> None:
        """confirm_operations: Catena's final word on this run's accepted messages."""
        to_confirm = self._recorder.to_confirm
        if not to_confirm or self._client is None:
            return
        try:
            results = confirm_operations(
                self._client,
                to_confirm,
                timeout_seconds=self.settings.confirm_timeout_seconds,
                max_concurrency=self.settings.max_concurrency,
                stop=self._stop,
                throttle=self._throttle,
                availability=self.availability,
            )
        except FatalError as exc:  # credentials refused: the messages stay accepted
            logger.error("confirmation stopped: %s", exc)  # noqa: TRY400
            return
        for c in results:
            if c.status == "failed":
                self.dead_letters.write(**dead_letter_fields(c))
        self.dead_letters.flush()  # before the final STATE
        self.ledger.record_confirmations(ledger_updates(results))
        self._confirmation = summary_counts(results)

    def abort(
        self, reason: BaseException, *, drain: bool = False, kind: FatalKind | None = None
    ) -> int:
        """Fatal: send nothing new, let in-flight requests finish, write the safe STATE.

        ``drain``: the input failed, not the delivery: the batches already claimed are valid
        and were read before the bad line, so they are delivered first (a signal still cuts
        this short). Otherwise queued messages stay claimed for the next run.
        ``kind``: why, for the summary; by default the error's own (see :func:`fatal_kind`).
        """
        self.critical = True  # a signal now stops delivery; it must not raise in here
        drain = drain and not self.stop_requested
        if self.delivery is not None and self.delivery.fatal is not None:
            drain = False
        self._admission.stop()  # nothing new is claimed after this
        also = self._admission.error
        if also is not None and str(also) not in str(reason):  # e.g. a record found invalid
            logger.warning("also stopped: %s", " ".join(str(also).split()) or type(also).__name__)
        if self.delivery is not None:
            if drain and self.delivery.fatal is None:
                self.delivery.wait_idle()
            self.delivery.stop()
            self.delivery.wait_idle(self.settings.request_timeout_seconds + 5)
        return self._close(fatal=reason, kind=kind)

    def _close(self, *, fatal: BaseException | None, kind: FatalKind | None = None) -> int:
        self._recorder.stop()
        if self.delivery is not None:
            self.delivery.close()
        recorder_error = self._recorder.error
        if recorder_error is not None and not self._recorder_error_told:
            logger.error("fatal: recording outcomes failed: %s", recorder_error)
        self._recorder.final_line()
        self.dead_letters.close()
        exit_code = 1 if fatal is not None or recorder_error is not None else 0
        if fatal is not None:
            kind = kind or fatal_kind(fatal)
        elif recorder_error is not None:
            kind = FatalKind.CONFIGURATION  # the ledger or the dead-letter file failed
        failed_at_catena = bool(self._confirmation and self._confirmation["failed"])
        if (
            exit_code == 0
            and (self.report.has_failures() or failed_at_catena)
            and not self.settings.allow_dead_letters
        ):
            exit_code = 2
        self.ledger.close()
        lines, data = self.report.summary(
            dead_letter_path=str(self.dead_letters.path),
            dead_letters_written=self.dead_letters.count,
            ledger_location=self.ledger.location,
            http=self.http_counters(),
            exit_code=exit_code,
            elapsed=time.monotonic() - self._started,
            confirmation=self._confirmation,
            fatal=kind,
        )
        emit_summary(lines, data, log=logger, write_line=self._stderr)
        return exit_code


def fatal_kind(error: BaseException) -> FatalKind:
    """Why a run ended, for the summary: a fatal error's own kind, else ``configuration``.

    Errors that are not :class:`FatalError` reach the fatal path only as bugs or environment
    failures (a ledger or file the target cannot use): none of them is cured by retrying later,
    so they are reported as needing a person, like a setting. Input errors are named ``input``
    by the caller, which knows them (see ``singer/target.py``).
    """
    return error.kind if isinstance(error, FatalError) else FatalKind.CONFIGURATION


def _write_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
