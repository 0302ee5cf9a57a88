"""Ablation-CAM's pooled head in PyTorch: which fx graphs give an AblationHead, and that the
closed form equals really zeroing each channel in a hooked full forward (issue 9)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anycam

from ..contract.kit import explain_through_head, offered_head

CLASSES = 4


class Net(nn.Module):
    """stem → features (the explained layer, ReLU'd) → ``head(features, stem)``."""

    def __init__(self, head: Callable[[Net, torch.Tensor, torch.Tensor], object], spatial: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial]
        self.stem = nn.Sequential(conv(3, 6, 3, padding=1), nn.ReLU())
        self.features = nn.Sequential(conv(6, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, CLASSES)
        self.fc2 = nn.Linear(CLASSES, CLASSES)
        self.avg = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial](1)
        self.max = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}[spatial](1)
        self.small = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.flatten = nn.Flatten()
        self.same = nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> object:
        stem = self.stem(x)
        return self.head(self, self.features(stem), stem)


# name → (head, spatial rank, whether the dense layer folds into the closed form)
RECOGNISED: dict[str, tuple[Callable[..., object], int, bool]] = {
    "AdaptiveAvgPool2d, flatten": (lambda m, f, s: m.fc(torch.flatten(m.avg(f), 1)), 2, True),
    "F.adaptive_avg_pool2d, view(-1, C)": (lambda m, f, s: m.fc(F.adaptive_avg_pool2d(f, 1).view(-1, 6)), 2, True),
    "F.adaptive_max_pool2d, squeeze": (
        lambda m, f, s: m.fc(F.adaptive_max_pool2d(f, (1, 1)).squeeze(-1).squeeze(-1)),
        2,
        True,
    ),
    "mean method, softmax": (lambda m, f, s: m.fc(f.mean((2, 3))).softmax(1), 2, True),
    "torch.mean keepdim, Flatten, Dropout, Identity, two dense": (
        lambda m, f, s: m.fc2(torch.tanh(m.fc(m.same(m.drop(m.flatten(torch.mean(f, dim=[-1, -2], keepdim=True))))))),
        2,
        True,
    ),
    "torch.amax": (lambda m, f, s: m.fc(torch.amax(f, (3, 2))), 2, True),
    "sum method": (lambda m, f, s: m.fc(f.sum(dim=(2, 3))), 2, True),
    "F.dropout(training=False)": (lambda m, f, s: m.fc(F.dropout(f.mean((2, 3)), 0.3, training=False)), 2, True),
    "AdaptiveAvgPool1d": (lambda m, f, s: m.fc(m.avg(f).flatten(1)), 1, True),
    "AdaptiveMaxPool3d": (lambda m, f, s: m.fc(m.max(f).reshape(-1, 6)), 3, True),
    # Not folded: the reshape reads the batch size from a second use of the pooled tensor, or
    # a nonlinearity comes first; the tail then starts at the pooling.
    "x.view(x.size(0), -1)": (lambda m, f, s: _view_by_size(m, m.avg(f)), 2, False),
    "tanh before the dense layer": (lambda m, f, s: m.fc(torch.tanh(f.mean((2, 3)))), 2, False),
}


def _view_by_size(m: Net, pooled: torch.Tensor) -> torch.Tensor:
    return m.fc(pooled.view(pooled.size(0), -1))


REFUSED: dict[str, Callable[..., object]] = {
    "skip over the layer": lambda m, f, s: m.fc(f.mean((2, 3)) + s.mean((2, 3))),
    "pooling over one spatial axis": lambda m, f, s: m.fc(f.mean(2).mean(2)),
    "pooling to 2×2": lambda m, f, s: m.fc(m.small(f).mean((2, 3))),
    "pooling over the channels too": lambda m, f, s: m.fc(f.amax((1, 2)).mean(1, keepdim=True).expand(-1, 6)),
    "mean over every axis": lambda m, f, s: m.fc(f.mean().expand(3, 6)),
    "two readers of the layer": lambda m, f, s: m.fc(f.mean((2, 3)) + f.amax((2, 3))),
    "a convolution first": lambda m, f, s: m.fc(m.features[0](f).mean((2, 3))),
}


def _spatial_input(spatial: int) -> torch.Tensor:
    return torch.randn(3, 3, *(7, 6, 5)[:spatial])


