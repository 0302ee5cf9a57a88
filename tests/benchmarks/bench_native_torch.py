"""Issue 21: Grad-CAM in native mode (tensors on the model's device) beside the NumPy mode and inference.

``python -m tests.benchmarks native_torch [--quick] [--device cuda] [--threads 1]``. One run, cases
interleaved (``timing.interleaved``), on the ResNet-50-shaped model of ``bench_torch``: the
plain ``inference_mode`` forward, Grad-CAM at ``layer4`` with ``arrays="numpy"`` (the default:
activations and gradients copied to the host, the core in float64 NumPy) and with
``arrays="native"`` (the core on the tensors, in float32, where the model runs), each with one
map and with K = 10 maps per sample, and a differentiable call (``differentiable=True``: the whole
forward recorded, the gradients with ``create_graph``) for what a training step pays.
"""

from __future__ import annotations

import numpy as np
import torch

import anycam

from .bench_torch import _name, _setup, _sync
from .timing import interleaved, row


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    model, x, repeats = _setup(quick, device)
    batch = x.shape[0]
    name = _name(quick) + ("" if device == "cpu" else f", {device}")
    numpy_mode = anycam.Explainer(model, "layer4")
    native = anycam.Explainer(model, "layer4", arrays="native")
    differentiable = anycam.Explainer(model, "layer4", differentiable=True)
    k10 = np.tile(np.arange(10), (batch, 1))

    def forward() -> object:
        with torch.inference_mode():
            out = model(x)
        _sync(device)
        return out

    def synced(call: object) -> object:
        _sync(device)
        return call

    cases = {
        "forward": forward,
        "numpy": lambda: numpy_mode(x),
        "numpy K=10": lambda: numpy_mode(x, target=k10),
        "native": lambda: synced(native(x)),
        "native K=10": lambda: synced(native(x, target=k10)),
        "differentiable": lambda: synced(differentiable(x)),
    }
    times = interleaved(cases, repeats)
    inference = "plain inference_mode forward"
    cases_rows = [
        ("Grad-CAM layer4, arrays='numpy'", "numpy", inference, "forward"),
        ("Grad-CAM layer4, arrays='native'", "native", inference, "forward"),
        ("Grad-CAM layer4, native vs numpy", "native", "arrays='numpy'", "numpy"),
        ("Grad-CAM layer4 K=10, arrays='numpy'", "numpy K=10", "one map (numpy)", "numpy"),
        ("Grad-CAM layer4 K=10, arrays='native'", "native K=10", "one map (native)", "native"),
        ("Grad-CAM layer4, differentiable=True", "differentiable", inference, "forward"),
    ]
    return [row("torch", name, case, batch, times[key], label, times[base]) for case, key, label, base in cases_rows]
