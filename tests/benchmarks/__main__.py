"""Runs every installed framework's benchmark and prints one Markdown table of ratios.

``python -m tests.benchmarks [--quick] [torch tensorflow jax ray]``
"""

from __future__ import annotations

import argparse
import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks")
    parser.add_argument("frameworks", nargs="*", default=["torch", "tensorflow", "jax", "ray"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the benchmarks run")
    args = parser.parse_args(argv)
    print("| framework | model | case | batch | time (ms) | ratio | relative to |")
    print("|---|---|---|---|---|---|---|")
    for framework in args.frameworks:
        module = importlib.import_module(f"tests.benchmarks.bench_{framework}")
        for r in module.run(quick=args.quick):
            ms = f"{r['ms']:.1f}" if r.get("ms") is not None else f"{r['mb']:.0f} MB"
            ratio = f"{r['ratio']:.2f}×" if r["ratio"] >= 0.1 else f"{r['ratio']:.3f}×"
            print(
                f"| {r['framework']} | {r['model']} | {r['case']} | {r['batch']} | {ms} | {ratio} | {r['baseline']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
