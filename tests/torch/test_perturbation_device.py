"""Ablation-CAM's ablated copies are built on the model's device (issue 21), with unchanged results.

Before issue 21 each chunk's copies were filled in NumPy and moved into torch; now the layer output
goes to the device once per explanation and the copies are filled there. The values must not
change: the copies hold the same float32 activations with exact zeros, so the maps equal the
host-built path's exactly, and both equal the brute-force oracle of tests/torch/nets.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from anycam.backends.torch import head as torch_head
from anycam.backends.torch.backend import TorchBackend
from torch import nn

import anycam
from anycam.protocol.backend import Backend


def network() -> nn.Module:
    torch.manual_seed(0)
    # Layer "1" is read by a convolution, not a global pooling: Ablation-CAM scores its copies.
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def batch() -> torch.Tensor:
    return torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arrays", ["numpy", "native"])
def test_ablation_copies_reach_the_head_as_device_tensors(monkeypatch: pytest.MonkeyPatch, arrays: str) -> None:
    seen: list[type] = []
    original = torch_head.head_scorer

    def spying(*args: Any, **kwargs: Any) -> Any:
        scorer = original(*args, **kwargs)

        def scores(replacements: Any) -> Any:
            seen.append(type(replacements))
            return scorer(replacements)

        return scores

    monkeypatch.setattr(torch_head, "head_scorer", spying)
    anycam.Explainer(network(), "1", "ablationcam", batch_size=4, arrays=arrays).explain(batch())
    assert len(seen) >= 2  # several chunks
    assert all(kind is torch.Tensor for kind in seen), seen


@pytest.mark.parametrize("target", [None, anycam.top_k(2)])
def test_device_built_ablation_copies_give_the_host_built_maps_exactly(
    monkeypatch: pytest.MonkeyPatch, target: Any
) -> None:
    model, x = network(), batch()
    device_built = anycam.Explainer(model, "1", "ablationcam", batch_size=5).explain(x, target)
    monkeypatch.setattr(TorchBackend, "ablation_scorer", Backend.ablation_scorer)
    host_built = anycam.Explainer(model, "1", "ablationcam", batch_size=5).explain(x, target)
    np.testing.assert_array_equal(device_built.weights, host_built.weights)
    np.testing.assert_array_equal(device_built.heatmap, host_built.heatmap)


def test_device_built_ablation_copies_zero_exactly_the_channel_of_each_copy() -> None:
    """The copies themselves, against a plain-torch construction."""
    model, x = network(), batch()
    explainer = anycam.Explainer(model, "1", "ablationcam")
    backend = explainer.backend
    spec = anycam.core.parse_target(None)
    capture = backend.capture(x, spec, gradients=False)
    got: list[torch.Tensor] = []
    original = torch_head.head_scorer

    def keeping(*args: Any, **kwargs: Any) -> Any:
        scorer = original(*args, **kwargs)
        return lambda copies: (got.append(copies.clone()), scorer(copies))[1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_head, "head_scorer", keeping)
        scorer = backend.ablation_scorer(x, spec, capture.target, capture.activations[0], 1)
        scorer(np.array([4, 0, 5]))
    acts = torch.from_numpy(capture.activations[0])
    want = acts.expand(3, *acts.shape).clone()
    for b, channel in enumerate([4, 0, 5]):
        want[b, :, channel] = 0
    assert torch.equal(got[0], want)
