"""The benchmark suite of issue 9: ``python -m bench`` (see bench/run.py). Benchmarks, not tests."""
