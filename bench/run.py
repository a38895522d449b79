"""The one bench command: run P1-P6 and the sandbox capacity, print the table, write results.md.

    .venv/bin/python -m bench                 # full sizes, ~10 minutes on 2 cores
    .venv/bin/python -m bench --quick         # tiny sizes: proves it runs, measures nothing
    .venv/bin/python -m bench --only P1 P4    # a subset

Every figure is a ratio to a baseline measured in the same run (see scenarios.py), because on a
shared 2-core machine absolute numbers move with whatever else runs. results.md also records the
machine and its load, so a reader can tell a quiet run from a noisy one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # ``python bench/run.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import QUICK, Bench, Row, Sizes
from bench.procs import ROOT, SandboxProcess
from bench.scenarios import SCENARIOS

DEFAULT_OUT = Path(__file__).resolve().parent / "results.md"
PACKAGES = (
    "singer-sdk",
    "requests",
    "urllib3",
    "msgspec",
    "fastjsonschema",
    "aiohttp",
    "SQLAlchemy",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run only these")
    parser.add_argument("--records", type=int, help="P1 stream size (default 100,000)")
    parser.add_argument("--big", type=int, help="P4 large dry_run size (default 1,000,000)")
    parser.add_argument("--sandbox-records", type=int, help="P4 size through the sandbox")
    parser.add_argument("--p5-seconds", type=float, help="P5 duration (default 40)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    changes: dict[str, object] = {}
    if args.records:
        changes["p1_records"] = args.records
    if args.big:
        changes["p4_big"] = args.big
    if args.sandbox_records:
        changes["p4_sandbox"] = args.sandbox_records
    if args.p5_seconds:
        changes["p5_seconds"] = args.p5_seconds
    return dataclasses.replace(sizes, **changes)  # type: ignore[arg-type]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _git(*args: str) -> str:
    """Output of a read-only git command in the repository (never touches the index)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    done = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, env=env
    )
    return done.stdout.strip()


def _commit() -> str:
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts() -> list[str]:
    """What the numbers were measured on, one markdown bullet each."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return [
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores; memory {_memory_gib()}",
        f"OS: {platform.platform()}",
        f"Python {platform.python_version()} ({platform.python_implementation()}); "
        + ", ".join(versions),
        f"code: commit {_commit()}",
    ]


def table(rows: list[Row]) -> str:
    """The results as one markdown table."""
    lines = [
        "| | measurement | ours | baseline (same run) | ratio | goal | met |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for row in rows:
        cells = (row.key, row.what, row.figure, row.baseline, row.ratio, row.goal, row.verdict)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(
    rows: list[Row], failures: list[str], command: str, facts: list[str], timing: dict[str, str]
) -> str:
    """The whole results.md."""
    failed = ["", "## Failures", ""] + [f"```\n{text}\n```" for text in failures]
    return "\n".join(
        [
            "# Benchmark results",
            "",
            f"Command: `{command}`  ",
            f"Run: {timing['started']}, {timing['elapsed']}; "
            f"load average (1/5/15 min) {timing['load_before']} before, "
            f"{timing['load_after']} after.",
            "",
            "## Machine",
            "",
            *[f"- {fact}" for fact in facts],
            "",
            "## Results",
            "",
            *(
                [
                    "`--quick`: inputs too small to measure; it only shows that the bench runs.",
                    "",
                ]
                if timing.get("quick")
                else []
            ),
            table(rows),
            "",
            "## How to read it",
            "",
            "- Every ratio divides by a baseline measured in this same run, on this machine.",
            "- Processes: the target is the real CLI in a subprocess reading a generated file; "
            "the sandbox is `catena-sandbox` in its own process; CPU time and peak RSS come from "
            "the kernel (`wait4` rusage) for the measured process alone.",
            "- P1/P3 subtract startup (the same program on an empty stream), so rates and CPU "
            "per message are steady-state figures. P1's ratio cell also gives the ratio of CPU "
            "seconds, which moves less than wall time when other work shares the machine.",
            "- Rows with goal `-` explain a judged row: the SDK's floor bounds what any "
            "singer-sdk target can reach in P1; the bare loops show what the HTTP stack, the "
            "sandbox and the machine allow in P2/P3: urllib3 threads (the target's transport, "
            "P3's judged baseline), aiohttp tasks on one event loop (the alternative HTTP stack "
            "worth measuring) and requests threads (the target's earlier stack).",
            "- P2/P3/P5/P6 rates come from the sandbox's own arrival timestamps, identically for "
            "the target and the bare loop: P2 `n / (last - first + 50 ms)`, which equals "
            "`max_concurrency / 50 ms` for an ideal sender.",
            "- P6: recovery is the time from the storm's last 429 to the end of the first "
            "second (sliding, on the sandbox's clock) that carries 0.8 of the accepted rate "
            "before the storm, in the same run; its ratio is the rate from then on. One in N: "
            "the shared 1 s pauses let N - 1 of every N through per (1 s + N requests at the "
            "target's unthrottled rate, measured just before on the same stream).",
            "- `cap`: in each run at 0 ms the sandbox serves at most as many requests per "
            "second as it handles per CPU-second in that run; ceiling ÷ rate = 1 ÷ the share "
            "of a core it was busy. Judged: the busiest of P3's judged runs. The bare aiohttp "
            "loop is shown unjudged: there client and sandbox each take one of the two cores.",
            "- P1's and P3's judged pairs (no-op SDK target and ours; ours and the bare urllib3 "
            "loop) run three times, interleaved; their ratios are the medians of the pairs' "
            "ratios, with their range: single pairs moved by 25 % as the machine's speed swung.",
            *(failed if failures else []),
        ]
    )


def _run_all(bench: Bench, names: list[str]) -> tuple[list[Row], list[str]]:
    """Every scenario; one that fails becomes a ``failed`` row and its error text, not an end."""
    rows: list[Row] = []
    failures: list[str] = []
    for name in names:
        try:
            rows.extend(SCENARIOS[name](bench))
        except Exception as exc:  # noqa: BLE001 - a failed scenario must not stop the others
            bench.log(traceback.format_exc())
            text = str(exc) or type(exc).__name__
            rows.append(Row(name, "failed", text.splitlines()[0][:100], "-", "-", "-", False))
            lines = text.splitlines()
            detail = [line for line in lines[1:] if not line.startswith('{"summary"')][:6]
            failures.append("\n".join(line[:200] for line in [f"{name}: {lines[0]}", *detail]))
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    """Run, print the table on stdout, write ``--out``; 1 when a scenario could not run."""
    args = _parser().parse_args(argv)
    sizes = _sizes(args)
    names = args.only or list(SCENARIOS)
    command = " ".join([".venv/bin/python -m bench", *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    timing = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": _load(),
        "quick": "yes" if args.quick else "",
    }

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    work = Path(tempfile.mkdtemp(prefix="catena-bench-"))
    log(f"scratch directory {work}")
    sandbox = SandboxProcess(work / "sandbox")
    try:
        rows, failures = _run_all(Bench(sizes, work, sandbox, log), names)
    finally:
        sandbox.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    timing["elapsed"] = f"{time.monotonic() - started:.0f} s"
    timing["load_after"] = _load()
    text = report(rows, failures, command, machine_facts(), timing)
    args.out.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(table(rows) + "\n")
    log(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
