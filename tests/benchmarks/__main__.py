"""Runs every installed framework's benchmark and prints one Markdown table of ratios.

``python -m tests.benchmarks [--quick] [--device cuda] [torch torch_methods tensorflow tensorflow_methods jax
jax_methods ray]``: the benchmarks (``*_methods``: Ablation-CAM, Score-CAM, Guided Grad-CAM).
``python -m tests.benchmarks --phases [--batch 64] [--device cuda] [torch tensorflow jax]``:
only where one Grad-CAM call's time goes (forward, tapping, gradients, device→host copy, core).
A framework that cannot be imported (or has no such device) is skipped with its reason.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

from .timing import DeviceUnavailable


def _print(r: dict) -> None:
    ms = f"{r['ms']:.1f}" if r.get("ms") is not None else f"{r['mb']:.0f} MB"
    ratio = f"{r['ratio']:.2f}×" if abs(r["ratio"]) >= 0.1 else f"{r['ratio']:.3f}×"
    print(
        f"| {r['framework']} | {r['model']} | {r['case']} | {r['batch']} | {ms} | {ratio} | {r['baseline']} |",
        flush=True,
    )


def limit_threads(threads: int) -> None:
    """Caps every framework's CPU thread pools; must run before a framework is imported.

    Environment variables, so the fresh interpreters of the memory cases get the same cap.
    """
    count = str(threads)
    os.environ.update(
        {
            "OMP_NUM_THREADS": count,  # torch's intra-op pool, NumPy's BLAS
            "MKL_NUM_THREADS": count,
            "OPENBLAS_NUM_THREADS": count,
            "TF_NUM_INTRAOP_THREADS": count,
            "TF_NUM_INTEROP_THREADS": count,
            "ANYCAM_BENCH_THREADS": count,  # read by bench_torch (torch.set_num_threads)
        }
    )
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks")
    everything = [
        "torch",
        "torch_methods",
        "native_torch",
        "tensorflow",
        "tensorflow_methods",
        "jax",
        "jax_methods",
        "native_jax",
        "road",
        "attention",
        "ray",
    ]
    parser.add_argument("frameworks", nargs="*", default=everything)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the benchmarks run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--phases", action="store_true", help="only the time breakdown of one call")
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size for --phases and the benchmarks that take one (default 8)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="model and input dtype, for the benchmarks that take one (native_torch)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds for --phases (default as run)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per framework (default: each framework's own); 1 keeps ratios steady on a busy machine",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default) or the process's CPU time (steadier on a shared machine)",
    )
    args = parser.parse_args(argv)
    os.environ["ANYCAM_BENCH_CLOCK"] = args.clock
    if args.threads is not None:
        limit_threads(args.threads)
    threads = "each framework's default threads" if args.threads is None else f"{args.threads} thread(s)"
    print(f"Clock: {args.clock} time; {threads}; device: {args.device}.\n")
    print("| framework | model | case | batch | time (ms) | ratio | relative to |")
    print("|---|---|---|---|---|---|---|")
    for framework in args.frameworks:
        try:
            module = importlib.import_module(f"tests.benchmarks.bench_{framework}")
        except ImportError as exc:
            print(f"skipped {framework}: {type(exc).__name__}: {exc}", flush=True)
            continue
        if args.phases and not hasattr(module, "phases"):
            continue
        try:
            if args.phases:
                rows = module.phases(quick=args.quick, device=args.device, batch=args.batch, repeats=args.repeats)
            elif "device" in inspect.signature(module.run).parameters:
                accepted = inspect.signature(module.run).parameters
                extra = {key: value for key, value in (("batch", args.batch), ("dtype", args.dtype)) if key in accepted}
                if args.dtype != "float32" and "dtype" not in extra:
                    print(f"skipped {framework}: takes no --dtype", flush=True)
                    continue
                rows = module.run(quick=args.quick, device=args.device, **extra)
            elif args.device == "cpu":
                rows = module.run(quick=args.quick)
            else:
                print(f"skipped {framework}: runs on the CPU only", flush=True)
                continue
        except DeviceUnavailable as exc:
            print(f"skipped {framework}: {exc}", flush=True)
            continue
        for r in rows:
            _print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