def _oracle(model: nn.Module, layer: nn.Module, x: torch.Tensor, score: Callable[[object], torch.Tensor]) -> np.ndarray:
    """(N, K, C) Ablation-CAM weights (y − y_k)/y from full forwards with channel k of ``layer`` zeroed."""
    with torch.no_grad():
        y = score(model(x)).double()
        channels = layer(model.stem(x)).shape[1]  # type: ignore[operator]
    weights = []
    for channel in range(channels):

        def zero(module: nn.Module, args: object, out: torch.Tensor, channel: int = channel) -> torch.Tensor:
            out = out.clone()
            out[:, channel] = 0
            return out

        handle = layer.register_forward_hook(zero)
        try:
            with torch.no_grad():
                ablated = score(model(x)).double()
        finally:
            handle.remove()
        weights.append(((y - ablated) / y).numpy())
    return np.stack(weights, axis=-1)


def _gather(classes: np.ndarray) -> Callable[[object], torch.Tensor]:
    return lambda output: output.gather(1, torch.as_tensor(classes))  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(RECOGNISED))
def test_pooled_heads_take_the_closed_form_and_equal_zeroing(name: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    head, spatial, folds = RECOGNISED[name]
    torch.manual_seed(0)
    model = Net(head, spatial).eval()
    x = _spatial_input(spatial)
    classes = np.array([[0, 2], [1, 3], [3, 1]])
    explainer = anycam.Explainer(model, "features", method="ablationcam", batch_size=4)
    result, offered = explain_through_head(explainer, x, classes, monkeypatch)
    assert (offered.weight is not None) == folds
    expected = _oracle(model, model.features, x, _gather(classes))
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(REFUSED))
def test_no_head_unless_the_layer_is_read_by_one_global_pooling_alone(name: str) -> None:
    torch.manual_seed(0)
    model = Net(REFUSED[name]).eval()
    x = _spatial_input(2)
    explainer = anycam.Explainer(model, "features", method="ablationcam")
    assert offered_head(explainer, x)[0] is None
    # The slow path stays exact.
    result = explainer.explain(x, target=1)
    expected = _oracle(model, model.features, x, _gather(np.ones((3, 1), dtype=np.int64)))[:, 0]
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-5)


def test_no_head_for_a_float64_model_an_input_port_or_several_layers() -> None:
    torch.manual_seed(0)
    recognised = RECOGNISED["mean method, softmax"][0]
    model, x = Net(recognised).eval(), _spatial_input(2)
    assert offered_head(anycam.Explainer(model, "features", method="ablationcam"), x)[0] is not None
    assert offered_head(anycam.Explainer(model.double(), "features", method="ablationcam"), x.double())[0] is None
    model.float()
    assert offered_head(anycam.Explainer(model, "features.1:input", method="ablationcam"), x)[0] is None
    assert offered_head(anycam.Explainer(model, ["features", "stem"], method="gradcam"), x)[0] is None


def test_a_dropout_in_training_mode_is_not_folded_into_the_dense_layer() -> None:
    torch.manual_seed(0)
    model = Net(lambda m, f, s: m.fc(m.drop(f.mean((2, 3))))).eval()
    model.drop.train()
    head = offered_head(anycam.Explainer(model, "features", method="ablationcam"), _spatial_input(2))[0]
    assert head is not None and head.weight is None


def _two_outputs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"aux": logits.sum(1), "logits": logits}


def test_the_tail_applies_the_output_selection_and_a_callable_target_per_copy(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Net(lambda m, f, s: _two_outputs(m.fc(m.avg(f).flatten(1)))).eval()
    x = _spatial_input(2)
    mix = torch.randn(CLASSES, 2)
    seen: list[tuple[int, ...]] = []

    def target(logits: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(logits.shape))
        return torch.tanh(logits) @ mix + logits.mean(0)[:2]  # a mean over one copy's N rows

    explainer = anycam.Explainer(model, "features", method="ablationcam", output="logits", batch_size=4)
    result, offered = explain_through_head(explainer, x, target, monkeypatch)
    assert offered.weight is not None
    assert set(seen) == {(3, CLASSES)}  # every call (vmapped or not) saw one copy's (N, classes) logits
    expected = _oracle(model, model.features, x, lambda out: target(out["logits"]))  # type: ignore[index]
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-5)


def test_a_tail_that_mixes_the_batch_runs_each_copy_apart(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Net(lambda m, f, s: m.fc(f.mean((2, 3))).softmax(0)).eval()  # a softmax over the samples
    x = _spatial_input(2)
    explainer = anycam.Explainer(model, "features", method="ablationcam", batch_size=12)
    result, offered = explain_through_head(explainer, x, 2, monkeypatch)
    assert offered.weight is not None
    # A softmax over B·N rows would differ: only copies run apart reproduce the oracle.
    expected = _oracle(model, model.features, x, _gather(np.full((3, 1), 2)))[:, 0]
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-5)
