"""The training example of docs/devices.md on the demo network: a right-for-the-right-reasons penalty.

A few Adam steps on ``cross-entropy + λ · (share of the Grad-CAM map's energy outside the digit's
box)``, the map from ``Explainer(differentiable=True)``, raise the energy pointing game
(``anycam.metrics.energy_pointing_game``, the oracle: it is computed from NumPy-mode maps and the
boxes, independently of the loss) on held-out canvases, and keep the held-out accuracy.

Margin: measured over the split seeds 0–5 (24 training canvases, 24 held out, 10 steps of Adam
at 3e-4, λ = 5) the held-out energy pointing game rose from 0.387–0.397 to 0.427–0.499, by
0.102, 0.058, 0.063, 0.036, 0.084 and 0.064 (held-out accuracy 0.96–1.0). The test runs seed 0
(a rise of 0.10) and asserts at least 0.03, below the smallest rise of the six seeds, so a change
of split or of rounding cannot fail it while a penalty that does nothing does; the same steps
without the penalty (λ = 0, the control) move it by less than 0.01.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from anycam.backends.torch.demo import build_demo_model

import anycam
from anycam.demo.data import load_demo
from anycam.metrics import energy_pointing_game

pytest.importorskip("array_api_compat")


def fine_tune(penalty_weight: float, seed: int = 0, steps: int = 10) -> tuple[float, float, float]:
    """Returns (held-out energy pointing game before, after, held-out accuracy after)."""
    demo = load_demo()
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(demo["images"]))
    train, held = order[:24], order[24:]
    model = build_demo_model(demo["weights"])  # eval mode: BatchNorm keeps its running statistics
    x, y, boxes = torch.from_numpy(demo["images"]), torch.from_numpy(demo["labels"]), demo["boxes"]
    outside = torch.ones(len(x), *x.shape[2:])
    for i, (row0, col0, row1, col1) in enumerate(boxes):
        outside[i, row0:row1, col0:col1] = 0

    def pointing_game() -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", anycam.ZeroMapWarning)
            maps = anycam.Explainer(model, "stage3", "gradcam")(x[held], y[held].numpy())
        return float(energy_pointing_game(maps, boxes[held]).mean())

    before = pointing_game()
    explainer = anycam.Explainer(model, "stage3", "gradcam", differentiable=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-4)
    for _ in range(steps):
        heatmap = explainer.explain(x[train], y[train].numpy()).heatmap
        outside_share = (heatmap * outside[train]).sum((1, 2)) / heatmap.sum((1, 2)).clamp_min(1e-6)
        loss = torch.nn.functional.cross_entropy(model(x[train]), y[train]) + penalty_weight * outside_share.mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = pointing_game()
    with torch.no_grad():
        accuracy = float((model(x[held]).argmax(1) == y[held]).float().mean())
    return before, after, accuracy


def test_an_energy_outside_the_box_penalty_raises_the_held_out_energy_pointing_game() -> None:
    before, after, accuracy = fine_tune(penalty_weight=5.0)
    assert after >= before + 0.03, (before, after)
    assert accuracy >= 0.9


def test_the_same_steps_without_the_penalty_do_not_raise_it() -> None:
    """The control: the rise comes from the map's gradient, not from the steps themselves."""
    before, after, _ = fine_tune(penalty_weight=0.0)
    assert abs(after - before) < 0.01, (before, after)
