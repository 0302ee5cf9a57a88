"""Rank, Spearman and SSIM used by the sanity check, against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

import anycam
from anycam.metrics.sanity import rank, spearman, ssim


def test_rank_averages_ties() -> None:
    np.testing.assert_array_equal(rank(np.array([[3.0, 1.0, 3.0, 2.0]])), [[2.5, 0.0, 2.5, 1.0]])


def test_spearman_is_pearson_of_ranks() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 40)), rng.normal(size=(5, 40))
    ra, rb = rank(a), rank(b)
    expected = [np.corrcoef(x, y)[0, 1] for x, y in zip(ra, rb, strict=True)]
    np.testing.assert_allclose(spearman(a, b), expected, rtol=1e-12)


def test_spearman_monotone_reversed_and_constant() -> None:
    x = np.random.default_rng(1).random((2, 50))
    np.testing.assert_allclose(spearman(x, np.exp(3 * x)), 1.0)
    np.testing.assert_allclose(spearman(x, -x), -1.0)
    np.testing.assert_array_equal(spearman(x, np.zeros_like(x)), 0.0)


def test_spearman_hand_computed() -> None:
    # ranks a = [0, 1, 2, 3], b = [1, 0, 3, 2]: d² = 1+1+1+1, ρ = 1 - 6·4 / (4·15) = 0.6
    np.testing.assert_allclose(spearman(np.array([[1, 2, 3, 4.0]]), np.array([[2, 1, 4, 3.0]])), [0.6])


def test_ssim_identity_and_constant_offsets() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((3, 20, 20))
    np.testing.assert_allclose(ssim(x, x), 1.0, rtol=1e-12)
    # Two constant images: the structure and contrast terms are 1; luminance is
    # (2 μa μb + C1) / (μa² + μb² + C1).
    a, b = np.full((1, 16, 16), 0.2), np.full((1, 16, 16), 0.6)
    c1 = 0.01**2
    np.testing.assert_allclose(ssim(a, b), (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rtol=1e-9)
    assert ssim(x, 1 - x).mean() < 0


def test_ssim_rejects_mismatched_shapes() -> None:
    with pytest.raises(anycam.InputError, match="one shape"):
        ssim(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))
