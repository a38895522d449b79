"""Process-wide tuning the CLI applies once: the cyclic garbage collector and glibc's allocator.

Both change the whole process, so only the CLI calls them, never the target class itself: a
program that embeds the target (a test, an orchestrator) keeps its own settings. Also the
hidden outage tunables (not settings: read from the environment, so tests can shorten them).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform

__all__ = ["outage_probe_cap_seconds", "outage_quiet_seconds", "tune_gc", "tune_malloc"]

logger = logging.getLogger(__name__)

# Young-generation size for the cyclic GC during a run (CPython's default is 700): every record
# allocates a few containers, and at 700 the collector ran ~10 times per 1,000-record batch.
_GC_GEN0_THRESHOLD = 20_000

# glibc's mallopt(3) parameters (malloc.h), the values set, and the variables that override them.
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
_MALLOPTS = (
    (_M_MMAP_THRESHOLD, 128 * 1024, "MALLOC_MMAP_THRESHOLD_"),  # glibc's own starting value
    (_M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"),
)


def outage_quiet_seconds() -> float:
    """How long nothing must have answered before a probe may declare Catena unavailable.

    About 10 s: long enough that a burst of failed requests between two answers is not an
    outage, short enough that messages do not use up their retries first. Hidden (not a
    setting): ``CATENA_OUTAGE_QUIET_SECONDS`` lets tests use a second or two.
    """
    return _seconds("CATENA_OUTAGE_QUIET_SECONDS", 10.0)


def outage_probe_cap_seconds() -> float:
    """The longest wait between two probes while Catena is down (30 s; tests shorten it)."""
    return _seconds("CATENA_OUTAGE_PROBE_CAP_SECONDS", 30.0)


def _seconds(variable: str, default: float) -> float:
    try:
        value = float(os.environ.get(variable, default))
    except ValueError:
        return default
    return value if value >= 0 else default


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a run of many short-lived records.

    Freezing moves everything alive after startup (singer-sdk, SQLAlchemy, jsonschema: several
    hundred thousand objects) out of the collector's reach, so full collections stop walking
    them for every few thousand records (a third of the CPU of a dry run before this). Records
    free themselves by reference counting; the collector only finds cycles, and a run makes few.
    No collection first: it would cost more startup time than the little garbage it could free.
    """
    gc.freeze()
    gc.set_threshold(_GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def tune_malloc() -> bool:
    """Keep glibc's heap from growing with connection faults: pin the mmap threshold, two arenas.

    glibc raises its mmap threshold each time a large block it had mmapped is freed (up to
    32 MiB). After the first page of an operation lookup (up to 1,000 operations, several hundred
    KB of JSON) is freed, every later page is carved out of a thread's heap arena instead, and
    the holes those pages leave are kept. Under connection faults every ambiguous send reads such
    pages, so RSS crept by ~5 MiB per 100k records; setting the threshold turns the adjustment
    off. glibc also gives threads arenas of their own (up to 8 per core); the sending threads
    allocate under the GIL, so they gain nothing from them but the memory. Measured on the
    soak's 200k records with faults: peak RSS 170 MiB and growing; 113 MiB with the threshold;
    102 MiB and flat with both (docs/reliability.md, "Soak"). Must run before the threads start.
    A value the user set through glibc's environment variables wins; other C libraries are left
    alone.

    Returns:
        Whether anything was set.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no symbol table to search, or no mallopt in it
        return False
    done = False
    for parameter, value, variable in _MALLOPTS:
        if variable not in os.environ:
            done |= bool(mallopt(parameter, value))
    logger.debug("glibc malloc tuned: %s", done)
    return done
