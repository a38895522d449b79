"""``python -m bench``: the one bench command (bench/run.py)."""

from __future__ import annotations

from bench.run import main

raise SystemExit(main())
