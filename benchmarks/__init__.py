"""Benchmarks and reports run with ``python -m benchmarks.<name>`` (not tests)."""
