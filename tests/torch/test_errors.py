"""torch specifics of issue 10: training-mode submodules, buffers, dtype/device casts,
inference-mode weights, and the zero-map warning. Each failed before its fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anycam


class Net(nn.Module):
    def __init__(self, head_scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(6, 4)
        self.head_scale = head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(a).mean((2, 3)) * self.head_scale)


def _net(**kwargs: float) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_a_submodule_in_training_mode_warns_and_buffers_are_not_updated() -> None:
    """Item 12: the root is in eval mode, one BatchNorm is not."""
    model = _net()
    model.bn.train()
    mean, var, tracked = model.bn.running_mean.clone(), model.bn.running_var.clone(), int(model.bn.num_batches_tracked)
    explainer = anycam.Explainer(model, "conv")
    with pytest.warns(anycam.TrainingModeWarning, match=r"bn \(BatchNorm2d\)") as record:
        explainer(X)
    assert [w.filename for w in record] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error", anycam.TrainingModeWarning)
        explainer(X)  # once per Explainer
        explainer.backend.predict(X)
    assert torch.equal(model.bn.running_mean, mean) and torch.equal(model.bn.running_var, var)
    assert int(model.bn.num_batches_tracked) == tracked
    assert model.bn.training and not model.training  # modes are the user's


def test_dropout_in_training_mode_warns() -> None:
    model = _net()
    model.drop.train()
    with pytest.warns(anycam.TrainingModeWarning, match=r"drop \(Dropout\)"):
        anycam.Explainer(model, "conv")(X)


def test_an_eval_model_gives_no_training_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", anycam.TrainingModeWarning)
        anycam.Explainer(_net(), "conv")(X)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_floating_tensors_are_cast_to_the_model_dtype(dtype: torch.dtype) -> None:
    """Item 13: a float32 tensor into a float64 / bfloat16 model, as NumPy inputs already are."""
    model = _net().to(dtype)
    from_tensor = anycam.Explainer(model, "conv").explain(X)
    from_model_dtype = anycam.Explainer(model, "conv").explain(X.to(dtype))
    np.testing.assert_array_equal(from_tensor.cam, from_model_dtype.cam)
    assert from_tensor.heatmap.dtype == np.float32


def test_weights_made_under_inference_mode_get_a_clear_error() -> None:
    """Item 14: "Inference tensors cannot be saved for backward" becomes an error with the fix."""
    with torch.inference_mode():
        model = _net()
    with pytest.raises(anycam.BackendError, match=r"inference_mode.*copy.deepcopy\(model\)"):
        anycam.Explainer(model, "conv")(X)
    import copy

    assert anycam.Explainer(copy.deepcopy(model), "conv")(X).shape == (2, 8, 8)


def test_an_all_zero_map_warns_once_and_stays_zero() -> None:
    """Item 5: a layer whose gradient is zero (the head ignores it) gives zeros, never NaN."""
    explainer = anycam.Explainer(_net(head_scale=0.0), "conv")
    with pytest.warns(anycam.ZeroMapWarning, match=r"layer 'conv' gives an all-zero map.*gradient is zero") as record:
        heat = explainer(X)
    assert np.all(heat == 0) and not np.isnan(heat).any()
    # The warning points at the user's call, not into anycam.
    assert [w.filename for w in record] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error", anycam.ZeroMapWarning)
        explainer(X)


def test_a_negative_map_names_the_pre_activation_cause() -> None:
    """Item 5: Grad-CAM where every weighted sum is negative (ReLU removes it all)."""

    class Negative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x)
            return (-(a.abs() + 1)).mean((2, 3))

    with torch.no_grad():
        model = Negative().eval()
        model.conv.weight.zero_()
        model.conv.bias.fill_(1.0)
    with pytest.warns(anycam.ZeroMapWarning, match="pre-activation"):
        assert np.all(anycam.Explainer(model, "conv")(X, target=0) == 0)


def test_an_input_that_cannot_be_moved_to_the_model_device_is_a_clear_error() -> None:
    """Item 13: the device move is tried, and its failure names both devices."""
    explainer = anycam.Explainer(_net(), "conv")
    with pytest.raises(anycam.InputError, match=r"on meta, the model's weights are torch.float32 on cpu"):
        explainer(torch.empty(2, 3, 8, 8, device="meta"))
