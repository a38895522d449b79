"""Before any input is read: prove that the credentials and the URLs work.

A wrong ``api_url``, a proxy in the way or refused credentials would otherwise show only at the
first POST, after records were read and claimed; found here, the run ends with one line naming
the URL and the status, nothing read, nothing claimed, no STATE. The probe is the client's
(:meth:`CatenaClient.probe`: the token, then a size-1 read of the operation list, the read
exactly-once depends on).

What an answer means (docs/retry.md, "Preflight"):

- Catena answered with a page: go on.
- A configuration failure (``classify.is_configuration_failure`` for a read: 401/403 after a
  token refresh, 404/405, a redirect, any other 4xx but 408/429, a 2xx that is not a page) or
  credentials the token endpoint refuses: the run ends, kind ``configuration``.
- No answer, or a 502/503/504 (``classify.signals_outage``): Catena is unavailable at start.
  The run's ``on_unavailable`` hook decides: the run declares the outage at once and probes
  with backoff until Catena answers (return: probe again) or max_retry_seconds pass (raise).
- A 408, 429 or another 5xx: Catena is up but this read failed; retried under
  :data:`PROBE_POLICY`, and when that gives up the run ends, kind ``catena_unavailable``.

Not in a dry run: a dry run makes no request at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from target_catena_messages.catena.classify import (
    configuration_problem,
    is_configuration_failure,
    signals_outage,
)
from target_catena_messages.catena.client import CatenaClient, Failure
from target_catena_messages.catena.retry import GiveUp, RetryPolicy
from target_catena_messages.errors import FatalError, FatalKind, Interrupted

logger = logging.getLogger(__name__)

#: The probe's own retries for answers that say Catena is up but the read failed (429, 500).
PROBE_POLICY = RetryPolicy(
    max_retries=4,
    max_retry_seconds=60.0,
    base_seconds=1.0,
    cap_seconds=8.0,
    jitter=False,
    idempotent=True,
    count_throttled=True,
)

OnUnavailable = Callable[[Failure], None]
"""Called when the probe got no answer or a 502/503/504: return to probe again, raise to end."""


def preflight(
    client: CatenaClient,
    *,
    connection_id: str | None,
    on_unavailable: OnUnavailable,
    stop: threading.Event,
    policy: RetryPolicy = PROBE_POLICY,
) -> None:
    """Probe Catena until it answers properly; raise the run's fatal error otherwise.

    Args:
        client: The run's client (its token provider is warmed up as a side effect).
        connection_id: ``default_connection_id``, so the grant for it is proven too.
        on_unavailable: What to do while Catena is unavailable (see :data:`OnUnavailable`).
        stop: Set by a signal: probing ends (interrupted).
        policy: Retries for a 408, 429 or other 5xx answer.

    Raises:
        FatalError: ``configuration`` (the URL, a proxy or the credentials are wrong),
            ``catena_unavailable`` (from ``on_unavailable``, or the retries ran out) or
            ``interrupted``.
    """
    state = policy
    while True:
        if stop.is_set():
            raise Interrupted("interrupted by a signal")
        failure = client.probe(connection_id)  # CredentialsRefused is a FatalError already
        if failure is None:
            return
        if is_configuration_failure(failure.status, failure.api_error, read=True):
            raise FatalError(
                configuration_problem(
                    "GET", client.operations_url, failure.status, when="before any input was read"
                ),
                kind=FatalKind.CONFIGURATION,
            )
        if signals_outage(failure.status):
            on_unavailable(failure)
            continue
        step = state.increment(failure.kind, failure.status, failure.retry_after)
        if isinstance(step, GiveUp):
            raise FatalError(
                f"Catena kept failing the start-up probe of {client.operations_url}: "
                f"{failure.message}",
                kind=FatalKind.CATENA_UNAVAILABLE,
            )
        state = step
        logger.info("start-up probe: %s; probing again in %.1f s", failure.message, step.wait)
        stop.wait(step.wait)
