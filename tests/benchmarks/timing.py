"""Side-by-side timing and peak-memory helpers shared by the framework benchmarks.

The machine is shared and noisy, so cases are measured interleaved (round-robin, repeated) and
reported as ratios of medians taken in the same run, never as absolute targets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Returns the median seconds of each case, running the cases round-robin ``repeats`` times."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def rss() -> int:
    """Returns the resident memory of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def row(framework: str, model: str, case: str, batch: int, seconds: float, baseline: str, base_seconds: float) -> dict:
    return {
        "framework": framework,
        "model": model,
        "case": case,
        "batch": batch,
        "ms": seconds * 1e3,
        "ratio": seconds / base_seconds,
        "baseline": baseline,
    }
