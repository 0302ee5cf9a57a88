"""Guided backpropagation and Guided Grad-CAM in torch: every ReLU spelling, the model and torch left as
they were, the warning for a model without ReLU, and the guided sanity check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anycam


class _Guided(torch.autograd.Function):
    """The guided rule written out for the oracle (independent of anycam's)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype)


class Functional(nn.Module):
    """Every way to spell ReLU in a forward; ``guided=True`` spells each as the oracle's rule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)
        self.guided = False

    def relu(self, x: torch.Tensor, spelling: str) -> torch.Tensor:
        if self.guided:
            return _Guided.apply(x)  # type: ignore[no-any-return]
        if spelling == "F":
            return F.relu(x)
        if spelling == "torch":
            return torch.relu(x)
        if spelling == "method":
            return x.relu()
        if spelling == "inplace":
            x.relu_()  # the return value ignored on purpose: the in-place contract must hold
            return x
        if spelling == "F_inplace":
            return F.relu(x, inplace=True)
        return self.act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x), "F")
        x = self.relu(x * 1.5 - 0.1, "torch")
        x = self.relu(self.conv2(x), "method")
        x = self.relu(x - 0.05, "inplace")
        x = self.relu(self.conv3(x), "F_inplace")
        x = self.relu(x - 0.01, "module")
        return self.fc(x.mean(dim=(2, 3)))


def _guided_oracle(model: Functional, x: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    twin = copy.deepcopy(model)
    twin.guided = True
    leaf = x.clone().requires_grad_()
    out = twin(leaf)
    (grad,) = torch.autograd.grad(out.gather(1, torch.as_tensor(classes)[:, None]).sum(), leaf)
    return grad.numpy()


def _plain_gradient(model: nn.Module, x: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf).gather(1, torch.as_tensor(classes)[:, None]).sum(), leaf)
    return grad.numpy()


@pytest.fixture
def functional() -> tuple[Functional, torch.Tensor]:
    torch.manual_seed(0)
    return Functional().eval(), torch.randn(2, 3, 8, 8)


def test_guided_backprop_catches_every_relu_spelling(functional) -> None:  # type: ignore[no-untyped-def]
    model, x = functional
    result = anycam.Explainer(model, "conv3", method="guided-backprop").explain(x)
    expected = _guided_oracle(model, x, result.target)
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-4, atol=1e-7)
    # The test has teeth: the guided rule changes the gradient on this model.
    plain = _plain_gradient(model, x, result.target)
    assert np.abs(plain - expected).max() > 0.1 * np.abs(expected).max()


def test_guided_leaves_the_model_and_torch_as_they_were_also_after_an_exception(functional) -> None:  # type: ignore[no-untyped-def]
    model, x = functional
    state = copy.deepcopy(model.state_dict())
    explainer = anycam.Explainer(model, "conv3", method="guided-gradcam")
    explainer.explain(x, target=1)

    def broken(output: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        explainer.explain(x, target=broken)
    assert torch._C._len_torch_function_stack() == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    # After the call the ReLUs are plain again: an ordinary backward gives the plain gradient.
    classes = np.array([1, 1])
    np.testing.assert_allclose(
        _plain_gradient(model, x, classes), _plain_gradient(copy.deepcopy(model), x, classes), rtol=0, atol=0
    )
    assert not np.allclose(_plain_gradient(model, x, classes), _guided_oracle(model, x, classes))


def test_a_model_without_relu_warns_that_guided_equals_the_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="no ReLU"):
        result = anycam.Explainer(model, "0", method="guided-backprop").explain(x, target=0)
    np.testing.assert_allclose(result.attribution, _plain_gradient(model, x, np.array([0, 0])), rtol=1e-5, atol=1e-7)


def test_sanity_check_compares_guided_attributions_at_input_resolution(functional) -> None:  # type: ignore[no-untyped-def]
    from anycam.metrics.sanity import replace_explainer, sanity_check, spearman

    model, x = functional
    explainer = anycam.Explainer(model, "conv3", method="guided-backprop")
    result = sanity_check(explainer, x, target=1, mode="full")
    order = explainer.backend.parameter_layers(x)
    randomized = replace_explainer(
        explainer, backend=explainer.backend.randomized(list(reversed(order)), seed=len(order) - 1)
    )
    original, flipped = explainer.explain(x, 1).attribution, randomized.explain(x, 1).attribution
    signed = [a.sum(axis=1).reshape(len(x), -1) for a in (original, flipped)]
    np.testing.assert_allclose(result.spearman[-1], spearman(*signed), atol=1e-12)
    np.testing.assert_allclose(result.spearman_abs[-1], spearman(*(np.abs(m) for m in signed)), atol=1e-12)
