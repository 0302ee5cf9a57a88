"""ROAD's noisy linear imputation and MoRF/LeRF curves against hand solutions and a dense solver.

Every oracle here is written independently of anycam: hand-solved tiny systems, a dense
``numpy.linalg.solve`` over a system assembled pixel by pixel with loops, and NumPy toy models
whose scores follow in closed form from the imputed pixels.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import anycam
from anycam.metrics import ROAD_PERCENTAGES, noisy_linear_imputation, road

pytest.importorskip("scipy.sparse")

EDGE, DIAGONAL = 1 / 6, 1 / 12


@pytest.fixture
def rng():
    return np.random.default_rng(20261206)


def dense_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The paper's equations, one per removed pixel, built with plain loops and solved densely."""
    channels, height, width = image.shape
    unknown = [(r, c) for r in range(height) for c in range(width) if removed[r, c]]
    index = {p: i for i, p in enumerate(unknown)}
    matrix = np.zeros((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), channels))
    for i, (r, c) in enumerate(unknown):
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr, dc) == (0, 0) or not (0 <= r + dr < height and 0 <= c + dc < width):
                    continue
                weight = DIAGONAL if dr and dc else EDGE
                matrix[i, i] += weight
                if removed[r + dr, c + dc]:
                    matrix[i, index[(r + dr, c + dc)]] -= weight
                else:
                    rhs[i] += weight * image[:, r + dr, c + dc]
    solution = np.linalg.solve(matrix, rhs)
    out = image.astype(np.float64).copy()
    for i, (r, c) in enumerate(unknown):
        out[:, r, c] = solution[i]
    return out


# --------------------------------------------------------------------------------------------
# The imputation


def test_imputation_of_one_pixel_is_the_weighted_mean_of_its_eight_neighbours():
    image = np.arange(9, dtype=np.float64).reshape(1, 3, 3) ** 2
    removed = np.zeros((3, 3), dtype=bool)
    removed[1, 1] = True
    # Neighbours: edges 1, 9, 25, 49 (weight 1/6), corners 0, 4, 36, 64 (weight 1/12); weights sum to 1.
    expected = (1 + 9 + 25 + 49) / 6 + (0 + 4 + 36 + 64) / 12
    out = noisy_linear_imputation(image, removed, noise=0.0)
    assert out[0, 1, 1] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(out[0][~removed], image[0][~removed])


def test_imputation_at_a_corner_drops_the_neighbours_outside_the_image():
    image = np.array([[[0.0, 6.0], [12.0, 24.0]]])
    removed = np.array([[True, False], [False, False]])
    # Only (0, 1) and (1, 0) (1/6 each) and (1, 1) (1/12) exist: x = (1 + 2 + 2) / (5/12) = 12.
    out = noisy_linear_imputation(image, removed, noise=0.0)
    assert out[0, 0, 0] == pytest.approx((6 / 6 + 12 / 6 + 24 / 12) / (5 / 12), rel=1e-12)


def test_imputation_of_two_touching_pixels_solves_their_coupled_equations():
    # A 3×4 image; the two middle pixels of row 1 are removed and see each other (weight 1/6).
    image = np.array([[[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 8.0], [9.0, 10.0, 11.0, 12.0]]])
    removed = np.zeros((3, 4), dtype=bool)
    removed[1, 1:3] = True
    # Known-neighbour sums: a = (1,1): edges 2, 5, 10 → 17/6; corners 1, 3, 9, 11 → 24/12.
    #                       b = (1,2): edges 3, 8, 11 → 22/6; corners 2, 4, 10, 12 → 28/12.
    # Equations: a − b/6 = ka, b − a/6 = kb  →  a = (ka + kb/6) / (1 − 1/36), b = (kb + ka/6) / (1 − 1/36).
    ka, kb = 17 / 6 + 24 / 12, 22 / 6 + 28 / 12
    a = (ka + kb / 6) / (1 - 1 / 36)
    b = (kb + ka / 6) / (1 - 1 / 36)
    out = noisy_linear_imputation(image, removed, noise=0.0)
    np.testing.assert_allclose(out[0, 1, 1:3], [a, b], rtol=1e-12)


def test_imputation_equals_a_dense_solve_of_the_papers_system(rng):
    image = rng.normal(size=(3, 9, 11))
    removed = rng.random((9, 11)) < 0.6
    removed[4, :] = True  # a long connected stripe across the image, touching both borders
    out = noisy_linear_imputation(image, removed, noise=0.0)
    # The system is well conditioned (diagonally dominant): agreement to ~1e-12.
    np.testing.assert_allclose(out, dense_imputation(image, removed), rtol=1e-10, atol=1e-12)


