"""torch alone: ``python -m tests.benchmarks attention_torch`` (the cases are in ``bench_attention``)."""

from __future__ import annotations

from .bench_attention import run_torch as run

__all__ = ["run"]
