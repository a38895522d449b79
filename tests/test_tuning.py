"""The CLI's allocator tuning: large freed buffers go back to the system; threads share arenas."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc only"
)

# In a fresh interpreter: free one 1 MiB buffer, then count the blocks glibc mmaps for a second
# one (untuned, glibc has raised its threshold past 1 MiB by then, so the second comes from the
# heap: 0). Then let 6 threads allocate at once and count the arenas glibc's malloc_stats lists.
_PROBE = """
import ctypes, json, sys, threading
from target_catena_messages.tuning import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
tuned = tune_malloc() if sys.argv[1] == "tune" else None
first = bytearray(1 << 20)
del first
before = libc.mallinfo2().hblks
second = bytearray(1 << 20)
mmapped = libc.mallinfo2().hblks - before
barrier = threading.Barrier(6)
def allocate():
    barrier.wait()
    libc.malloc(64)
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"tuned": tuned, "mmapped": mmapped}), flush=True)
libc.malloc_stats()
"""


def _probe(mode: str, **env: str) -> tuple[dict[str, object], int]:
    """The probe's findings and the number of arenas glibc reported."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
    )
    arenas = sum(line.startswith("Arena ") for line in out.stderr.splitlines())
    return dict(json.loads(out.stdout)), arenas


def test_untuned_glibc_moves_large_buffers_into_its_heap_and_gives_threads_arenas() -> None:
    findings, arenas = _probe("plain")
    assert findings == {"tuned": None, "mmapped": 0}
    assert arenas > 2


def test_tune_malloc_keeps_large_buffers_mmapped_and_two_arenas() -> None:
    findings, arenas = _probe("tune")
    assert findings == {"tuned": True, "mmapped": 1}
    assert arenas == 2


def test_tune_malloc_leaves_what_the_user_set() -> None:
    findings, arenas = _probe("tune", MALLOC_MMAP_THRESHOLD_="4194304", MALLOC_ARENA_MAX="3")
    assert findings == {"tuned": False, "mmapped": 0}
    assert arenas == 3