def test_imputation_of_a_batch_and_channels_last_match_the_single_channels_first_images(rng):
    images = rng.normal(size=(2, 3, 6, 7)).astype(np.float32)
    masks = rng.random((2, 6, 7)) < 0.5
    batch = noisy_linear_imputation(images, masks, noise=0.0)
    assert batch.dtype == np.float32
    for i in range(2):
        np.testing.assert_allclose(
            batch[i], dense_imputation(images[i].astype(np.float64), masks[i]), rtol=1e-5, atol=1e-6
        )
    last = noisy_linear_imputation(np.moveaxis(images, 1, -1), masks, noise=0.0, input_layout="channels_last")
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), batch, rtol=1e-6, atol=1e-7)


def test_imputation_noise_is_gaussian_of_the_given_std_on_removed_pixels_only(rng):
    image = rng.normal(size=(3, 64, 64))
    removed = rng.random((64, 64)) < 0.5
    exact = noisy_linear_imputation(image, removed, noise=0.0)
    noisy = noisy_linear_imputation(image, removed, noise=0.05, seed=3)
    again = noisy_linear_imputation(image, removed, noise=0.05, seed=3)
    np.testing.assert_array_equal(noisy, again)
    np.testing.assert_array_equal(noisy[:, ~removed], image[:, ~removed])
    residual = (noisy - exact)[:, removed]
    # ~6000 draws: the sample std is within 5 % of 0.05 (its relative std is ~1/√(2n) ≈ 0.9 %).
    assert residual.std() == pytest.approx(0.05, rel=0.05)
    assert abs(residual.mean()) < 5 * 0.05 / np.sqrt(residual.size)


def test_imputation_refuses_a_mask_that_removes_everything_or_does_not_fit():
    image = np.ones((1, 4, 4))
    with pytest.raises(anycam.InputError, match="every pixel"):
        noisy_linear_imputation(image, np.ones((4, 4), dtype=bool))
    with pytest.raises(anycam.InputError, match="does not fit"):
        noisy_linear_imputation(image, np.ones((3, 4), dtype=bool))
    with pytest.raises(anycam.ConfigError, match="noise"):
        noisy_linear_imputation(image, np.eye(4, dtype=bool), noise=-1.0)


# --------------------------------------------------------------------------------------------
# road(): curves, orders and the combined score


def linear_model(weights: np.ndarray):
    """Class 0's logit is Σ weights · image (all channels), class 1's is 0."""

    def predict(images):
        z = (images * weights).reshape(len(images), -1).sum(axis=1)
        return np.stack([z, np.zeros_like(z)], axis=1)

    return predict


def test_road_curves_score_the_densely_imputed_images_at_each_percentage(rng):
    image = rng.normal(size=(2, 1, 8, 8))
    weights = rng.normal(size=(1, 8, 8))
    maps = rng.random((2, 8, 8))
    result = road(linear_model(weights), image, maps, target=0, noise=0.0, score="logit", batch_size=5)
    np.testing.assert_allclose(result.percentages, ROAD_PERCENTAGES)
    for sample in range(2):
        flat = maps[sample].reshape(-1)
        most_first = np.argsort(-flat, kind="stable")
        least_first = np.argsort(flat, kind="stable")
        for k, p in enumerate(ROAD_PERCENTAGES):
            count = round(p * 64)
            for order, curve in ((most_first, result.morf), (least_first, result.lerf)):
                removed = np.zeros(64, dtype=bool)
                removed[order[:count]] = True
                imputed = dense_imputation(image[sample], removed.reshape(8, 8))
                assert curve is not None
                assert curve[sample, k] == pytest.approx(float((imputed * weights).sum()), rel=1e-9, abs=1e-9)
    assert result.morf is not None and result.lerf is not None and result.combined is not None
    np.testing.assert_allclose(result.morf_mean, result.morf.mean(axis=1))
    np.testing.assert_allclose(result.combined, (result.lerf.mean(axis=1) - result.morf.mean(axis=1)) / 2)
    np.testing.assert_allclose(result.original, [(image[i] * weights).sum() for i in range(2)])


