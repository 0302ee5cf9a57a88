"""Issue 19.3: a module whose output is channels-last ``(N, H, W, C)`` is read channels-last.

torch modules carry no layout; the modules that produced a layer's output do (a convolution:
channels first; ``nn.Linear`` / ``nn.LayerNorm`` over the last axis: channels last). The
oracle is Grad-CAM written in plain autograd over the true channel axis.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anycam


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class Mixer(nn.Module):
    """conv (N, 6, 8, 8) → permute → Linear(6 → 4) → GELU: ``act`` is (N, 8, 8, 4), C = 4 ≤ W = 8,
    which reads as channels first (C = 8, a 8 × 4 map) just as well; then a ConvNeXt-style block
    (LayerNorm, Linear) and a dense head over the pooled channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.perm = ToChannelsLast()
        self.mix = nn.Linear(6, 4)
        self.act = nn.GELU()
        self.block = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.GELU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.mix(self.perm(self.conv(x))))
        h = h + self.block(h)
        return self.fc(h.mean(dim=(1, 2)))


def _oracle(model: Mixer, name: str, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM over the last axis: ReLU(Σ_c mean_hw(∂y/∂A[..., c]) A[..., c]), by autograd."""
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        kept.append(out.detach().clone().requires_grad_())
        return kept[-1].clone()

    if name.endswith(":input"):  # what flows into the module: a pre-hook
        module = model.get_submodule(name.removesuffix(":input"))
        handle = module.register_forward_pre_hook(lambda m, args: (keep(m, args, args[0]), *args[1:]))
    else:
        handle = model.get_submodule(name).register_forward_hook(keep)
    try:
        scores = model(x)[torch.arange(x.shape[0]), torch.as_tensor(classes)]
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(scores.sum(), kept[0])
    weights = grads.mean(dim=(1, 2), keepdim=True)
    return F.relu((weights * kept[0]).sum(-1)).detach().numpy()


@pytest.mark.parametrize("layer", ["act", "mix", "block", "block.0", "block:input", None])
def test_a_channels_last_module_is_read_channels_last(layer: str | None) -> None:
    torch.manual_seed(0)
    model = Mixer().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.ZeroMapWarning)
        result = anycam.Explainer(model, layer).explain(x, target=[0, 2])
    name = result.layer
    assert np.asarray(result.cam).shape == (2, 8, 8)
    expected = _oracle(model, name, x, [0, 2])
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(np.asarray(result.cam) / scale, expected / scale, atol=1e-5)


def test_a_convolution_after_a_channels_last_block_is_channels_first_again() -> None:
    """The layout follows the last module that decides one: back to channels first after a conv."""

    class Back(Mixer):
        def __init__(self) -> None:
            super().__init__()
            self.conv2 = nn.Conv2d(4, 5, 1)
            self.act2 = nn.ReLU()
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.mix(self.perm(self.conv(x))))
            h = self.act2(self.conv2(h.permute(0, 3, 1, 2)))  # (N, 5, 8, 8)
            return self.fc(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Back().eval()
    x = torch.randn(2, 3, 8, 8)
    explainer = anycam.Explainer(model, "act2", method="ablationcam")
    result = explainer.explain(x, target=[1, 1])
    assert np.asarray(result.weights).reshape(2, -1).shape == (2, 5)
