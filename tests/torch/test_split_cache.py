"""Issue 19.1: Ablation-CAM's traced split is never stale, and tracing never writes to the model.

``torch.fx`` bakes Python values into the graph (``F.dropout(training=self.training)``,
``x * self.gain``); the oracle is the brute force in ``nets.brute_force_ablation`` on the model
as it is at the call.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import anycam

from .nets import brute_force_ablation


class Gained(nn.Module):
    """conv → (explained) conv → dropout(training=self.training) → × self.gain → pool → dense;
    ``forward`` also keeps the feature map on ``self.last``, and scales by a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.features = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)
        self.gain = 1.0
        self.scale = torch.tensor([1.0, 2.0, 0.5, 1.5])  # a plain attribute, not a buffer
        self.keep = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.features(torch.tanh(self.stem(x)))
        if self.keep:
            self.last = b
        b = F.dropout(b, 0.5, training=self.training) * self.gain
        return torch.tanh(self.fc(b.mean(dim=(2, 3)))) * self.scale


def _explain(explainer: anycam.Explainer, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        return np.asarray(explainer.explain(x, target=classes).weights).reshape(len(classes), -1)


def _model() -> tuple[Gained, torch.Tensor, list[int]]:
    torch.manual_seed(0)
    return Gained(), torch.randn(3, 3, 8, 8), [0, 3, 1]


def test_a_split_traced_in_training_mode_is_not_reused_after_eval() -> None:
    model, x, classes = _model()
    model.train()
    explainer = anycam.Explainer(model, "features", method="ablationcam")
    _explain(explainer, x, classes)  # traced with dropout active
    model.eval()
    first, second = _explain(explainer, x, classes), _explain(explainer, x, classes)
    _, expected = brute_force_ablation(model, "features", x, classes)
    np.testing.assert_allclose(first, expected, atol=1e-4)
    np.testing.assert_array_equal(first, second)


def test_a_changed_python_attribute_is_read_at_the_next_call() -> None:
    model, x, classes = _model()
    model.eval()
    explainer = anycam.Explainer(model, "features", method="ablationcam")
    _explain(explainer, x, classes)
    model.gain = -2.0
    got = _explain(explainer, x, classes)
    _, expected = brute_force_ablation(model, "features", x, classes)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # A plain tensor attribute replaced by another one: also read at the call.
    model.scale = torch.tensor([0.5, -1.0, 2.0, 1.0])
    got = _explain(explainer, x, classes)
    _, expected = brute_force_ablation(model, "features", x, classes)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_tracing_never_writes_to_the_model() -> None:
    """A forward that stores an intermediate (``self.last = b``) gets no proxy, and the tracer's
    constants (``_tensor_constant0`` for a plain tensor attribute) are not parked on the model."""
    model, x, classes = _model()
    model.eval()
    model.keep = True
    before = {name: dict(module.__dict__) for name, module in model.named_modules()}
    explainer = anycam.Explainer(model, "features", method="ablationcam")
    got = _explain(explainer, x, classes)
    for name, module in model.named_modules():
        added = set(module.__dict__) - set(before[name])
        assert added <= {"last"}, f"{name or 'the model'} gained {added}"
        for key, value in module.__dict__.items():
            assert not isinstance(value, torch.fx.Proxy), f"{name}.{key} is a torch.fx.Proxy"
        assert set(module._parameters) == set(before[name]["_parameters"])
        assert set(module._buffers) == set(before[name]["_buffers"])
        assert set(module._modules) == set(before[name]["_modules"])
    assert isinstance(model.last, torch.Tensor) and not isinstance(model.last, torch.fx.Proxy)
    _, expected = brute_force_ablation(model, "features", x, classes)
    np.testing.assert_allclose(got, expected, atol=1e-4)
