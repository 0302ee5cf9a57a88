"""The dataset runner in-process vs anycam.ray.BatchExplainer on Ray Data with 1 and 2 actors.

One thread per worker (the in-process runner too), the shipped demo CNN (torch), Grad-CAM at
``stage3``. A Ray run first starts its actors (a process each, importing torch, building the
model: seconds, and noisy), which says nothing about throughput, so throughput is measured at
steady state: every batch records when its explanation started and ended (wall clock, one
machine), each worker's rate is its images over the span from its first start to its last end
(Ray's gaps between batches included), and a run's rate is the sum over its workers. The
in-process runner is timed the same way, in a fresh process with the actors' environment
(``OMP_NUM_THREADS=1``, torch set to one thread). Cases run interleaved, medians of the rates
are compared, against a local ``ray.init(num_cpus=2)``; the start-up cost is reported apart.
Memory: the peak RSS of each actor process and of the in-process runner's process.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LAYER = "stage3"
BATCH = 128


def demo_factory():  # type: ignore[no-untyped-def]
    """The demo CNN, one intra-op thread (module-level so Ray actors can import it)."""
    import torch
    from anycam.backends.torch.demo import build_demo_model

    from anycam.demo.data import load_demo

    torch.set_num_threads(1)
    return build_demo_model(load_demo()["weights"])


def _images(count: int) -> np.ndarray:
    from anycam.demo.data import load_demo

    images = load_demo()["images"]
    return np.ascontiguousarray(np.resize(images, (count, *images.shape[1:])))


class _Measured:
    """BatchExplainer plus each batch's process id and peak RSS (imported lazily: ray is optional)."""

    def __init__(self, **kwargs: object) -> None:
        from anycam.ray import BatchExplainer

        self.inner = BatchExplainer(**kwargs)  # type: ignore[arg-type]

    def __call__(self, batch: dict) -> dict:
        started = time.time()
        out = self.inner(batch)
        size = len(out["id"])
        out["pid"] = np.full(size, os.getpid())
        out["peak_rss"] = np.full(size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        out["started"] = np.full(size, started)
        out["ended"] = np.full(size, time.time())
        return out


def _rate(records: list[tuple[int, float, float, int]]) -> float:
    """Σ over workers of images / (last end − first start), from (worker, start, end, images)."""
    total = 0.0
    for worker in {r[0] for r in records}:
        mine = [r for r in records if r[0] == worker]
        span = max(r[2] for r in mine) - min(r[1] for r in mine)
        total += sum(r[3] for r in mine) / span
    return total


_IN_PROCESS = textwrap.dedent(
    """
    import resource, time, numpy as np, anycam
    from tests.benchmarks.bench_ray import BATCH, LAYER, _images, _rate, demo_factory
    x = _images({count})
    explainer = anycam.Explainer(demo_factory(), LAYER)
    stream = [{{"image": x[s : s + BATCH], "id": np.arange(s, s + BATCH)}} for s in range(0, len(x), BATCH)]
    records = []
    started = time.time()
    for result in anycam.explain_dataset(explainer, stream, fields=("heatmap", "target", "scores"), progress=False):
        records.append((0, started, time.time(), len(result["id"])))  # the generator explains when asked
        started = time.time()
    print(_rate(records), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


def run(quick: bool = False) -> list[dict]:
    import ray

    count = 256 if quick else 4096
    repeats = 1 if quick else 3
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
    )
    try:
        x = _images(count)
        rows = [{"id": i, "image": x[i]} for i in range(count)]
        # one block per batch: Ray Data hands blocks to actors, so one big block would feed one actor
        dataset = ray.data.from_items(rows, override_num_blocks=count // BATCH).materialize()
        peaks: dict[int, dict[int, int]] = {1: {}, 2: {}}
        startup: dict[str, list[float]] = {"ray 1": [], "ray 2": []}
        in_process_peaks: list[int] = []

        def in_process() -> float:
            # A fresh process with the actors' environment (OMP_NUM_THREADS=1 also pins NumPy's
            # BLAS to one thread), so that both sides run one thread; the rate is measured inside.
            rate, peak = subprocess.run(
                [sys.executable, "-c", _IN_PROCESS.format(count=count)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-2:]
            in_process_peaks.append(int(peak))
            return float(rate)

        def on_ray(actors: int) -> float:
            began = time.time()
            out = dataset.map_batches(
                _Measured,
                fn_constructor_kwargs={"model_factory": demo_factory, "layer": LAYER},
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
                batch_size=BATCH,
                batch_format="numpy",
            )
            records = []
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                for pid, peak, start, end in zip(
                    *(batch[k].tolist() for k in ("pid", "peak_rss", "started", "ended")), strict=True
                ):
                    peaks[actors][pid] = max(peaks[actors].get(pid, 0), peak)
                    records.append((pid, start, end, 1))
            assert len(records) == count, (len(records), count)
            startup[f"ray {actors}"].append(min(r[1] for r in records) - began)
            return _rate(records)

        cases = {"in-process": in_process, "ray 1": lambda: on_ray(1), "ray 2": lambda: on_ray(2)}
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):  # round-robin, so slow phases of a shared machine hit every case
            for name, case in cases.items():
                samples[name].append(case())
    finally:
        ray.shutdown()

    rates = {name: statistics.median(values) for name, values in samples.items()}
    in_process_peak = statistics.median(in_process_peaks)
    model = "demo CNN 1×64×64, Grad-CAM stage3 (torch, 1 thread per worker)"
    labels = {"in-process": "in-process runner", "ray 1": "Ray Data, 1 actor", "ray 2": "Ray Data, 2 actors"}
    rows = []
    for key, label in labels.items():
        rows.append(
            {
                "framework": "ray",
                "model": model,
                "case": f"{label}: {rates[key]:.0f} images/s",
                "batch": BATCH,
                "ms": 1e3 / rates[key],
                "ratio": rates[key] / rates["in-process"],
                "baseline": "in-process runner's images/s (higher is better)",
            }
        )
    rows.append(
        {
            "framework": "ray",
            "model": model,
            "case": "Ray Data, 2 actors vs 1 actor",
            "batch": BATCH,
            "ms": 1e3 / rates["ray 2"],
            "ratio": rates["ray 2"] / rates["ray 1"],
            "baseline": "1 actor's images/s (higher is better)",
        }
    )
    for actors in (1, 2):
        values = sorted(peaks[actors].values())
        rows.append(
            {
                "framework": "ray",
                "model": model,
                "case": f"peak RSS per actor (pool of {actors}, median of {len(values)} actors)",
                "batch": BATCH,
                "ms": None,
                "mb": statistics.median(values) / 2**20,
                "ratio": statistics.median(values) / in_process_peak,
                "baseline": f"one process running the in-process runner ({in_process_peak / 2**20:.0f} MB)",
            }
        )
    for key in ("ray 1", "ray 2"):
        rows.append(
            {
                "framework": "ray",
                "model": model,
                "case": f"{labels[key]}: start-up until the first batch",
                "batch": BATCH,
                "ms": statistics.median(startup[key]) * 1e3,
                "ratio": statistics.median(startup[key]) * rates["in-process"] / count,
                "baseline": f"the in-process runner's time for all {count} images",
            }
        )
    return rows
