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


# -- Score-CAM: masked inputs made on the device ------------------------------------------------


@pytest.mark.parametrize("arrays", ["numpy", "native"])
def test_scorecam_masked_inputs_reach_the_model_as_device_tensors(monkeypatch: pytest.MonkeyPatch, arrays: str) -> None:
    seen: list[type] = []
    original = TorchBackend.input_scores

    def spying(self: TorchBackend, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(type(inputs))
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "input_scores", spying)
    anycam.Explainer(network(), "3", "scorecam", batch_size=5, arrays=arrays).explain(batch())
    assert len(seen) >= 2
    assert all(kind is torch.Tensor for kind in seen), seen


def masked_by_hand(x: torch.Tensor, acts: torch.Tensor, corners: bool) -> torch.Tensor:
    """Score-CAM's masked inputs in plain torch: (N, C, *input) = x · minmax(upsample(A_c))."""
    n, c = acts.shape[:2]
    up = torch.nn.functional.interpolate(
        acts.double(), size=x.shape[2:], mode="bilinear", align_corners=corners
    ).reshape(n, c, -1)
    low, high = up.amin(-1, keepdim=True), up.amax(-1, keepdim=True)
    span = high - low
    masks = torch.where(span > 0, (up - low) / torch.where(span > 0, span, 1), 0).reshape(n, c, *x.shape[2:])
    return x.double()[:, None] * masks[:, :, None]


@pytest.mark.parametrize("variant", ["probability", "pytorch-grad-cam"])
def test_device_masked_inputs_are_the_plain_torch_masked_inputs(monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    model, x = network(), batch()
    got: list[torch.Tensor] = []
    original = TorchBackend.input_scores

    def keeping(self: TorchBackend, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        got.append(inputs.clone())
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "input_scores", keeping)
    anycam.Explainer(model, "3", "scorecam", scorecam=variant, batch_size=8).explain(x)
    kept: list[torch.Tensor] = []
    handle = model[3].register_forward_hook(lambda module, args, out: kept.append(out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    want = masked_by_hand(x, kept[0], corners=variant == "pytorch-grad-cam").reshape(-1, *x.shape[1:])
    # Rows are (sample, channel) in order; float32 masks of values in [0, 1]: ≤ 2 ulp of x.
    torch.testing.assert_close(torch.cat(got).double(), want, rtol=0, atol=3e-7)


@pytest.mark.parametrize("top_k", [None, 3])
def test_scorecam_native_equals_the_numpy_mode(top_k: int | None) -> None:
    model, x = network(), batch()
    reference = anycam.Explainer(model, "3", "scorecam", scorecam_top_k=top_k).explain(x)
    native = anycam.Explainer(model, "3", "scorecam", scorecam_top_k=top_k, arrays="native").explain(x)
    assert isinstance(native.cam, torch.Tensor) and isinstance(native.weights, torch.Tensor)
    np.testing.assert_allclose(native.weights.numpy(), reference.weights, rtol=1e-6, atol=1e-7)
    # The map: a float32 C-term sum on the device against float64 on the host, so within 1e-5 of
    # Σ_c |w_c A_c| per pixel (A read with a plain hook).
    kept: list[torch.Tensor] = []
    handle = model[3].register_forward_hook(lambda module, args, out: kept.append(out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    terms = np.einsum("nc,nchw->nhw", np.abs(reference.weights), kept[0].double().numpy())
    assert np.all(np.abs(native.cam.numpy() - reference.cam) <= 1e-5 * np.abs(reference.cam) + 1e-5 * terms + 1e-7)
