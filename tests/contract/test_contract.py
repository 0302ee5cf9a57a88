"""The backend contract: every method × target form × layout, in every requested backend.

The expected maps are the core's math on activations and gradients that the backend's kit
computed with the framework's own autodiff, without anycam; the core itself is checked
against closed forms in tests/core.
"""

from __future__ import annotations

import numpy as np
import pytest

import anycam
from anycam import core

from .kit import KINDS

TARGETS = ("argmax", "int", "per_sample", "k_per_sample", "top_k", "callable")


def _target(form: str, outputs: np.ndarray, case):  # type: ignore[no-untyped-def]
    """Returns (target for the Explainer, (K, N, classes) cotangents, expected indices or None)."""
    batch, classes = outputs.shape
    rng = np.random.default_rng(1)
    if form == "callable":
        weights = rng.normal(size=classes).astype(np.float32)
        return case.linear_target(weights), np.broadcast_to(weights, (1, batch, classes)).copy(), None
    if form == "argmax":
        target, indices = None, np.argmax(outputs, axis=1)[:, None]
    elif form == "int":
        target, indices = 2, np.full((batch, 1), 2)
    elif form == "per_sample":
        indices = rng.integers(0, classes, size=(batch, 1))
        target = [int(i) for i in indices[:, 0]]
    elif form == "k_per_sample":
        indices = rng.integers(0, classes, size=(batch, 3))
        target = indices
    else:
        target, indices = anycam.top_k(2), np.argsort(-outputs, axis=1, kind="stable")[:, :2]
    return target, core.one_hot(indices, classes), indices


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", TARGETS)
@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_matches_independent_computation(kit, kind: str, form: str, method: str) -> None:
    case = kit.case(kind)
    _, _, outputs = case.reference(None)
    target, cotangents, indices = _target(form, outputs, case)
    activations, gradients, _ = case.reference(cotangents)

    explainer = anycam.Explainer(case.model, case.layer, method=method, layout=case.layout, **case.options)
    result = explainer.explain(case.inputs, target=target)

    count = cotangents.shape[0]
    expected = core.layer_cam(method, activations, gradients, case.true_layout, count=count)
    expected_heat = core.heatmaps([expected.cam], case.input_spatial)
    squeeze = form in ("argmax", "int", "per_sample", "callable")
    cam = result.cam[:, None] if squeeze else result.cam
    heat = result.heatmap[:, None] if squeeze else result.heatmap
    scale = max(float(np.abs(expected.cam).max()), 1e-12)
    np.testing.assert_allclose(cam / scale, expected.cam / scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(heat, expected_heat, atol=1e-4)
    assert heat.shape == (outputs.shape[0], count, *case.input_spatial)
    assert heat.dtype == np.float32 and heat.min() >= 0 and heat.max() <= 1
    expected_scores = np.einsum("kno,no->nk", cotangents, outputs)
    scores = result.scores[:, None] if squeeze else result.scores
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    if indices is None:
        assert result.target is None
    else:
        np.testing.assert_array_equal(result.target, indices[:, 0] if squeeze else indices)


def test_batch_equals_each_sample_alone(kit) -> None:
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer)
    batch = explainer(case.inputs, target=1)
    for index in range(batch.shape[0]):
        alone = explainer(case.inputs[index : index + 1], target=1)
        np.testing.assert_allclose(alone[0], batch[index], atol=1e-5)


def test_wrong_target_count_is_an_error(kit) -> None:
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer)
    with pytest.raises(anycam.TargetError, match="for a batch of"):
        explainer(case.inputs, target=[0, 1, 2, 3, 4, 0, 1])


def test_target_out_of_range_is_an_error(kit) -> None:
    case = kit.case("conv2d")
    with pytest.raises(anycam.TargetError, match="out of range"):
        anycam.Explainer(case.model, case.layer)(case.inputs, target=99)


def test_unknown_layer_lists_close_names(kit) -> None:
    case = kit.case("conv2d")
    with pytest.raises(anycam.LayerError, match="closest"):
        anycam.Explainer(case.model, "featurez")
