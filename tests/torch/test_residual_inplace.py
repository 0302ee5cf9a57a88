"""Issue 19.0: layers whose output the network modifies in place (ResNet's ``out += identity``).

The oracle is the brute force: zero channel k of the layer with a forward hook, rerun the whole
model, and take the paper's weight ``(y - y_k) / y``; the activations are a hook's copy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anycam
from anycam import core

from .nets import ResNet18Shaped, brute_force_ablation, hooked

RESNET_LAYERS = (
    "layer4.1.bn2",  # the identity is added to its output in place
    "layer3.1.bn2",
    "layer4.0.bn2",  # a block with a downsampled identity
    "layer4.1.conv2",
    "layer4.1",
    "layer3.1",
    "layer4.0.downsample.1",
    "layer4.1.bn1",  # the shared in-place ReLU runs on its output
)


@pytest.mark.parametrize("name", RESNET_LAYERS)
def test_ablationcam_at_resnet18_positions_equals_zeroing_each_channel_in_the_whole_model(name: str) -> None:
    torch.manual_seed(0)
    model = ResNet18Shaped().eval()
    x = torch.randn(2, 3, 64, 64)
    classes = [1, 3]
    activations, weights = brute_force_ablation(model, name, x, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.ZeroMapWarning)
        result = anycam.Explainer(model, name, method="ablationcam").explain(x, target=classes)
    got = np.asarray(result.weights).reshape(weights.shape)
    # (y - y_k) / y divides float32 score differences by y: the error scales with 1/|y|.
    y = np.abs(hooked(model, model.get_submodule(name), x, lambda out: None).numpy()[[0, 1], classes])
    tolerance = 1e-5 * (1.0 + np.abs(weights).max()) / y.min()
    np.testing.assert_allclose(got, weights, atol=tolerance)
    cam = np.maximum(np.einsum("nc,nc...->n...", weights, activations.astype(np.float64)), 0)
    scale = max(float(np.abs(cam).max()), 1e-12)
    np.testing.assert_allclose(np.asarray(result.cam) / scale, cam / scale, atol=tolerance)


def test_capture_without_gradients_holds_the_layer_output_before_the_network_adds_to_it() -> None:
    """Score-CAM and Ablation-CAM read activations from a capture without gradients."""
    torch.manual_seed(0)
    model = ResNet18Shaped().eval()
    x = torch.randn(2, 3, 64, 64)
    explainer = anycam.Explainer(model, "layer4.1.bn2", method="scorecam")
    capture = explainer.backend.capture(x, core.parse_target(None), gradients=False)
    kept: list[torch.Tensor] = []
    hooked(model, model.layer4[1].bn2, x, lambda out: kept.append(out.clone()))
    np.testing.assert_array_equal(capture.activations[0], kept[0].numpy())


class AddsIntoItsInput(nn.Module):
    """``x = x.add_(branch(x))``: the network after the layer modifies a tensor computed before it, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x.add_(self.branch(x))
        return self.fc(torch.tanh(x).mean(dim=(2, 3)))


def test_ablated_copies_never_see_each_others_in_place_changes() -> None:
    """The part after the layer adds into a tensor of the part before it: each copy from the original."""
    torch.manual_seed(0)
    model = AddsIntoItsInput().eval()
    x = torch.randn(2, 3, 8, 8)
    classes = [0, 2]
    _, weights = brute_force_ablation(model, "branch", x, classes)
    with warnings.catch_warnings():
        # In-place arithmetic on a tensor of the part before the layer has no vmap rule: the
        # copies then run one at a time, and anycam says so.
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        result = anycam.Explainer(model, "branch", method="ablationcam").explain(x, target=classes)
    np.testing.assert_allclose(np.asarray(result.weights).reshape(weights.shape), weights, atol=1e-4)
