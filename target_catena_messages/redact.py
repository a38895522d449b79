"""Keep secrets out of every log line, whatever library wrote it.

The code never logs a secret on purpose; this is the net under that rule. A filter on every
handler replaces any known secret (the client secret, a configured token, every token issued during
the run) with ``***`` in the formatted message and in exception text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

MASK = "***"
_MIN_LENGTH = 4  # shorter strings would mask innocent text and protect nothing


class Redactor(logging.Filter):
    """A growing set of secrets, and the logging filter that masks them."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        """Mask this value from now on (tokens are added as they are issued)."""
        if not secret or len(secret) < _MIN_LENGTH or secret in self._secrets:
            return
        with self._lock:
            # Longest first, so a secret containing another is masked whole.
            self._secrets = tuple(sorted({*self._secrets, secret}, key=len, reverse=True))

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values masked so far."""
        return self._secrets

    def scrub(self, text: str) -> str:
        """Return ``text`` with every secret masked."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask secrets in the message, its arguments and any exception text."""
        if not self._secrets:
            return True
        message = record.getMessage()
        scrubbed = self.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True

    def install(self) -> None:
        """Attach to every handler known now (root's and any logger's own)."""
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for item in loggers:
            if isinstance(item, logging.Logger):
                for handler in item.handlers:
                    if self not in handler.filters:
                        handler.addFilter(self)
