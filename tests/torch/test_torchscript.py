"""Issue 19.11: TorchScript models (``torch.jit.script`` and ``torch.jit.trace``).

A layer that TorchScript runs is refused with an anycam error showing the wrapper recipe, for a
named layer, a ``:input`` port and ``layer=None``; the recipe itself works (Grad-CAM against
plain autograd on the scripted parts); a Python model with a scripted submodule still chooses a
layer for ``layer=None`` among its Python modules.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anycam

from .nets import brute_force_ablation, torch_gradcam


def _parts() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return features.eval(), head.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _compiled(how: str) -> nn.Module:
    features, head = _parts()
    model = nn.Sequential(*features, *head).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in new torch
        return torch.jit.script(model) if how == "script" else torch.jit.trace(model, X)


@pytest.mark.parametrize("layer", ["2", "3:input", None])
@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam", "guided-gradcam"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_layer_inside_torchscript_is_refused_with_the_wrapper_recipe(how: str, method: str, layer: str) -> None:
    model = _compiled(how)
    with pytest.raises(anycam.BackendError, match="TorchScript") as info:
        anycam.Explainer(model, layer, method=method).explain(X, target=0)
    message = str(info.value)
    assert ("scripted module" if how == "script" else "traced module") in message
    assert "class Part(torch.nn.Module)" in message and 'anycam.Explainer(Split(features, head), "features")' in message


class Part(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.inner(*args)  # type: ignore[no-any-return]


class Split(nn.Module):
    """The recipe the error shows, verbatim but for type hints."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features, self.head = Part(features), Part(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("layer", ["features", None])
def test_the_recipe_explains_scripted_parts(layer: str | None) -> None:
    features, head = _parts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted_features, scripted_head = torch.jit.script(features), torch.jit.trace(head, features(X))
    model = Split(scripted_features, scripted_head).eval()
    result = anycam.Explainer(model, layer).explain(X, target=[0, 2])
    with torch.no_grad():
        activations = scripted_features(X)
    expected = torch_gradcam(activations, scripted_head, [0, 2])
    assert result.layer == "features"
    np.testing.assert_allclose(np.asarray(result.cam), expected, rtol=1e-5, atol=1e-6)
    ablation = anycam.Explainer(model, "features", method="ablationcam").explain(X, target=[0, 2])
    _, weights = brute_force_ablation(model, "features", X, [0, 2])
    np.testing.assert_allclose(np.asarray(ablation.weights).reshape(weights.shape), weights, atol=1e-4)
