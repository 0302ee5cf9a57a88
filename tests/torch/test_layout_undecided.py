"""Issue 19.3: where nothing in a torch model decides a layer's layout and both readings fit, refuse.

A custom module (no convolution, norm, pooling, ``nn.Linear`` or ``nn.LayerNorm`` before or in
it) returns ``(N, 8, 8, 6)`` under an ``(N, 3, 8, 8)`` input: read channels first it is 8
channels over an 8 × 6 map, read channels last 6 channels over 8 × 8. Both fit the input, so
anycam must ask for ``layout=`` instead of keeping torch's channels-first habit; with
``layout="channels_last"`` the map is Grad-CAM over the last axis, written here in plain autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anycam


class PixelMix(nn.Module):
    """Mixes the channels of every pixel with its own weight matrix: (N, 3, H, W) → (N, H, W, 6).

    Written with a bare Parameter and einsum, so no module of a known kind produces the output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.einsum("nchw,cd->nhwd", x, self.weight))


class Net(nn.Module):
    """``mix`` then a dense head over the channel means, in functional code (no classifying module)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = PixelMix()
        self.head = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.mix(x)  # (N, 8, 8, 6)
        # Position-dependent pooling, so the map is not the same for every position.
        ramp = torch.linspace(0.0, 2.0, 8)[None, :, None, None]
        return (features * ramp).mean(dim=(1, 2)) @ self.head


def _model() -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("layer", ["mix", None])
def test_an_undecided_layout_that_reads_both_ways_is_refused(layer: str | None) -> None:
    model, x = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(anycam.InputError, match=r"cannot tell the layout.*\(2, 8, 8, 6\).*layout="):
        anycam.Explainer(model, layer).explain(x, target=[0, 3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layer", ["mix", None])
def test_layout_given_decides_an_undecided_layer(layer: str | None) -> None:
    model, x = _model()
    result = anycam.Explainer(model, layer, layout="channels_last").explain(x, target=[0, 3])
    # Oracle: Grad-CAM over the last axis by autograd, ReLU(Σ_c mean_hw(∂y/∂A[..., c]) A[..., c]).
    features = model.mix(x).detach().requires_grad_()
    ramp = torch.linspace(0.0, 2.0, 8)[None, :, None, None]
    scores = ((features * ramp).mean(dim=(1, 2)) @ model.head)[torch.arange(2), torch.tensor([0, 3])]
    (grads,) = torch.autograd.grad(scores.sum(), features)
    expected = F.relu((grads.mean(dim=(1, 2), keepdim=True) * features).sum(-1)).detach().numpy()
    cam = np.asarray(result.cam)
    assert cam.shape == (2, 8, 8)
    assert float(expected.max()) > 0  # a map that is not all zeros, so the comparison means something
    scale = float(np.abs(expected).max())
    # float32 sums of 6 products of O(1) terms: a few ulps of the largest value.
    np.testing.assert_allclose(cam / scale, expected / scale, atol=1e-5)


def test_one_fitting_reading_is_taken_without_layout() -> None:
    """Undecided but unambiguous: (N, 8, 8, 10) fits only channels last (channels first, 8 × 10 exceeds 8 × 8)."""

    class Wide(Net):
        def __init__(self) -> None:
            super().__init__()
            self.mix.weight = nn.Parameter(torch.randn(3, 10))
            self.head = nn.Parameter(torch.randn(10, 4))

    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(2, 3, 8, 8)
    result = anycam.Explainer(model, "mix").explain(x, target=[1, 2])
    assert np.asarray(result.weights).reshape(2, -1).shape == (2, 10)
    assert np.asarray(result.cam).shape == (2, 8, 8)
