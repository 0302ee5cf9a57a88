"""Issue 21: Grad-CAM in native mode (tensors on the model's device) beside the NumPy mode and inference.

``python -m tests.benchmarks native_torch [--quick] [--device cuda] [--threads 1] [--batch 64]
[--dtype bfloat16]``. One run, cases interleaved (``timing.interleaved``), on the ResNet-50-shaped
model of ``bench_torch``: the plain ``inference_mode`` forward, Grad-CAM at ``layer4`` with
``arrays="numpy"`` (the default: activations and gradients copied to the host, the core in float64
NumPy) and with ``arrays="native"`` (the core on the tensors, in float32, where the model runs),
each with one map and with K = 10 maps per sample, a differentiable call (``differentiable=True``:
the whole forward recorded, the gradients with ``create_graph``) for what a training step pays,
and the importable peers' Grad-CAM (Captum ``LayerGradCam``, torchcam ``GradCAM``) on the same
model and input. ``--dtype`` casts the model and the input (bfloat16 / float16: the maps still come
back in float32). On CUDA it adds each case's peak device memory beside the forward's.
"""

from __future__ import annotations

import numpy as np
import torch

import anycam

from .bench_torch import _name, _peers, _setup, _sync
from .timing import interleaved, memory_row, row

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(quick: bool = False, device: str = "cpu", batch: int | None = None, dtype: str = "float32") -> list[dict]:
    model, x, repeats = _setup(quick, device, batch)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: one of {sorted(DTYPES)}")
    model, x = model.to(DTYPES[dtype]), x.to(DTYPES[dtype])
    batch = x.shape[0]
    name = _name(quick) + ("" if device == "cpu" else f", {device}") + ("" if dtype == "float32" else f", {dtype}")
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
    peers, skipped = _peers(model, x, host=False)
    peers.pop("pytorch-grad-cam GradCAM", None)  # host NumPy/cv2 maps: not a device-resident peer
    for peer, call in list(peers.items()):
        try:  # a peer that cannot run this dtype or device is reported, not fatal
            call()
        except Exception as exc:
            skipped.append(f"{peer}: {type(exc).__name__}: {exc}")
            del peers[peer]
    for reason in skipped:
        print(f"skipped peer, {reason}", flush=True)
    cases.update({peer: (lambda call=call: synced(call())) for peer, call in peers.items()})
    memory = _device_peaks(cases, device) if device.startswith("cuda") else {}
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
    cases_rows += [(f"{peer} (peer)", peer, inference, "forward") for peer in peers]
    cases_rows += [(f"arrays='native' vs {peer}", "native", peer, peer) for peer in peers]
    rows = [row("torch", name, case, batch, times[key], label, times[base]) for case, key, label, base in cases_rows]
    for key, label in (("native", "Grad-CAM, arrays='native'"), ("numpy", "Grad-CAM, arrays='numpy'")):
        if key in memory:
            peak, forward_peak = memory[key], memory["forward"]
            rows.append(memory_row("torch", name, label, batch, peak, "inference_mode forward", forward_peak))
    return rows


def _device_peaks(cases: dict[str, object], device: str) -> dict[str, int]:
    """Each case's peak CUDA memory above what was allocated before it (bytes), after a warm-up."""
    peaks = {}
    for key in ("forward", "native", "numpy"):
        call = cases[key]
        call()  # type: ignore[operator]
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()  # type: ignore[operator]
        torch.cuda.synchronize(device)
        peaks[key] = max(torch.cuda.max_memory_allocated(device) - before, 1)
    return peaks
