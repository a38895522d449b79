"""The bench runs end to end on tiny inputs and writes its table (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("P1", "P2", "P3", "P4", "P5", "P6", "cap")


def test_bench_quick_runs_every_scenario_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    header = "| | measurement | ours | baseline (same run) | ratio | goal | met |"
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == header
    keys = [line.split("|")[1].strip() for line in table[2:]]
    assert set(keys) == set(ROWS), proc.stdout
    assert all("failed" not in line for line in table), proc.stdout
    text = out.read_text()
    assert header in text
    assert "## Machine" in text
    assert "python -m bench --quick" in text
    # the bench removes its scratch directory (generated inputs, ledgers) when done
    scratch = proc.stderr.split("scratch directory ", 1)[1].split()[0]
    assert not Path(scratch).exists()
