"""Where the target's time goes: cProfile on every thread of an in-process run.

py-spy is not available, so the target runs in this process under cProfile:
``TargetCatenaMessages(config=...)``, then what ``listen(file)`` does (``process_lines``, the final
drain, ``Run.finish``) on the stream P1 generates. The main thread (reading, preparing, claiming:
what P1 measures) gets one profiler; every thread the target starts (recorder, delivery lanes)
gets its own through ``threading.setprofile``, merged into one "other threads" view. Own time is
shown per package, with time spent blocked (locks, queues, sockets, sleeps) set apart as
"waiting", then the top functions. Imports and startup are outside the profile. cProfile counts
wall time per thread, so with many sending threads a blocking call's time includes waiting for
the GIL: read ``--send`` for where Python code runs, and P3's kernel CPU figures for how much.

    .venv/bin/python -m bench.profile_target [--records 100000] [--top 25] [--dump FILE.prof]
    .venv/bin/python -m bench.profile_target --send --records 5000   # P3's path, via the sandbox
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import SandboxProcess
from bench.streams import write_stream

FINISH_TIMEOUT = 120.0  # seconds for Run.finish() after the input: it must not hang the profiler
_BLOCKING = ("acquire", "'get' of '_queue", "recv_into", "sleep", "wait", "poll", "select")


def _area(filename: str, name: str) -> str:
    """A function's package, or ``waiting`` for a builtin that blocks."""
    if filename == "~" and any(marker in name for marker in _BLOCKING):
        return "waiting (locks, queues, sockets)"
    for marker in ("target_catena_messages", "singer_sdk", "msgspec", "sqlalchemy", "urllib3"):
        if f"/{marker}/" in filename:
            return marker
    if "site-packages" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if filename == "~" or "/lib/python3" in filename:
        return "stdlib / builtins"
    return "other (generated code: fastjsonschema)"


def by_area(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own time summed per package, largest first."""
    areas: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_cc, _nc, own, _cum, _callers) in raw.items():
        area = _area(filename, name)
        areas[area] = areas.get(area, 0.0) + own
    return sorted(areas.items(), key=lambda item: -item[1])


def _discard(value: dict[str, Any]) -> None:
    """Drop a STATE line."""


@contextmanager
def _thread_profilers() -> Iterator[list[cProfile.Profile]]:
    """A profiler for every thread started inside the block, switched on from within it."""
    profilers: list[cProfile.Profile] = []

    def start(*_args: object) -> None:
        profiler = cProfile.Profile()
        profilers.append(profiler)
        profiler.enable()  # replaces this hook for the calling thread

    threading.setprofile(start)
    try:
        yield profilers
    finally:
        threading.setprofile(None)


def profile(
    records: int, workdir: Path, settings: dict[str, Any]
) -> tuple[pstats.Stats, pstats.Stats | None, float]:
    """Run the target in-process over ``records`` generated records under cProfile.

    Returns the main thread's profile, the other threads' (None if there were none or the run
    did not finish), and the main thread's seconds until the input was read and drained.
    """
    from target_catena_messages.singer.target import TargetCatenaMessages  # noqa: PLC0415
    from target_catena_messages.tuning import tune_gc  # noqa: PLC0415

    class QuietTarget(TargetCatenaMessages):
        """STATE lines would mix with the report on stdout; the profile does not need them."""

        write_state = staticmethod(_discard)

    stream = write_stream(workdir / "profile.jsonl", records)
    config = {
        "ledger_url": f"sqlite:///{workdir / 'ledger.sqlite'}",
        "dead_letter_path": str(workdir / "dead-letters.jsonl"),
        **settings,
    }
    main = cProfile.Profile()
    with _thread_profilers() as others:
        target = QuietTarget(config=config)
        tune_gc()  # as the CLI does once the target is built
        with stream.open(encoding="utf-8") as source:
            started = time.perf_counter()
            main.enable()
            target.process_lines(source)
            target.drain_all(is_endofpipe=True)
            elapsed = time.perf_counter() - started
            finished = threading.Thread(target=target.run.finish, daemon=True)
            finished.start()
            finished.join(FINISH_TIMEOUT)
            main.disable()
    if finished.is_alive():
        sys.stderr.write(f"warning: Run.finish() did not return within {FINISH_TIMEOUT} s\n")
        return pstats.Stats(main), None, elapsed
    merged = None
    for profiler in others:
        merged = pstats.Stats(profiler) if merged is None else merged.add(profiler)
    return pstats.Stats(main), merged, elapsed


def _show(out: io.StringIO, title: str, stats: pstats.Stats, top: int) -> None:
    total = sum(own for _name, own in by_area(stats))
    out.write(f"\n== {title}: own time by package ({total:.2f} s) ==\n")
    for name, own in by_area(stats):
        out.write(f"  {100 * own / total:5.1f} %  {name}\n")
    for order in ("tottime", "cumulative"):
        out.write(f"\n{title}: top {top} by {order}\n")
        stats.stream = out  # type: ignore[attr-defined]
        stats.sort_stats(order).print_stats(top)


def main() -> int:
    """Profile and print the hot spots to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--send", action="store_true", help="send to a sandbox (0 ms) instead")
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency with --send")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dump", type=Path, help="also write the main thread's raw profile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="catena-profile-") as tmp:
        sandbox = SandboxProcess(Path(tmp) / "sandbox") if args.send else None
        try:
            if sandbox is not None:
                sandbox.latency(0)
                settings = sandbox.target_settings(max_concurrency=args.concurrency)
            else:
                settings = {"dry_run": True}
            main_stats, other_stats, elapsed = profile(args.records, Path(tmp), settings)
        finally:
            if sandbox is not None:
                sandbox.close()
    if args.dump:
        main_stats.dump_stats(str(args.dump))
    out = io.StringIO()
    mode = "sending to the sandbox" if args.send else "dry_run"
    out.write(f"{args.records:,} records, {mode}: input read and drained in {elapsed:.2f} s ")
    out.write(f"under cProfile ({args.records / elapsed:,.0f}/s; profiling slows it down)\n")
    _show(out, "main thread", main_stats, args.top)
    if other_stats is not None:
        _show(out, "other threads", other_stats, args.top)
    sys.stdout.write(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
