"""Ablation-CAM's copies in torch: a skip over the layer with the prefix run once (traced, untraceable,
no vmap rule), a layer's input port, and a head that mixes the batch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anycam

from .nets import Residual


def _zeroing_oracle(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    """Ablation-CAM weights by really zeroing each channel of ``layer`` in a hooked full forward."""
    with torch.no_grad():
        y = model(x).gather(1, torch.as_tensor(classes)[:, None])[:, 0].double()
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, a, out: store.setdefault("a", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    weights = []
    for channel in range(store["a"].shape[1]):

        def zero(module: nn.Module, args: object, out: torch.Tensor, channel: int = channel) -> torch.Tensor:
            out = out.clone()
            out[:, channel] = 0
            return out

        handle = layer.register_forward_hook(zero)
        with torch.no_grad():
            ablated = model(x).gather(1, torch.as_tensor(classes)[:, None])[:, 0].double()
        handle.remove()
        weights.append(((y - ablated) / y).numpy())
    return np.stack(weights, axis=1)


def _counting(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda m, a, out: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("variant", ["traced", "untraceable", "no_vmap_rule"])
def test_ablationcam_with_a_skip_over_the_layer_and_the_prefix_run_once(variant: str) -> None:
    torch.manual_seed(1)
    model = Residual(dynamic=variant == "untraceable", item=variant == "no_vmap_rule").eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 6, 6)
    explainer = anycam.Explainer(model, "conv1", method="ablationcam", batch_size=3)  # one copy per chunk
    stem_calls = _counting(model.stem)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explainer.explain(x)
    expected = _zeroing_oracle(model, model.conv1, x, result.target)
    stem_calls[0] -= 2 + 6  # the oracle's forwards
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-6)
    if variant == "traced":
        # The capture's forward and one prefix for all 6 chunks: the stem ran twice.
        assert stem_calls[0] == 2
        assert not [w for w in caught if "vectorised" in str(w.message)]
    elif variant == "untraceable":
        assert stem_calls[0] == 1 + 6  # documented fallback: one prefix per chunk
    else:
        assert any("cannot be vectorised" in str(w.message) for w in caught)


def test_ablationcam_explains_a_layer_input_port() -> None:
    torch.manual_seed(2)
    model = Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    result = anycam.Explainer(model, "conv2:input", method="ablationcam").explain(x, target=3)
    # conv2's input is relu(conv1(x)): zero channel k of it by a pre-hook.
    with torch.no_grad():
        y = model(x)[:, 3].double()
    weights = []
    for channel in range(6):

        def zero(module: nn.Module, args: tuple[torch.Tensor, ...], channel: int = channel) -> tuple[torch.Tensor]:
            value = args[0].clone()
            value[:, channel] = 0
            return (value,)

        handle = model.conv2.register_forward_pre_hook(zero)
        with torch.no_grad():
            weights.append(((y - model(x)[:, 3].double()) / y).numpy())
        handle.remove()
    np.testing.assert_allclose(result.weights, np.stack(weights, axis=1), rtol=1e-4, atol=1e-6)


class BatchMixing(nn.Module):
    """A head that mixes the samples of a batch (centres over the batch): copies must not share one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc(features - features.mean(dim=0, keepdim=True)) + 2.0


def test_ablationcam_keeps_copies_apart_when_the_head_mixes_the_batch() -> None:
    torch.manual_seed(5)
    model = BatchMixing().eval()
    x = torch.randn(3, 3, 5, 5)
    result = anycam.Explainer(model, "conv", method="ablationcam").explain(x, target=1)
    expected = _zeroing_oracle(model, model.conv, x, np.array([1, 1, 1]))
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-6)
