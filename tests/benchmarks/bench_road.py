"""ROAD's noisy linear imputation of one 224² image at 50 % removal, against one forward pass.

The issue's bar: imputing one image (one sparse factorisation and solve for its three channels)
costs at most 5× one forward pass of the model ROAD evaluates. Measured side by side, in one
run, against a batch-1 forward of ResNet-50 (``bench_torch``'s, random weights: the same compute
as the pretrained one) and, where its packages are installed, the EfficientNet-Lite0 of
``nox -s pictures``. Three masks at 50 %: the hardest, one solid hole (the top half of a
CAM-like blob map: MoRF), its complement (LeRF), and a per-pixel random map (scattered pixels:
many tiny systems in one). ``python -m tests.benchmarks road``.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from anycam.metrics import noisy_linear_imputation

from .bench_torch import ResNet50
from .timing import interleaved, row

SIZE = 224


def _masks(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    # A CAM-like map: one smooth blob off centre, as a 7×7 Grad-CAM upsampled looks.
    blob = -((yy - 0.45 * size) ** 2 + (xx - 0.55 * size) ** 2) + 1e-3 * rng.random((size, size))
    half = size * size // 2

    def top(values: np.ndarray) -> np.ndarray:
        order = np.argsort(-values.reshape(-1), kind="stable")
        removed = np.zeros(size * size, dtype=bool)
        removed[order[:half]] = True
        return removed.reshape(size, size)

    return {
        "MoRF (one hole)": top(blob),
        "LeRF (the frame around it)": top(-blob),
        "per-pixel random map": top(rng.random((size, size))),
    }


def _models() -> dict[str, torch.nn.Module]:
    models: dict[str, torch.nn.Module] = {"ResNet-50": ResNet50().eval()}
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        print(f"EfficientNet-Lite0 skipped: {exc}", file=sys.stderr)
    else:
        models["EfficientNet-Lite0"] = EfficientNet.from_name("efficientnet-lite0").eval()
    return models


def run(quick: bool = False) -> list[dict]:
    size = 32 if quick else SIZE
    repeats = 2 if quick else 7
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, size, size)).astype(np.float32)
    x = torch.from_numpy(image[None])
    masks = _masks(size, rng)
    models = _models()

    def forward(model: torch.nn.Module):
        def call() -> None:
            with torch.no_grad():
                model(x)

        return call

    def impute(mask: np.ndarray):
        return lambda: noisy_linear_imputation(image, mask, seed=0)

    cases = {f"forward {name}": forward(model) for name, model in models.items()}
    cases.update({f"imputation, {name}": impute(mask) for name, mask in masks.items()})
    times = interleaved(cases, repeats)
    rows = []
    for model_name in models:
        base = times[f"forward {model_name}"]
        label = f"forward, {model_name}"
        rows.append(row("torch", f"{size}² image", label, 1, base, label, base))
        for mask_name in masks:
            seconds = times[f"imputation, {mask_name}"]
            rows.append(
                row("numpy+scipy", f"{size}² image", f"ROAD imputation 50 %, {mask_name}", 1, seconds, label, base)
            )
    return rows
