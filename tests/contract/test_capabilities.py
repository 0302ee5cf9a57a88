"""The backend capabilities of the methods beyond gradients, against the framework's own answers.

``head_scores`` (Ablation-CAM) against the model run again with the layer's output replaced,
``input_scores`` (Score-CAM) against the model's outputs on the modified inputs (softmax in
NumPy), ``guided_gradients`` against the network written out in the kit with a guided ReLU of
its own. Each expected value comes from the kit, computed without anycam.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import anycam
from anycam import core
from anycam.protocol.backend import CAPABILITIES

from .test_contract import _target


def _explainer(case, capability: str) -> anycam.Explainer:  # type: ignore[no-untyped-def]
    explainer = anycam.Explainer(case.model, case.layer, layout=case.layout, **case.options)
    declared = next(name for name, verbs in CAPABILITIES.items() if capability in verbs)
    if not explainer.backend.can(declared):
        # Visible in every run's summary, and gone by itself once the backend declares it.
        pytest.xfail(f"the {explainer.backend.name} backend does not declare {declared} yet")
    return explainer


def _channel_axis(layout: str, ndim: int) -> int:
    return 1 if layout == "channels_first" else ndim - 1


def _expected_scores(outputs: np.ndarray, cotangents: np.ndarray) -> np.ndarray:
    """(N, K) scores: the cotangents are one-hot rows for classes, the weights for a callable."""
    return np.einsum("kno,no->nk", cotangents, outputs)


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(actual / scale, expected / scale, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("kind", ("conv2d", "channels_last", "tokens"))
@pytest.mark.parametrize("form", ("k_per_sample", "callable"))
def test_head_scores_equal_the_model_rerun_with_the_layer_replaced(kit, kind: str, form: str) -> None:
    case = kit.case(kind)
    _, _, outputs = case.reference(None)
    target, cotangents, _ = _target(form, outputs, case)
    explainer = _explainer(case, "head_scores")
    spec = core.parse_target(target)
    capture = explainer.backend.capture(case.inputs, spec, gradients=False)
    activations = capture.activations[0]
    axis = _channel_axis(case.true_layout, activations.ndim)
    # Two ablated channels, a scaled copy and random values: B = 4 copies of every sample.
    copies = [np.array(activations) for _ in range(4)]
    np.moveaxis(copies[0], axis, 0)[0] = 0
    np.moveaxis(copies[1], axis, 0)[-1] = 0
    copies[2] *= 0.5
    copies[3] = np.random.default_rng(4).normal(size=activations.shape).astype(np.float32)
    replacements = np.stack(copies)

    scores = explainer.backend.head_scores(case.inputs, replacements, spec, capture.target)

    assert scores.shape == (4, *capture.scores.shape) and scores.dtype == np.float32
    for index, replacement in enumerate(replacements):
        expected = _expected_scores(case.head_reference(replacement), cotangents)
        _close(scores[index], expected)
    # The unchanged copy gives back the capture's scores.
    unchanged = explainer.backend.head_scores(case.inputs, np.array(activations)[None], spec, capture.target)
    _close(unchanged[0], capture.scores)


@pytest.mark.parametrize("probabilities", (False, True))
@pytest.mark.parametrize("form", ("k_per_sample", "callable"))
def test_input_scores_equal_the_outputs_on_modified_inputs(kit, form: str, probabilities: bool) -> None:
    case = kit.case("conv2d")
    _, _, outputs = case.reference(None)
    target, cotangents, indices = _target(form, outputs, case)
    explainer = _explainer(case, "input_scores")
    spec = core.parse_target(target)
    x = np.asarray(case.inputs)
    masks = np.random.default_rng(5).random((x.shape[0], *case.input_spatial)).astype(np.float32)
    axis = 1 if explainer.backend.input_layout == "channels_first" else -1
    masked = (x * np.expand_dims(masks, axis)).astype(np.float32)
    if probabilities and form == "callable":
        with pytest.raises(anycam.TargetError, match="callable"):
            explainer.backend.input_scores(masked, spec, None, probabilities=True)
        return

    scores = explainer.backend.input_scores(masked, spec, indices, probabilities=probabilities)

    expected_outputs = case.masked_outputs(masks)
    if probabilities:
        shifted = np.exp(expected_outputs - expected_outputs.max(axis=1, keepdims=True))
        expected_outputs = shifted / shifted.sum(axis=1, keepdims=True)
    expected = _expected_scores(expected_outputs, cotangents)
    assert scores.shape == expected.shape and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_input_scores_refuse_indices_that_do_not_fit(kit) -> None:
    case = kit.case("conv2d")
    explainer = _explainer(case, "input_scores")
    x = np.asarray(case.inputs)
    spec = core.parse_target(None)
    with pytest.raises(anycam.TargetError, match="out of range"):
        explainer.backend.input_scores(x, spec, np.full((x.shape[0], 1), 99, np.int64))
    with pytest.raises(anycam.TargetError, match=rf"for a batch of {x.shape[0]}|N={x.shape[0]}"):
        explainer.backend.input_scores(x, spec, np.zeros((x.shape[0] + 1, 1), np.int64))


@pytest.mark.parametrize(
    ("kind", "form"), [("conv2d", "top_k"), ("conv2d", "callable"), ("channels_last", "int"), ("tokens", "callable")]
)
def test_guided_gradients_in_the_input_layout(kit, kind: str, form: str) -> None:
    """The protocol's own form: (N, K, *input) in the input's layout, scores, indices."""
    case = kit.case(kind)
    _, _, outputs = case.reference(None)
    target, cotangents, indices = _target(form, outputs, case)
    explainer = _explainer(case, "guided_gradients")
    expected = case.guided(cotangents)  # (N, K, C_in, *S)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attributions, scores, resolved = explainer.backend.guided_gradients(case.inputs, core.parse_target(target))

    assert len([w for w in caught if "no ReLU" in str(w.message)]) == (0 if case.has_relu else 1)
    if explainer.backend.input_layout != "channels_first":
        attributions = np.moveaxis(attributions, -1, 2)
    assert attributions.shape == expected.shape and attributions.dtype == np.float32
    _close(attributions, expected)
    np.testing.assert_allclose(scores, _expected_scores(outputs, cotangents), rtol=1e-5, atol=1e-6)
    if indices is None:
        assert resolved is None
    else:
        np.testing.assert_array_equal(resolved, indices)


def test_guided_gradients_with_a_wrong_target_count_is_an_error(kit) -> None:
    case = kit.case("conv2d")
    explainer = _explainer(case, "guided_gradients")
    with pytest.raises(anycam.TargetError, match="for a batch of"):
        explainer.backend.guided_gradients(case.inputs, core.parse_target([0, 1, 2, 3, 4, 0, 1]))
    with pytest.raises(anycam.TargetError, match="out of range"):
        explainer.backend.guided_gradients(case.inputs, core.parse_target(99))
