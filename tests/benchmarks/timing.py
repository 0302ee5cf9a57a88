"""Side-by-side timing, peak-memory and phase helpers shared by the framework benchmarks.

The machine is shared and noisy, so cases are measured interleaved (round-robin, repeated) and
reported as ratios of medians taken in the same run, never as absolute targets.
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


class DeviceUnavailable(RuntimeError):
    """The device asked for (``--device cuda``) is not there for this framework."""


def clock() -> Callable[[], float]:
    """The benchmarks' clock: wall time, or with ``ANYCAM_BENCH_CLOCK=cpu`` (``--clock cpu``) the
    CPU time of the whole process, which a machine shared with other jobs barely disturbs (a
    descheduled process accrues no CPU time) but which counts every thread's work."""
    return time.process_time if os.environ.get("ANYCAM_BENCH_CLOCK") == "cpu" else time.perf_counter


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Returns the median seconds of each case, running the cases round-robin ``repeats`` times."""
    now = clock()
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = now()
            fn()
            samples[name].append(now() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def rss() -> int:
    """Returns the resident memory of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    assert found is not None
    return int(found.group(1)) * 1024


def peak_of(call: Callable[[], object], warmup: Callable[[], object] | None = None) -> int:
    """Returns the peak resident memory (bytes) one call adds to the process, after a warm-up call.

    The warm-up call traces, compiles and initialises what a repeated call does not pay again;
    then the kernel's high-water mark is reset (``/proc/self/clear_refs``) and the call's peak
    above the memory resident before it is what is reported. The warm-up is the call itself
    unless ``warmup`` is given: a framework whose allocator keeps its blocks (TensorFlow) warms
    up on one sample instead, or the measured call would reuse the warm-up's memory and seem
    to need none.
    """
    (warmup or call)()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux ≥ 4.0)
    before = rss()
    call()
    return _high_water_mark() - before


# Large blocks straight from and back to the kernel, so freed memory leaves the resident set
# and "resident before the call" is what the process really holds (glibc would otherwise
# raise its mmap threshold after the first large free and keep such blocks in its heap).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_in_subprocess(module: str, case: str, args: Sequence[Any] = (), repeats: int = 3) -> int:
    """Median over fresh interpreters of one case's :func:`peak_of`, printed by ``module.memory_case``.

    Fresh interpreters, so other cases' allocator caches cannot hide a case's peak; the median,
    because a single run is occasionally far off (seen here: a plain forward once peaked ~8× its
    usual value).
    """
    call = f"memory_case({case!r}, {', '.join(map(repr, args))})"
    code = f"from tests.benchmarks.{module} import memory_case; print({call})"
    env = {**os.environ, **_MALLOC_ENV}
    peaks = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory case {module}:{case} failed:\n{done.stderr[-2000:]}")
        peaks.append(int(done.stdout.strip().splitlines()[-1]))
    return int(statistics.median(peaks))


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


def memory_row(framework: str, model: str, label: str, batch: int, peak: int, base_label: str, base: int) -> dict:
    return {
        "framework": framework,
        "model": model,
        "case": f"peak memory, {label}",
        "batch": batch,
        "ms": None,
        "mb": peak / 2**20,
        "ratio": peak / base,
        "baseline": base_label,
    }


def phase_rows(
    framework: str,
    model: str,
    batch: int,
    *,
    forward: Callable[[], object],
    explainer: Any,
    inputs: Any,
    copier: Callable[[Sequence[tuple[int, ...]]], Callable[[], object]],
    repeats: int,
) -> list[dict]:
    """Where the time of one Grad-CAM call goes, each phase as a share of the whole call.

    Measured with public entry points only, interleaved: a plain forward; a capture without
    gradients (the forward with the layer tapped, plus copying the activations to NumPy); a
    full capture (plus the scores' gradients and copying them); the whole call (plus the core).
    The device→host copy is timed on its own, on device arrays of the captured shapes, with
    ``copier(shapes)``; on a CPU it is the cost of handing the arrays to NumPy.
    """
    from anycam.core import parse_target

    spec = parse_target(None)
    activations = explainer.backend.capture(inputs, spec, gradients=False).activations
    full = explainer.backend.capture(inputs, spec)
    acts_shapes = [a.shape for a in activations]
    grad_shapes = [g.shape for g in full.gradients]
    cases = {
        "forward": forward,
        "tapped": lambda: explainer.backend.capture(inputs, spec, gradients=False),
        "capture": lambda: explainer.backend.capture(inputs, spec),
        "call": lambda: explainer(inputs),
        "copy activations": copier(acts_shapes),
        "copy gradients": copier(grad_shapes),
    }
    t = interleaved(cases, repeats)
    copies = t["copy activations"] + t["copy gradients"]
    phases = {
        "plain forward": t["forward"],
        "tapping the layer (hook/intercept, grad mode)": t["tapped"] - t["copy activations"] - t["forward"],
        "gradients of the scores (autograd to the layer)": t["capture"] - t["tapped"] - t["copy gradients"],
        "device→host copy of activations and gradients": copies,
        "core (weights, map, upsample, normalise)": t["call"] - t["capture"],
    }
    return [
        row(framework, model, f"phase: {name}", batch, seconds, "whole Grad-CAM call", t["call"])
        for name, seconds in phases.items()
    ]
