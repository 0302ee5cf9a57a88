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


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``, written out: one shared in-place ReLU, ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18Shaped(nn.Module):
    """torchvision's ``resnet18`` structure (stem, 4 stages of 2 blocks, avgpool, fc), narrow widths."""

    def __init__(self, widths: tuple[int, ...] = (4, 6, 8, 8), classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)
        # Random statistics and affine parameters: a BatchNorm at its identity initialisation
        # would hide what a trained network shows.
        generator = torch.Generator().manual_seed(3)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
                with torch.no_grad():
                    module.weight.copy_(1.0 + 0.5 * torch.randn(channels, generator=generator))
                    module.bias.copy_(0.5 * torch.randn(channels, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _hooked(model: nn.Module, layer: nn.Module, x: torch.Tensor, function) -> torch.Tensor:  # type: ignore[no-untyped-def]
    handle = layer.register_forward_hook(lambda module, args, out: function(out))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def _brute_force(model: nn.Module, name: str, x: torch.Tensor, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(activations (N, C, ...), weights (N, C)): a hook's copy, and each channel zeroed in a full rerun."""
    layer = model.get_submodule(name)
    index = torch.as_tensor(classes)[:, None]
    kept: list[torch.Tensor] = []
    y = _hooked(model, layer, x, lambda out: kept.append(out.clone())).gather(1, index)[:, 0].double()
    weights = []
    for channel in range(kept[0].shape[1]):

        def zero(out: torch.Tensor, channel: int = channel) -> torch.Tensor:
            out = out.clone()
            out[:, channel] = 0
            return out

        ablated = _hooked(model, layer, x, zero).gather(1, index)[:, 0].double()
        weights.append(((y - ablated) / y).numpy())
    return kept[0].numpy(), np.stack(weights, axis=-1)


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
    activations, weights = _brute_force(model, name, x, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.ZeroMapWarning)
        result = anycam.Explainer(model, name, method="ablationcam").explain(x, target=classes)
    got = np.asarray(result.weights).reshape(weights.shape)
    # (y - y_k) / y divides float32 score differences by y: the error scales with 1/|y|.
    y = np.abs(_hooked(model, model.get_submodule(name), x, lambda out: None).numpy()[[0, 1], classes])
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
    _hooked(model, model.layer4[1].bn2, x, lambda out: kept.append(out.clone()))
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
    _, weights = _brute_force(model, "branch", x, classes)
    with warnings.catch_warnings():
        # In-place arithmetic on a tensor of the part before the layer has no vmap rule: the
        # copies then run one at a time, and anycam says so.
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        result = anycam.Explainer(model, "branch", method="ablationcam").explain(x, target=classes)
    np.testing.assert_allclose(np.asarray(result.weights).reshape(weights.shape), weights, atol=1e-4)
