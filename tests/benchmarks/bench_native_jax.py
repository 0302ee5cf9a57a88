"""JAX, issue 21: Grad-CAM in NumPy mode, native mode and as one jitted ``explain_fn``, against inference.

Same Flax ResNet-50-shaped network and batch as ``bench_jax`` (random weights), layer4, one
map per sample and K = 10, measured interleaved in one run: the jitted forward (inference), the
Explainer with ``arrays="numpy"`` (the default: the capture's arrays come to the host and the
core runs in NumPy), the Explainer with ``arrays="native"`` (the core runs on the device, as one
jitted program: ``JaxBackend.compiled``), the same capture with the core run op by op in eager
``jax.numpy`` (``assembly.capture``: the native driver before the core was compiled, kept as the
"before" row), and ``jax.jit(explain_fn(...))`` (capture + core compiled as one XLA program).

``python -m tests.benchmarks native_jax [--quick] [--device cuda]``.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from anycam.backends.jax.compose import explain_fn

import anycam
from anycam.explain import assembly

from .bench_jax import _forward, _setup
from .timing import interleaved, row


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    model, variables, x, repeats, name = _setup(quick, device)
    batch = x.shape[0]
    kwargs = {"model_kwargs": {"train": False}}
    numpy_mode = anycam.Explainer((model, variables), "layer4", **kwargs)
    native_mode = anycam.Explainer((model, variables), "layer4", arrays="native", **kwargs)
    pure = jax.jit(explain_fn((model, variables), "layer4", "gradcam", **kwargs))
    k10 = np.tile(np.arange(10), (batch, 1))
    one = anycam.core.parse_target(None)
    cases = {
        "forward": _forward(model, variables, x),
        "numpy": lambda: numpy_mode(x),
        "native": lambda: jax.block_until_ready(native_mode.explain(x).heatmap),
        "eager": lambda: jax.block_until_ready(assembly.capture(native_mode, x, one).heatmap),
        "jitted": lambda: jax.block_until_ready(pure(variables, x)),
        "numpy K=10": lambda: numpy_mode(x, target=k10),
        "native K=10": lambda: jax.block_until_ready(native_mode.explain(x, target=k10).heatmap),
    }
    with warnings.catch_warnings():
        # Random weights: some of the K = 10 maps are flat (ZeroMapWarning), which costs nothing extra.
        warnings.simplefilter("ignore", anycam.ZeroMapWarning)
        times = interleaved(cases, repeats)
    label = "jitted forward"
    case = "Grad-CAM layer4, "
    eager = "arrays='native', core op by op (before)"

    def ratio(measured: str, text: str, baseline: str, baseline_label: str) -> dict:
        return row("jax", name, case + text, batch, times[measured], baseline_label, times[baseline])

    return [
        ratio("numpy", "arrays='numpy'", "forward", label),
        ratio("native", "arrays='native'", "forward", label),
        ratio("eager", eager, "forward", label),
        ratio("jitted", "jax.jit(explain_fn)", "forward", label),
        ratio("native", "arrays='native'", "numpy", "arrays='numpy'"),
        ratio("eager", eager, "numpy", "arrays='numpy'"),
        ratio("jitted", "jax.jit(explain_fn)", "numpy", "arrays='numpy'"),
        ratio("numpy K=10", "K=10 maps per sample, arrays='numpy'", "numpy", "one map, arrays='numpy'"),
        ratio("native K=10", "K=10 maps per sample, arrays='native'", "native", "one map, arrays='native'"),
    ]


if __name__ == "__main__":
    for r in run():
        print(r)
