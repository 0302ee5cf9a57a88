"""TensorFlow, issue 21: Grad-CAM in native mode (tensors where the model runs) beside the NumPy mode and inference.

``python -m tests.benchmarks native_tensorflow [--quick] [--device cuda] [--threads 1] [--batch 64]``.
One run, cases interleaved, on the Keras ResNet50 of ``bench_tensorflow`` (random weights) at
``conv5_block3_out``: the compiled forward, Grad-CAM with ``arrays="numpy"`` (the default: the
capture's tensors read on the host, the core in float64 NumPy) and with ``arrays="native"`` (the
core on the tensors through ``backends/tensorflow/namespace.py``, float32), each with one map and
with K = 10 maps per sample, and a differentiable call (``differentiable=True`` under a caller's
tape, differentiated to every weight) for what a training step pays.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import anycam

from .bench_tensorflow import LAYER, _compiled_forward, _scope, _setup
from .timing import interleaved, row


def run(quick: bool = False, device: str = "cpu", batch: int | None = None) -> list[dict]:
    with _scope(device):
        return _run(quick, device, batch)


def _run(quick: bool, device: str, batch: int | None) -> list[dict]:
    model, x, repeats, name = _setup(quick, batch)
    name += "" if device == "cpu" else f", {device}"
    size, count = x.shape[1], x.shape[0]
    numpy_mode = anycam.Explainer(model, LAYER)
    native = anycam.Explainer(model, LAYER, arrays="native")
    differentiable = anycam.Explainer(model, LAYER, differentiable=True)
    k10 = np.tile(np.arange(10), (count, 1))
    forward = _compiled_forward(model, size)

    def taped() -> object:  # a training step's extra work: the map's gradient to every weight
        with tf.GradientTape() as tape:
            heat = differentiable(x)
            loss = tf.reduce_sum(heat)
        return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, model.trainable_variables) if g is not None])

    cases = {
        "forward": lambda: forward(x).numpy(),
        "numpy": lambda: numpy_mode(x),
        "numpy K=10": lambda: numpy_mode(x, target=k10),
        # .numpy() of one scalar: the native call's work is done before the clock stops.
        "native": lambda: tf.reduce_sum(native(x)).numpy(),
        "native K=10": lambda: tf.reduce_sum(native(x, target=k10)).numpy(),
        "differentiable": lambda: tf.reduce_sum(taped()).numpy(),
    }
    times = interleaved(cases, repeats)
    inference = "compiled forward"
    rows = [
        (f"Grad-CAM {LAYER}, arrays='numpy'", "numpy", inference, "forward"),
        (f"Grad-CAM {LAYER}, arrays='native'", "native", inference, "forward"),
        (f"Grad-CAM {LAYER}, native vs numpy", "native", "arrays='numpy'", "numpy"),
        (f"Grad-CAM {LAYER} K=10, arrays='numpy'", "numpy K=10", "one map (numpy)", "numpy"),
        (f"Grad-CAM {LAYER} K=10, arrays='native'", "native K=10", "one map (native)", "native"),
        (f"Grad-CAM {LAYER}, differentiable=True + weight gradients", "differentiable", inference, "forward"),
    ]
    return [row("tensorflow", name, case, count, times[key], label, times[base]) for case, key, label, base in rows]
