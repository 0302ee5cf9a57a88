"""Issue 19.15: a model's own exception keeps its type on every path; only the input's shape is InputError.

The model raises from a module after the explained layer on its n-th call: the first call
(the capture), or a later one (Score-CAM's masked inputs, Ablation-CAM's copies through the
traced split or the hooked forward, the guided pass), under ``no_grad`` or not.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import anycam
from anycam import core


class Raises(nn.Module):
    """Identity until its ``when``-th call, which raises ``error`` (only without grad if ``no_grad``)."""

    def __init__(self, error: type[BaseException], when: int, no_grad: bool = False) -> None:
        super().__init__()
        self.error, self.when, self.no_grad, self.calls = error, when, no_grad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.no_grad and torch.is_grad_enabled():
            return x
        self.calls += 1
        if self.calls >= self.when:
            raise self.error("boom")
        return x


def _model(raises: Raises) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()),
        raises,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()


ERRORS = (RuntimeError, torch.OutOfMemoryError, ValueError)


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.__name__)
@pytest.mark.parametrize("when", [1, 2, 3])
@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
def test_the_models_own_exception_keeps_its_type(method: str, when: int, error: type[BaseException]) -> None:
    model = _model(Raises(error, when))
    explainer = anycam.Explainer(model, "1", method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        try:
            explainer.explain(torch.randn(2, 3, 8, 8), target=[0, 2])
        except BaseException as exc:
            assert type(exc) is error, f"{type(exc).__name__}: {exc}"
            assert str(exc) == "boom"
        else:
            # A method that calls the model fewer times never reaches the failing call.
            assert model[2].calls < when


def test_out_of_memory_in_the_ablated_copies_is_not_taken_for_a_missing_vmap_rule() -> None:
    """Out of memory propagates at once; no per-copy fallback announced as "cannot be vectorised"."""
    model = _model(Raises(torch.OutOfMemoryError, 2))
    explainer = anycam.Explainer(model, "1", method="ablationcam")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(torch.OutOfMemoryError, match="boom"):
            explainer.explain(torch.randn(2, 3, 8, 8), target=[0, 2])
    assert not [w for w in caught if "vectorised" in str(w.message)]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam", "guided-backprop"])
def test_the_models_exception_keeps_its_type_when_explain_runs_under_no_grad(method: str, context: str) -> None:
    model = _model(Raises(RuntimeError, 1))
    explainer = anycam.Explainer(model, "1", method=method)
    with getattr(torch, context)(), pytest.raises(RuntimeError, match="boom") as info:
        explainer.explain(torch.randn(2, 3, 8, 8), target=[0, 2])
    assert not isinstance(info.value, anycam.AnycamError)


@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
def test_a_model_that_fails_only_without_grad_keeps_its_exception(method: str) -> None:
    model = _model(Raises(RuntimeError, 1, no_grad=True))
    explainer = anycam.Explainer(model, "1", method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        try:
            explainer.explain(torch.randn(2, 3, 8, 8), target=[0, 2])
        except RuntimeError as exc:
            assert not isinstance(exc, anycam.AnycamError) and str(exc) == "boom"
        else:
            assert model[2].calls == 0  # the method ran every forward with grad


@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
def test_an_input_with_the_wrong_channels_is_still_an_input_error(method: str) -> None:
    model = _model(Raises(RuntimeError, 10**9))
    with pytest.raises(anycam.InputError, match="channel"):
        anycam.Explainer(model, "1", method=method).explain(torch.randn(2, 5, 8, 8), target=0)
