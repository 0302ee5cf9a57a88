"""``Explainer(differentiable=True)`` on torch: maps whose backward reaches the parameters and the input.

Oracle: each method written by hand in plain torch (a forward hook keeps the layer output A on
the graph, ``torch.autograd.grad(score, A, create_graph=True)`` gives G, then the method's formula,
``F.interpolate`` bilinear with half-pixel centres — the core's linear resize for upsampling — and
min-max scaling), and the gradient of the same loss on the map with respect to every parameter and
the input. Both sides run in float64 on a float64 model, so the agreement (1e-5 relative to each
gradient's size) tests the composition, not float32 rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anycam
from anycam.explain.explainer import DIFFERENTIABLE_METHODS

pytest.importorskip("array_api_compat")


def network() -> nn.Module:
    # Seed 1: every method's map of classes 0 and 1 is non-flat for both samples (a flat map's
    # gradient is zero, which would make the comparison vacuous; checked below).
    torch.manual_seed(1)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.Tanh(),  # smooth, so second derivatives below the layer are not all zero
            nn.Conv2d(6, 8, 3, padding=1, stride=2),
            nn.Softplus(),  # positive activations; smooth through the head's double backward
            nn.Conv2d(8, 8, 1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
        .double()
        .eval()
    )


def batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 12, 12, generator=generator, dtype=torch.float64)


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, min=0)


def by_hand(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The method's raw map (N, H, W) from A (N, C, H, W) and G = ∂score/∂A, plain torch."""
    if method == "gradcam":
        return relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    if method == "hirescam":
        return relu((g * a).sum(1))
    if method == "layercam":
        return relu((relu(g) * a).sum(1))
    if method == "gradcam-elementwise":
        return relu(g * a).sum(1)
    if method == "xgradcam":
        weights = (g * a).sum(dim=(2, 3), keepdim=True) / (a.sum(dim=(2, 3), keepdim=True) + 1e-7)
        return relu((weights * a).sum(1))
    if method == "gradcam++":
        # α = g² / (2g² + Σ_s A g³) (Chattopadhay et al. eq. 19), where g ≠ 0.
        sums = a.sum(dim=(2, 3), keepdim=True)
        alpha = g**2 / (2 * g**2 + sums * g**3)
        weights = (alpha * relu(g)).sum(dim=(2, 3), keepdim=True)
        return relu((weights * a).sum(1))
    raise AssertionError(method)


def hand_heatmap(method: str, model: nn.Module, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    handle = model[3].register_forward_hook(lambda module, args, out: kept.append(out))
    try:
        out = model(x)
    finally:
        handle.remove()
    a = kept[0]
    score = out.gather(1, torch.tensor(target)[:, None]).sum()
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    cam = by_hand(method, a, g)
    up = F.interpolate(cam[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = up.amax(dim=(1, 2), keepdim=True)
    return (up - low) / (high - low)


def loss_of(heatmap: torch.Tensor) -> torch.Tensor:
    """Energy of the map outside a box (the training example's penalty), plus a weighted sum."""
    outside = torch.ones_like(heatmap)
    outside[:, 3:8, 2:9] = 0
    ramp = torch.linspace(0, 1, heatmap.numel(), dtype=heatmap.dtype).reshape(heatmap.shape)
    return (heatmap * outside).sum() / heatmap.sum() + (heatmap * ramp).sum()


def gradients_of(
    make: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    loss = loss_of(make(model, x))
    parameters = list(model.parameters())
    # The head's bias does not change any gradient of the score: its gradient is None on both sides.
    grads = torch.autograd.grad(loss, [x, *parameters], allow_unused=True)
    return grads[0], [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads[1:], strict=True)]


@pytest.mark.parametrize("method", DIFFERENTIABLE_METHODS)
def test_differentiable_maps_have_the_hand_written_gradients(method: str) -> None:
    model, x, target = network(), batch(), [0, 1]
    explainer = anycam.Explainer(model, "3", method, differentiable=True)

    def with_anycam(m: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        heatmap = explainer.explain(inputs, target).heatmap
        assert torch.all(heatmap.amax(dim=(1, 2)) == 1)  # no flat map
        return heatmap

    def with_torch(m: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return hand_heatmap(method, m, inputs, target)

    want_x, want_p = gradients_of(with_torch, model, x)
    got_x, got_p = gradients_of(with_anycam, model, x)
    # Every parameter, also those before the layer (the graph is not cut at the layer).
    assert len(got_p) == len(want_p) == 8
    for got, want in zip([got_x, *got_p[:-1]], [want_x, *want_p[:-1]], strict=True):
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert not got_p[-1].any() and not want_p[-1].any()  # the head's bias


def test_differentiable_maps_reach_the_parameters_before_the_layer_and_the_input() -> None:
    """A map whose graph were cut at the layer would give zero gradients below it."""
    model, x = network(), batch().requires_grad_()
    heatmap = anycam.Explainer(model, "3", "gradcam", differentiable=True).explain(x, [0, 1]).heatmap
    assert torch.all(heatmap.amax(dim=(1, 2)) == 1)  # no flat map, whose gradient is zero anyway
    first, last, input_gradient = torch.autograd.grad(loss_of(heatmap), [model[0].weight, model[8].weight, x])
    assert float(first.abs().max()) > 0 and float(last.abs().max()) > 0
    assert float(input_gradient.abs().max()) > 0


@pytest.mark.parametrize(
    "method",
    [
        "eigencam",
        "eigengradcam",
        "kpcacam",
        "randomcam",
        "scorecam",
        "ablationcam",
        "guided-backprop",
        "guided-gradcam",
    ],
)
def test_methods_that_cannot_be_differentiable_are_refused_naming_those_that_can(method: str) -> None:
    with pytest.raises(anycam.ConfigError, match="differentiable methods are gradcam"):
        anycam.Explainer(network(), "3", method, differentiable=True)


def test_a_differentiable_call_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    model.train()  # BatchNorm in training mode would update its running statistics
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)  # a gradient the user accumulated
    before = copy.deepcopy(model.state_dict())
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    x = torch.rand(2, 3, 10, 10, requires_grad=True)
    with pytest.warns(anycam.TrainingModeWarning):
        heatmap = anycam.Explainer(model, "4", "gradcam", differentiable=True).explain(x).heatmap
    assert heatmap.requires_grad
    # Nothing anycam does writes .grad (autograd.grad, never backward), buffers, flags or hooks.
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5))
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("0."))
    assert x.grad is None
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert flags == [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
