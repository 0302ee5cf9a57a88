"""JAX, issue 21: Grad-CAM in NumPy mode, native mode and as one jitted ``explain_fn``, against inference.

Same Flax ResNet-50-shaped network and batch as ``bench_jax`` (random weights), layer4, one
map per sample, measured interleaved in one run: the jitted forward (inference), the Explainer
with ``arrays="numpy"`` (the default: the capture's arrays come to the host and the core runs in
NumPy), the Explainer with ``arrays="native"`` (the core runs on the device in ``jax.numpy``, op
by op), and ``jax.jit(explain_fn(...))`` (capture + core compiled as one XLA program).

``python -m tests.benchmarks native_jax [--quick] [--device cuda]``.
"""

from __future__ import annotations

import jax
from anycam.backends.jax.compose import explain_fn

import anycam

from .bench_jax import _forward, _setup
from .timing import interleaved, row


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    model, variables, x, repeats, name = _setup(quick, device)
    batch = x.shape[0]
    kwargs = {"model_kwargs": {"train": False}}
    numpy_mode = anycam.Explainer((model, variables), "layer4", **kwargs)
    native_mode = anycam.Explainer((model, variables), "layer4", arrays="native", **kwargs)
    pure = jax.jit(explain_fn((model, variables), "layer4", "gradcam", **kwargs))
    cases = {
        "forward": _forward(model, variables, x),
        "numpy": lambda: numpy_mode(x),
        "native": lambda: jax.block_until_ready(native_mode.explain(x).heatmap),
        "jitted": lambda: jax.block_until_ready(pure(variables, x)),
    }
    times = interleaved(cases, repeats)
    base, label = times["forward"], "jitted forward"
    numpy_base, numpy_label = times["numpy"], "arrays='numpy'"
    return [
        row("jax", name, "Grad-CAM layer4, arrays='numpy'", batch, times["numpy"], label, base),
        row("jax", name, "Grad-CAM layer4, arrays='native'", batch, times["native"], label, base),
        row("jax", name, "Grad-CAM layer4, jax.jit(explain_fn)", batch, times["jitted"], label, base),
        row("jax", name, "Grad-CAM layer4, arrays='native'", batch, times["native"], numpy_label, numpy_base),
        row(
            "jax",
            name,
            "Grad-CAM layer4, jax.jit(explain_fn)",
            batch,
            times["jitted"],
            "arrays='numpy'",
            times["numpy"],
        ),
    ]


if __name__ == "__main__":
    for r in run():
        print(r)
