"""Messages and dtypes at the torch boundary (issues 19.4/19.14, 19.13, 20.6).

* several inputs with different batch sizes: one InputError naming each input and its N;
* bfloat16 and float16 models: every method runs, and its scores are the model's own;
* a layer name with no close match: the error lists the top-level modules and layer=None.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anycam
from anycam import core


class TwoInputs(nn.Module):
    """An image and a metadata vector per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.meta = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.fc(pooled + self.meta(meta))


@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_inputs_with_different_batch_sizes_are_refused_naming_each(form: str, method: str) -> None:
    """One image with three metadata rows: broadcasting would explain three samples of one image."""
    torch.manual_seed(0)
    model = TwoInputs().eval()
    image, meta = torch.randn(1, 3, 8, 8), torch.randn(3, 4)
    inputs = (image, meta) if form == "tuple" else {"image": image, "meta": meta}
    explainer = anycam.Explainer(model, "conv", method=method, spatial_input=0 if form == "tuple" else "image")
    with pytest.raises(anycam.InputError) as info:
        explainer.explain(inputs, target=0)
    message = str(info.value)
    first, second = ("0", "1") if form == "tuple" else ("'image'", "'meta'")
    assert f"{first}: N=1" in message and f"{second}: N=3" in message, message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
def test_half_precision_models_run_every_method_with_their_own_scores(method: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
        .eval()
        .to(dtype)
    )
    x = torch.randn(2, 3, 8, 8).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        result = anycam.Explainer(model, "2", method=method).explain(x, target=[0, 2])
    with torch.no_grad():
        expected = model(x).float()[[0, 1], [0, 2]].numpy()
    np.testing.assert_array_equal(np.asarray(result.scores).reshape(-1), expected)
    assert np.isfinite(np.asarray(result.heatmap)).all()


def test_an_unknown_layer_with_no_close_name_lists_the_top_level_modules_and_layer_none() -> None:
    model = TwoInputs()
    with pytest.raises(anycam.LayerError) as info:
        anycam.Explainer(model, "layer4")
    message = str(info.value)
    assert all(repr(name) in message for name in ("conv", "meta", "fc")), message
    assert "layer=None" in message
