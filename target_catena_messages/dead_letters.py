"""The dead-letter file: records that were not delivered, one JSON object a line.

A dead letter is the only place a record that was not sent survives, so the file is appended
(never rewritten), created 0600 (records are driver messages, possibly personal data) and fsynced
before any STATE that covers its lines: once the tap's bookmark moves past a record, this file
is the record. Lines are buffered between flushes because a bad batch can dead-letter thousands
of records and one fsync per line would stall delivery.

Secrets are scrubbed from every line as defense in depth: nothing upstream should put a client
secret or token into an error message, but if something does, it must not land on disk.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.outcome import Stage

logger = logging.getLogger(__name__)

STAGES: frozenset[str] = frozenset(stage.value for stage in Stage)
"""Where in the pipeline a record was given up on (the ``stage`` field): :class:`Stage`'s values."""

_MASK = "***"
_MIN_SECRET_LENGTH = 4
_AUTO_WRITE_BYTES = 1 << 20


class DeadLetterWriter:
    """Appends dead letters to one JSON Lines file; safe to share between sink threads.

    Args:
        path: The file. Parent directories and the file appear only with the first dead letter.
        run_id: Written into every line so a re-drive can tell runs apart.
        secrets: Strings that must never appear in the file (client secret, access token).
            Strings shorter than 4 characters are ignored: masking them would mangle ordinary
            text and they could not be secret anyway.
    """

    def __init__(self, path: Path, run_id: str, *, secrets: Sequence[str] = ()) -> None:
        self._path = Path(path)
        self._run_id = run_id
        # Longest first, so a secret containing another one is masked whole.
        self._secrets = sorted(
            {s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True
        )
        self._fd: int | None = None
        self._buffer: list[bytes] = []
        self._buffered_bytes = 0
        self._unsynced = False  # bytes written since the last fsync
        self._count = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Dead letters written by this writer (buffered or on disk)."""
        return self._count

    @property
    def path(self) -> Path:
        """The dead-letter file, as configured."""
        return self._path

    def write(
        self,
        *,
        stream: str,
        key: str,
        stage: str,
        errors: Sequence[Mapping[str, Any]],
        status: int | None,
        api_error: Any,
        operation_id: str | None,
        attempts: int,
        retryable: bool,
        record: Mapping[str, Any],
    ) -> None:
        """Add one dead letter; it is durable only after the next :meth:`flush`.

        Raises:
            ValueError: Unknown stage, or the writer is closed (both are bugs upstream).
            OSError: The file cannot be created or written; the run must stop rather than lose
                the record.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown dead-letter stage {stage!r}")
        letter = {
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "run_id": self._run_id,
            "stream": stream,
            "key": key,
            "stage": stage,
            "errors": [
                {"field": _field_name(e.get("field")), "message": str(e.get("message", ""))}
                for e in errors
            ],
            "status": status,
            "api_error": api_error,
            "operation_id": operation_id,
            "attempts": attempts,
            "retryable": retryable,
            "record": record,
        }
        line = self._encode(letter)
        with self._lock:
            if self._closed:
                raise ValueError("dead-letter writer is closed")
            if self._fd is None:
                self._fd = _open_private(self._path)
            self._buffer.append(line)
            self._buffered_bytes += len(line)
            self._count += 1
            if self._buffered_bytes >= _AUTO_WRITE_BYTES:
                self._write_buffer()

    def flush(self) -> None:
        """Write buffered lines and fsync: call before writing any STATE that covers them."""
        with self._lock:
            if self._fd is None or not (self._buffer or self._unsynced):
                return
            self._write_buffer()
            os.fsync(self._fd)
            self._unsynced = False

    def close(self) -> None:
        """Flush and close; later writes raise. Closing twice is harmless."""
        with self._lock:
            if self._fd is not None:
                self._write_buffer()
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            self._closed = True

    def __enter__(self) -> DeadLetterWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _encode(self, letter: dict[str, Any]) -> bytes:
        """One JSON line, secrets masked in the text (keys, values, escaped forms alike).

        Masking the encoded text instead of walking the data keeps no recursion of our own: a
        record nested hundreds of levels deep must still become a dead letter, not a crash.
        """
        try:
            text = jsonutil.dumps_lenient(letter)
        except RecursionError:
            record = letter["record"]
            letter["record"] = {
                "_not_stored": "the record is nested too deeply to encode; see the source row",
                "_fields": sorted(map(str, record)) if isinstance(record, Mapping) else None,
            }
            text = jsonutil.dumps_lenient(letter)
        for secret in self._secrets:
            # A secret spelled with JSON escapes is masked too; masking may then break the
            # line's JSON, which beats leaking.
            for form in (secret, jsonutil.dumps(secret)[1:-1]):
                if form in text:
                    text = text.replace(form, _MASK)
        return (text + "\n").encode()

    def _write_buffer(self) -> None:
        if self._fd is None or not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered_bytes = 0
        view = memoryview(data)
        self._unsynced = True
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


def read_dead_letters(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the dead letters of a file, oldest first, for a re-drive.

    Numbers are read as ``Decimal`` (as singer-sdk reads input) so a re-driven record builds the
    same body. Blank lines are skipped.

    Raises:
        ValueError: A line is not a JSON object; the message names the file and line number.
            Skipping it silently would lose a driver message.
    """
    with Path(path).open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                letter = json.loads(raw, parse_float=Decimal)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(letter, dict):
                # Bad file content, not a caller passing a wrong type: ValueError is right.
                raise ValueError(f"{path}:{number}: not a JSON object")  # noqa: TRY004
            yield letter


def _field_name(field: Any) -> str | None:
    return None if field is None else str(field)


def _open_private(path: Path) -> int:
    """Open ``path`` for appending, created 0600; tighten a pre-existing file to 0600."""
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            logger.warning("dead-letter file %s had mode %o; changed to 600", path, mode)
    except OSError:
        os.close(fd)
        raise
    if created:
        _fsync_directory(path.parent)
    return fd


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable; not possible on every platform."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
