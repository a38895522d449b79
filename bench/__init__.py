"""The benchmark suite: ``python -m bench`` (see bench/run.py). Benchmarks, not tests."""
