"""Issue 19.2: no method changes a model in training mode: buffers, parameters, flags, attributes.

BatchNorm in training mode updates ``running_mean``, ``running_var`` and ``num_batches_tracked``
on every forward pass; anycam runs modules one by one in Ablation-CAM's traced split, so every
path must leave them as they were. The oracle is a deep copy of the model's state taken before.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anycam
from anycam import core

from .nets import ResNet18Shaped


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, set[str]]]:
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {name: module.training for name, module in model.named_modules()}
    attributes = {name: set(module.__dict__) for name, module in model.named_modules()}
    return tensors, flags, attributes


@pytest.mark.parametrize("layer", ["layer4.1.bn2", "layer4"])
@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
def test_no_method_changes_a_model_in_training_mode(method: str, layer: str) -> None:
    torch.manual_seed(0)
    model = ResNet18Shaped(widths=(4, 4, 6, 6)).train()
    model.layer2.eval()  # mixed flags must come back mixed
    x = torch.randn(2, 3, 32, 32)
    tensors, flags, attributes = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        anycam.Explainer(model, layer, method=method, batch_size=4).explain(x, target=[1, 2])
    after, after_flags, after_attributes = _state(model)
    assert after_flags == flags
    assert after_attributes == attributes
    assert after.keys() == tensors.keys()
    changed = [key for key in tensors if not torch.equal(tensors[key], after[key])]
    assert not changed, f"{method} changed {changed[:5]}"
    assert all(p.grad is None for p in model.parameters())


class HalvesItsInput(nn.Module):
    """A forward that modifies its own input in place (not idempotent: every call halves it again)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0.5)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
def test_the_users_input_stays_as_given_and_every_call_sees_it(method: str, kind: str) -> None:
    torch.manual_seed(0)
    model = HalvesItsInput().eval()
    x = torch.randn(2, 3, 6, 6)
    given = x.numpy().copy() if kind == "numpy" else x.clone()
    inputs = x.numpy() if kind == "numpy" else x
    with torch.no_grad():
        expected = model(x.clone())
    explainer = anycam.Explainer(model, "conv", method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        first = explainer.explain(inputs, target=[0, 2])
        second = explainer.explain(inputs, target=[0, 2])
    if kind == "numpy":
        assert (inputs == given).all()
    else:
        assert torch.equal(inputs, given)
    np.testing.assert_allclose(np.asarray(first.scores).reshape(-1), expected[[0, 1], [0, 2]].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(first.heatmap, second.heatmap)
