"""Average Gain and ADCC against closed forms on NumPy toy models (no framework is imported here)."""

from __future__ import annotations

import numpy as np
import pytest

import anycam
from anycam.metrics import UndefinedCoherencyWarning, adcc, average_gain

stats = pytest.importorskip("scipy.stats")


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def two_pixel_model(images):
    """Class 0's logit is 3·x[0,0] − 2·x[0,1] + x[1,1]; class 1's is 0: p0 = sigmoid(logit)."""
    z = 3.0 * images[:, 0, 0, 0] - 2.0 * images[:, 0, 0, 1] + images[:, 0, 1, 1]
    return np.stack([z, np.zeros_like(z)], axis=1)


IMAGES = np.ones((3, 1, 2, 2))
MAPS = np.array(
    [
        [[1.0, 0.0], [0.0, 1.0]],  # keeps the evidence, drops the distractor: MASKED > ORIGINAL
        [[0.0, 1.0], [0.0, 0.0]],  # keeps only the distractor: MASKED < ORIGINAL
        [[1.0, 0.5], [0.25, 1.0]],  # partial: MASKED > ORIGINAL
    ]
)
ORIGINAL = sigmoid(np.full(3, 3.0 - 2.0 + 1.0))
MASKED = sigmoid(np.array([3.0 + 1.0, -2.0, 3.0 - 1.0 + 1.0]))


def test_average_gain_is_the_mean_relative_rise_towards_one():
    result = average_gain(two_pixel_model, IMAGES, MAPS, target=0)
    expected = np.maximum(0.0, MASKED - ORIGINAL) / (1.0 - ORIGINAL) * 100.0
    np.testing.assert_allclose(result.original, ORIGINAL, rtol=1e-12)
    np.testing.assert_allclose(result.masked, MASKED, rtol=1e-12)
    np.testing.assert_allclose(result.gain, expected, rtol=1e-12)
    assert result.gain[1] == 0.0
    assert result.average_gain == pytest.approx(expected.mean(), rel=1e-12)
    np.testing.assert_array_equal(result.target, [0, 0, 0])


def test_average_gain_counts_a_certain_prediction_as_no_gain_and_refuses_logits():
    def certain(images):  # softmax of (0, -inf-ish): ORIGINAL == 1.0 exactly in float64
        z = np.full(len(images), 800.0)
        return np.stack([z, np.zeros_like(z)], axis=1)

    result = average_gain(certain, IMAGES[:1], MAPS[:1], target=0)
    assert result.original[0] == 1.0 and result.gain[0] == 0.0
    with pytest.raises(anycam.InputError, match=r"\[0, 1\]"):
        average_gain(two_pixel_model, IMAGES * 3, MAPS, target=0, score="logit")


def test_adcc_is_the_harmonic_mean_of_coherency_simplicity_and_kept_confidence():
    rng = np.random.default_rng(4)
    second = rng.random((3, 2, 2))  # what the "method" says about each masked image
    seen = {}

    def explain(images, target):
        seen["images"], seen["target"] = images.copy(), np.asarray(target).copy()
        return second

    result = adcc(two_pixel_model, IMAGES, MAPS, target=0, explain=explain)
    # The masked images and the class explained are the paper's x ⊙ A(x) and c.
    np.testing.assert_allclose(seen["images"], IMAGES * MAPS[:, None])
    np.testing.assert_array_equal(seen["target"], [0, 0, 0])
    coherency = np.array([(np.corrcoef(MAPS[i].ravel(), second[i].ravel())[0, 1] + 1) / 2 for i in range(3)])
    complexity = MAPS.reshape(3, -1).sum(axis=1) / 4  # L1 norm over H·W
    drop = np.maximum(0.0, ORIGINAL - MASKED) / ORIGINAL
    expected = np.array([stats.hmean([coherency[i], 1 - complexity[i], 1 - drop[i]]) for i in range(3)])
    np.testing.assert_allclose(result.coherency, coherency, rtol=1e-12)
    np.testing.assert_allclose(result.complexity, complexity, rtol=1e-12)
    np.testing.assert_allclose(result.drop, drop, rtol=1e-12)
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-12)
    assert result.adcc == pytest.approx(expected.mean(), rel=1e-12)


def test_adcc_coherency_is_one_for_a_self_consistent_map_undefined_for_a_constant_one():
    full = np.ones((1, 2, 2))
    varied = np.array([[[1.0, 0.2], [0.3, 0.9]]])
    result = adcc(two_pixel_model, IMAGES[:1], varied, target=0, explain=lambda images, target: 0.5 * varied)
    assert result.coherency[0] == pytest.approx(1.0, abs=1e-12)  # ρ is scale-invariant
    with pytest.warns(UndefinedCoherencyWarning):
        constant = adcc(two_pixel_model, IMAGES[:1], full, target=0, explain=lambda images, target: full)
    assert np.isnan(constant.per_sample[0]) and np.isnan(constant.adcc)
    dim = np.array([[[1.0, 1.0], [1.0, 0.999]]])
    nearly = adcc(two_pixel_model, IMAGES[:1], dim, target=0, explain=lambda images, target: varied)
    # A map that lights (almost) everything: 1 − complexity ≈ 0 pulls the harmonic mean to ≈ 0
    # (hmean ≤ 3 · its smallest term).
    assert 0 < nearly.per_sample[0] <= 3 * (1 - dim.mean())


def test_adcc_refuses_maps_of_the_wrong_shape_and_a_non_callable_explain():
    with pytest.raises(anycam.InputError, match="explain returned"):
        adcc(two_pixel_model, IMAGES, MAPS, target=0, explain=lambda images, target: MAPS[:, 0])
    with pytest.raises(anycam.ConfigTypeError):
        adcc(two_pixel_model, IMAGES, MAPS, target=0, explain="gradcam")
