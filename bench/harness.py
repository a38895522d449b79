"""What every measurement shares: sizes, result rows, and one way to run each measured program.

The target, the no-op SDK targets and the bare client loop all run through ``Bench`` so they are
started, timed, bounded and checked identically; a program that fails or hangs fails its row with
the end of its stderr rather than producing a number.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import streams
from bench.procs import ChildRun, SandboxProcess, parse_at, run_child, target_cmd, write_config

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; ``QUICK`` only proves the bench runs."""

    p1_records: int = 100_000
    p1_repeats: int = 3  # interleaved (no-op, ours) pairs; the ratios are medians
    p2: tuple[tuple[int, int], ...] = ((8, 2000), (32, 4000))  # (concurrency, messages)
    p3_messages: int = 5000
    p3_concurrency: int = 8
    p3_repeats: int = 3  # interleaved (ours, bare urllib3) pairs; the ratios are medians
    p4_big: int = 1_000_000
    p4_sandbox: int = 100_000
    p4_concurrency: int = 32
    p5_seconds: float = 40.0
    p5_warmup: float = 10.0
    p6_storm: tuple[int, int, int] = (1000, 60, 3000)  # (first refused request, 429s, messages)
    p6_one_in: tuple[int, int] = (23, 400)  # (one request in N refused, messages)


QUICK = Sizes(
    p1_records=2000,
    p1_repeats=1,
    p2=((8, 80), (32, 160)),
    p3_messages=200,
    p3_repeats=1,
    p4_big=6000,
    p4_sandbox=1000,
    p5_seconds=3.0,
    p5_warmup=1.0,
    p6_storm=(100, 16, 300),
    p6_one_in=(23, 60),
)


@dataclass(frozen=True)
class Row:
    """One line of the results table; ``met`` is None for a figure that explains, not judges."""

    key: str
    what: str
    figure: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None

    @property
    def verdict(self) -> str:
        """``yes``/``no``, or ``-`` for a figure with no goal."""
        return "-" if self.met is None else ("yes" if self.met else "**no**")


@dataclass
class Bench:
    """One bench run: sizes, a scratch directory, the sandbox, and runs other rows reuse."""

    sizes: Sizes
    work: Path
    sandbox: SandboxProcess
    log: Callable[[str], None]
    runs: dict[str, ChildRun] = field(default_factory=dict)
    facts: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0  # the sandbox latency the current scenario's bare loops run at

    def _dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stream(self, name: str, records: int, drivers: int = 1000) -> Path:
        """A generated input in the scratch directory (written once per name)."""
        path = self.work / f"{name}.jsonl"
        if not path.exists():
            streams.write_stream(path, records, drivers=drivers)
        return path

    def _child(self, name: str, cmd: list[str], workdir: Path, timeout: float) -> ChildRun:
        if name in self.runs:
            return self.runs[name]
        started = time.perf_counter()
        result = run_child(cmd, workdir=workdir, timeout=timeout).check(name)
        self.log(f"  {name}: {time.perf_counter() - started:.1f} s")
        self.runs[name] = result
        return result

    def target(self, name: str, input_path: Path, records: int, **settings: Any) -> ChildRun:
        """Run the real target CLI on ``input_path`` (once per name); it must exit 0 in time.

        The time allowed is generous (5,000 records/s dry, 200/s sending, plus a minute): it only
        exists so that a hung run fails its row instead of hanging the bench.
        """
        workdir = self._dir(name)
        config = write_config(workdir, settings)
        timeout = 60 + records / (5000 if settings.get("dry_run") else 200)
        return self._child(name, target_cmd(config, input_path), workdir, timeout)

    def noop(self, name: str, input_path: Path, records: int, *, floor: bool = False) -> ChildRun:
        """Run the no-op SDK target on ``input_path``: SDK defaults, or the SDK's floor.

        The floor is the same target with singer-sdk's msgspec reader and ``validate_records``
        off: the least any singer-sdk target can spend per record.
        """
        workdir = self._dir(name)
        config = workdir / "config.json"
        config.write_text(json.dumps({"validate_records": False} if floor else {}))
        cmd = [sys.executable, str(BENCH / "noop_target.py")]
        cmd += ["--floor"] if floor else []
        cmd += ["--config", str(config), "--input", str(input_path)]
        return self._child(name, cmd, workdir, 60 + records / 1000)

    def bare(
        self, name: str, bodies: list[dict[str, Any]], concurrency: int, stack: str = "urllib3"
    ) -> ChildRun:
        """Run a bare client loop posting ``bodies``: threads on urllib3 or requests, or aiohttp."""
        workdir = self._dir(name)
        path = workdir / "bodies.json"
        path.write_text(json.dumps(bodies), encoding="utf-8")
        script = BENCH / ("aio_client.py" if stack == "aiohttp" else "bare_client.py")
        cmd = [sys.executable, str(script), "--url", self.sandbox.url]
        cmd += ["--bodies", str(path), "--concurrency", str(concurrency)]
        cmd += [] if stack == "aiohttp" else ["--stack", stack]
        return self._child(name, cmd, workdir, 60 + len(bodies) / 200)

    def arrivals(self, expected: int) -> list[float]:
        """Arrival times of the create-message requests since the last reset, all 202."""
        received = self.sandbox.received()
        statuses = {entry.get("status") for entry in received}
        if len(received) != expected or statuses != {202}:
            raise RuntimeError(f"expected {expected} accepted, got {len(received)} {statuses}")
        return sorted(parse_at(entry["at"]) for entry in received)