def test_road_ranks_the_true_map_above_its_reverse():
    # The model reads the mean of the top-left quarter of a smooth image; a map pointing there
    # must win over its reverse: MoRF falls, LeRF stays, combined > 0 (and the reverse < 0).
    yy, xx = np.mgrid[:16, :16]
    image = (np.sin(yy / 3.0) + np.cos(xx / 4.0))[None, None] + 2.0

    def predict(images):
        z = 4.0 * (images[:, 0, :8, :8].mean(axis=(1, 2)) - 2.0)
        return np.stack([z, -z], axis=1)

    truth = np.zeros((1, 16, 16))
    truth[0, :8, :8] = 1.0
    truth[0] += 1e-3 * (yy + xx)  # a total order inside and outside the region
    good = road(predict, image, truth, target=0, noise=0.0, score="logit")
    bad = road(predict, image, -truth, target=0, noise=0.0, score="logit")
    assert good.combined is not None and bad.combined is not None
    # LeRF removing up to 90 % of the low-ranked pixels never touches 25 % of the most relevant
    # when p ≤ 0.75: the region's values, hence the score, are exactly the original's there.
    assert good.lerf is not None
    np.testing.assert_allclose(good.lerf[0, :7], good.original[0], rtol=1e-12)
    np.testing.assert_allclose(good.combined, -bad.combined, atol=1e-12)
    assert good.combined[0] > 0.1


def test_road_single_order_and_percentages_options(rng):
    image = rng.normal(size=(1, 1, 6, 6))
    weights = rng.normal(size=(1, 6, 6))
    maps = rng.random((1, 6, 6))
    morf = road(linear_model(weights), image, maps, target=0, order="morf", percentages=(0.0, 0.5), score="logit")
    assert morf.lerf is None and morf.combined is None and morf.morf is not None
    # p = 0 removes nothing: the original score.
    assert morf.morf[0, 0] == pytest.approx(morf.original[0], rel=1e-12)
    with pytest.raises(anycam.ConfigError, match="percentages"):
        road(linear_model(weights), image, maps, percentages=(0.5, 1.0))
    with pytest.raises(anycam.ConfigError, match="order"):
        road(linear_model(weights), image, maps, order="both-ways")
    with pytest.raises(anycam.InputError, match="2-D"):
        road(linear_model(weights[0, 0]), image[:, :, 0], maps[:, 0])


def test_road_noise_is_reproducible_from_the_seed(rng):
    image = rng.normal(size=(1, 3, 8, 8))
    weights = rng.normal(size=(3, 8, 8))
    maps = rng.random((1, 8, 8))
    first = road(linear_model(weights), image, maps, target=0, seed=1, score="logit")
    second = road(linear_model(weights), image, maps, target=0, seed=1, score="logit")
    other = road(linear_model(weights), image, maps, target=0, seed=2, score="logit")
    np.testing.assert_array_equal(first.morf, second.morf)
    assert not np.array_equal(first.morf, other.morf)


# --------------------------------------------------------------------------------------------
# deletion / insertion with the ROAD baseline


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_deletion_and_insertion_with_the_road_baseline_score_imputed_images(rng, monkeypatch, kind):
    image = rng.normal(size=(2, 2, 5, 5))
    weights = rng.normal(size=(2, 5, 5))
    maps = rng.random((2, 5, 5))
    function = getattr(anycam.metrics, kind)
    noisy = function(linear_model(weights), image, maps, target=0, steps=5, baseline="road", score="logit")
    # The module, not the function of the same name that anycam.metrics exports.
    monkeypatch.setattr(sys.modules["anycam.metrics.road"], "ROAD_NOISE", 0.0)
    result = function(linear_model(weights), image, maps, target=0, steps=5, baseline="road", score="logit")
    for sample in range(2):
        order = np.argsort(-maps[sample].reshape(-1), kind="stable")
        for step in range(6):
            changed = np.zeros(25, dtype=bool)
            changed[order[: step * 25 // 5]] = True
            removed = (changed if kind == "deletion" else ~changed).reshape(5, 5)
            if removed.all():  # nothing to impute from: each channel's mean
                expected_image = np.broadcast_to(image[sample].mean(axis=(1, 2))[:, None, None], (2, 5, 5))
            elif removed.any():
                expected_image = dense_imputation(image[sample], removed)
            else:
                expected_image = image[sample]
            expected = float((expected_image * weights).sum())
            assert result.curves[sample, step] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # The paper's noise (σ = 0.01 per imputed value) moves the scores only a little.
    scale = 0.01 * np.sqrt((weights**2).sum())
    assert 0 < np.abs(noisy.curves - result.curves).max() < 6 * scale
