"""torch: several inputs (tuple, list, dict, model_kwargs), the spatial input, and a key the model does
not take.

Every map is checked against Grad-CAM written here in plain torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import anycam

from .nets import IMAGE, META, TARGET, torch_gradcam


class TwoInputs(nn.Module):
    """An image modulated by a metadata vector (FiLM), with a keyword-only scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.film = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 5)

    def head(self, activations: torch.Tensor, meta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        mixed = torch.tanh(activations * self.film(meta)[:, :, None, None]) * scale
        return self.fc(mixed.mean((2, 3)))

    def forward(self, image: torch.Tensor, meta: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.conv(image), meta, scale)


@pytest.fixture
def two() -> TwoInputs:
    torch.manual_seed(0)
    return TwoInputs().eval()


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "dict_meta_first", "numpy_tuple"])
def test_tuple_list_and_dict_inputs_match_autograd(two: TwoInputs, form: str) -> None:
    inputs: object = {
        "tuple": (IMAGE, META),
        "list": [IMAGE, META],
        "dict": {"image": IMAGE, "meta": META},
        "dict_meta_first": {"meta": META, "image": IMAGE},  # the image is found, wherever it is
        "numpy_tuple": (IMAGE.numpy(), META.numpy()),
    }[form]
    result = anycam.Explainer(two, "conv", normalize=None).explain(inputs, target=TARGET)
    with torch.no_grad():
        activations = two.conv(IMAGE)
    expected = torch_gradcam(activations, lambda a: two.head(a, META), TARGET)
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-7)
    assert result.heatmap.shape == (2, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(result.scores, two(IMAGE, META)[[0, 1], TARGET].numpy(), rtol=1e-6)


def test_model_kwargs_reach_every_call(two: TwoInputs) -> None:
    explainer = anycam.Explainer(two, "conv", normalize=None, model_kwargs={"scale": 3.0})
    result = explainer.explain((IMAGE, META), target=TARGET)
    with torch.no_grad():
        activations = two.conv(IMAGE)
        logits = two(IMAGE, META, scale=3.0)
    expected = torch_gradcam(activations, lambda a: two.head(a, META, 3.0), TARGET)
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(explainer.backend.predict((IMAGE, META)), logits.numpy(), rtol=1e-6)
    # Without the constant the scores differ: the kwarg really was passed.
    plain = anycam.Explainer(two, "conv").explain((IMAGE, META), target=TARGET)
    assert not np.allclose(plain.scores, result.scores)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_scorecam_masks_the_spatial_input_and_keeps_the_others(two: TwoInputs, form: str) -> None:
    inputs: object = (IMAGE, META) if form == "tuple" else {"meta": META, "image": IMAGE}
    # batch_size=5 with 2 × 6 masked copies: chunks mix samples, so rows of meta must follow.
    explainer = anycam.Explainer(two, "conv", method="scorecam", normalize=None, batch_size=5)
    result = explainer.explain(inputs, target=TARGET)
    with torch.no_grad():
        activations = two.conv(IMAGE).double()
        up = torch.nn.functional.interpolate(activations, size=(8, 8), mode="bilinear", align_corners=False)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = ((up - low) / (high - low)).float()
        weights = torch.stack(
            [two(IMAGE * masks[:, k : k + 1], META).softmax(1)[[0, 1], TARGET] for k in range(6)], dim=1
        ).double()
    expected = torch.relu((weights[:, :, None, None] * activations).sum(1)).numpy()
    np.testing.assert_allclose(result.weights, weights.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-6)


class TwoImages(nn.Module):
    """Two images of different sizes; the explained conv sees the second."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 4, 3, padding=1)
        self.large = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([self.small(small).mean((2, 3)), torch.tanh(self.large(large)).mean((2, 3))], 1)
        return self.fc(pooled)


def test_spatial_input_sets_the_heatmap_resolution() -> None:
    torch.manual_seed(0)
    model = TwoImages().eval()
    small, large = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 12, 12)
    default = anycam.Explainer(model, "large").explain((small, large), target=0)
    chosen = anycam.Explainer(model, "large", spatial_input=1).explain((small, large), target=0)
    keyed = anycam.Explainer(model, "large", spatial_input="large").explain({"small": small, "large": large}, 0)
    assert default.heatmap.shape == (2, 8, 8)  # the first floating map
    assert chosen.heatmap.shape == keyed.heatmap.shape == (2, 12, 12)
    np.testing.assert_allclose(chosen.cam, default.cam)
    np.testing.assert_allclose(keyed.heatmap, chosen.heatmap)
    with pytest.raises(anycam.InputError, match=r"spatial_input=2 names no input; the inputs are 0: \(2, 3, 8, 8\)"):
        anycam.Explainer(model, "large", spatial_input=2)((small, large))
    with pytest.raises(anycam.InputError, match="spatial_input='big' names no input.*'large': \\(2, 3, 12, 12\\)"):
        anycam.Explainer(model, "large", spatial_input="big")({"small": small, "large": large})
    # Score-CAM masks the input named by spatial_input, at its own resolution.
    scored = anycam.Explainer(model, "large", method="scorecam", spatial_input=1).explain((small, large), target=0)
    assert scored.heatmap.shape == (2, 12, 12)
    with torch.no_grad():
        acts = model.large(large).double()
        up = torch.nn.functional.interpolate(acts, size=(12, 12), mode="bilinear", align_corners=False)
        masks = (up - up.amin((2, 3), keepdim=True)) / (up.amax((2, 3), keepdim=True) - up.amin((2, 3), keepdim=True))
        probabilities = [model(small, large * masks[:, k : k + 1].float()).softmax(1)[:, 0] for k in range(4)]
    np.testing.assert_allclose(scored.weights, torch.stack(probabilities, 1).numpy(), rtol=1e-5, atol=1e-7)


class PixelValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.conv(pixel_values).mean((2, 3)))


def test_a_key_the_model_does_not_take_wraps_the_framework_message() -> None:
    model = PixelValues().eval()
    explainer = anycam.Explainer(model, "conv")
    heat = explainer({"pixel_values": IMAGE})
    assert heat.shape == (2, 8, 8)
    with pytest.raises(anycam.InputError, match="keys 'pixel_value'.*unexpected keyword argument 'pixel_value'"):
        explainer({"pixel_value": IMAGE})
    with pytest.raises(anycam.InputError, match="model_kwargs 'colour'"):
        anycam.Explainer(model, "conv", model_kwargs={"colour": 1})(IMAGE)
    with pytest.raises(anycam.InputError, match="3 positional"):
        explainer((IMAGE, None, IMAGE))
    # An error raised inside forward is not mistaken for a signature mismatch: it is the
    # input's (issue 10, item 8), with the framework's error as the cause.
    with pytest.raises(anycam.InputError, match=r"shape \(2, 5, 8, 8\)") as info:
        explainer({"pixel_values": torch.randn(2, 5, 8, 8)})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "keys" not in str(info.value)
