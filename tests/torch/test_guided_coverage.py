"""Issue 19.7: guided backpropagation reaches every ReLU spelling, including ``clamp(min=0)``; a ReLU
on the model's own input changes neither the scores nor the user's tensor; TorchScript submodules
get a precise warning. The oracle is the guided rule written out in the model itself."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anycam


class _Guided(torch.autograd.Function):
    """The guided rule written out for the oracle: ReLU forward, ReLU(grad)·[x > 0] backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return torch.where(x > 0, x, torch.zeros_like(x))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return torch.where((x > 0) & (grad > 0), grad, torch.zeros_like(grad))


SPELLINGS = (
    "clamp_min_kw",
    "clamp_positional",
    "torch_clamp",
    "clamp_min",
    "clip",
    "clamp_inplace",
    "clamp_min_inplace",
    "relu_inplace_ignored",
)


class Clamps(nn.Module):
    """A ReLU spelled as ``spelling`` after each convolution; ``guided=True`` uses the oracle's rule.

    With ``input_relu`` the forward first applies ``x.relu_()`` to its own input, discarding the
    return value, so only the in-place contract carries it on.
    """

    def __init__(self, spelling: str, input_relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.spelling, self.input_relu, self.guided = spelling, input_relu, False

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        if self.guided:
            return _Guided.apply(x)  # type: ignore[no-any-return]
        s = self.spelling
        if s == "clamp_min_kw":
            return x.clamp(min=0)
        if s == "clamp_positional":
            return x.clamp(0)
        if s == "torch_clamp":
            return torch.clamp(x, min=0.0)
        if s == "clamp_min":
            return x.clamp_min(0)
        if s == "clip":
            return torch.clip(x, 0)
        if s == "clamp_inplace":
            x.clamp_(min=0)
            return x
        if s == "clamp_min_inplace":
            return x.clamp_min_(0)
        x.relu_()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_relu:
            x = self.relu(x) if self.guided else x
            if not self.guided:
                x.relu_()
        x = self.relu(self.conv1(x) * 1.0)
        x = self.relu(self.conv2(x) - 0.05)
        return self.fc(x.mean(dim=(2, 3)))


def _oracle(model: Clamps, x: torch.Tensor, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(guided gradients (N, C, H, W), scores (N,)) from a copy running the rule written out."""
    twin = copy.deepcopy(model)
    twin.guided = True
    leaf = x.clone().requires_grad_()
    scores = twin(leaf).gather(1, torch.as_tensor(classes)[:, None])[:, 0]
    (grad,) = torch.autograd.grad(scores.sum(), leaf)
    return grad.numpy(), scores.detach().numpy()


@pytest.mark.parametrize("input_relu", [False, True])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_guided_backprop_guides_every_clamp_spelling_and_leaves_the_input(spelling: str, input_relu: bool) -> None:
    torch.manual_seed(0)
    model = Clamps(spelling, input_relu).eval()
    x = torch.randn(2, 3, 8, 8)
    given = x.clone()
    classes = [1, 3]
    expected, scores = _oracle(model, x, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", anycam.AnycamWarning)  # every ReLU is reached: no warning
        result = anycam.Explainer(model, "conv2", method="guided-backprop").explain(x, target=classes)
    torch.testing.assert_close(x, given, rtol=0, atol=0)  # the user's tensor as given
    np.testing.assert_allclose(np.asarray(result.scores).reshape(-1), scores, rtol=1e-5, atol=1e-6)
    got = np.asarray(result.attribution).reshape(expected.shape)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got / scale, expected / scale, atol=1e-6)


def test_clamp_with_an_upper_bound_is_not_a_relu() -> None:
    """``clamp(0, 6)`` (ReLU6) and ``clamp(min=0.5)`` are not ReLUs: nothing guided, the plain gradient."""

    class Bounded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x).clamp(0, 6).clamp(min=0.5)
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Bounded().eval()
    x = torch.randn(2, 3, 6, 6)
    leaf = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)
    with pytest.warns(anycam.AnycamWarning, match="calls no ReLU"):
        result = anycam.Explainer(model, "conv", method="guided-backprop").explain(x, target=0)
    np.testing.assert_allclose(np.asarray(result.attribution).reshape(plain.shape), plain.numpy(), atol=1e-6)


class _Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(x - 0.1)
        return torch.relu(x * 2.0)


class _Host(nn.Module):
    def __init__(self, scripted: bool) -> None:
        super().__init__()
        stage = _Stage()
        self.encoder = torch.jit.script(stage) if scripted else stage
        self.conv = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(self.encoder(x))).mean(dim=(2, 3)))


def test_relus_inside_a_torchscript_submodule_are_named_in_the_warning() -> None:
    torch.manual_seed(0)
    model = _Host(scripted=True).eval()
    with pytest.warns(anycam.AnycamWarning) as record:
        anycam.Explainer(model, "conv", method="guided-backprop").explain(torch.randn(2, 3, 6, 6), target=0)
    messages = [str(w.message) for w in record if isinstance(w.message, anycam.AnycamWarning)]
    assert len(messages) == 1, messages
    assert "no ReLU" not in messages[0]
    assert "TorchScript" in messages[0] and "encoder (4)" in messages[0] and "1 ReLU calls outside" in messages[0]


def test_a_python_submodule_gives_no_warning() -> None:
    torch.manual_seed(0)
    model = _Host(scripted=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", anycam.AnycamWarning)
        anycam.Explainer(model, "conv", method="guided-backprop").explain(torch.randn(2, 3, 6, 6), target=0)


def test_guided_backprop_under_the_callers_inference_mode() -> None:
    torch.manual_seed(0)
    model = Clamps("clamp_min_kw").eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 8, 8)
        result = anycam.Explainer(model, "conv2", method="guided-backprop").explain(x, target=[0, 1])
    expected, _ = _oracle(model, x.clone(), [0, 1])
    np.testing.assert_allclose(np.asarray(result.attribution).reshape(expected.shape), expected, atol=1e-6)
