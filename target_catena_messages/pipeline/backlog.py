"""Records read but not yet resolved: the bound the reader waits on (backpressure).

The reader raises the count as it numbers records (:mod:`.prepare`); the recorder lowers it as
it settles them and wakes the reader. Both under the run lock, which this condition shares.
"""

from __future__ import annotations

import threading


class Backlog:
    """The unresolved-record count and the condition the reader waits on.

    Args:
        lock: The run lock (the count changes together with the checkpointer's numbering).
        limit: Most unresolved records before the reader waits (about two batches).
    """

    def __init__(self, lock: threading.RLock, limit: int) -> None:
        self.unresolved = 0  # written under ``lock`` only
        self.limit = limit
        self._changed = threading.Condition(lock)

    def settled(self, count: int) -> None:
        """``count`` records resolved (recorder thread): lower the count, wake the reader."""
        with self._changed:
            self.unresolved -= count
            self._changed.notify_all()

    def wait_for_room(self, timeout: float) -> bool:
        """Whether there is room now; if not, wait up to ``timeout`` for a change first."""
        with self._changed:
            if self.unresolved <= self.limit:
                return True
            self._changed.wait(timeout)
            return False

    def wait_until_empty(self, timeout: float) -> bool:
        """Whether every record read is resolved; if not, wait up to ``timeout`` first."""
        with self._changed:
            if self.unresolved == 0:
                return True
            self._changed.wait(timeout)
            return False
