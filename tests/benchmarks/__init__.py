"""Benchmarks (not collected by pytest): ``nox -s bench`` or ``python -m tests.benchmarks``."""
