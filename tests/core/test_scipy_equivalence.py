"""scipy replaced hand-written rank, Gaussian filters and dilation: the results stay the same.

The references below are the project's former NumPy implementations, kept here as independent
oracles (a stable-sort rank with tie averaging, a clamped-edge blur matrix, sliding-window
valid filtering, and a brute-force ball dilation).
"""

from __future__ import annotations

import math
import subprocess
import sys
from itertools import product

import numpy as np
import pytest

from anycam import metrics
from anycam.metrics import localisation
from anycam.metrics.sanity import rank, spearman, ssim


def old_rank(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=1)
    ranks = np.empty_like(values)
    for row in range(values.shape[0]):
        starts = np.flatnonzero(np.r_[True, sorted_values[row, 1:] != sorted_values[row, :-1]])
        ends = np.r_[starts[1:], values.shape[1]]
        ranks[row, order[row]] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks


def old_blur_matrix(size: int, sigma: float) -> np.ndarray:
    if sigma == 0:
        return np.eye(size)
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((size, size))
    rows = np.arange(size)[:, None]
    columns = np.clip(rows + offsets, 0, size - 1)
    np.add.at(matrix, (np.broadcast_to(rows, columns.shape), columns), np.broadcast_to(kernel, columns.shape))
    return matrix


def old_blur(images: np.ndarray, sigma: float, first: int) -> np.ndarray:
    out = images.astype(np.float64)
    for axis in range(first, first + images.ndim - 2):
        kernel = old_blur_matrix(images.shape[axis], sigma)
        out = np.moveaxis(np.moveaxis(out, axis, -1) @ kernel.T, -1, axis)
    return out.astype(images.dtype)


def old_valid_gaussian(images: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = images
    for axis in (-2, -1):
        windows = np.lib.stride_tricks.sliding_window_view(np.moveaxis(out, axis, -1), kernel.size, axis=-1)
        out = np.moveaxis(windows @ kernel, -1, axis)
    return out


def old_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    radius = min(5, (min(a.shape[1:]) - 1) // 2)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = old_valid_gaussian(a, 1.5, radius), old_valid_gaussian(b, 1.5, radius)
    var_a = old_valid_gaussian(a * a, 1.5, radius) - mu_a**2
    var_b = old_valid_gaussian(b * b, 1.5, radius) - mu_b**2
    cov = old_valid_gaussian(a * b, 1.5, radius) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.reshape(len(a), -1).mean(axis=1)


def old_dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within Euclidean distance ``radius`` of a True pixel, by brute force."""
    out = masks.copy()
    spatial = masks.shape[1:]
    for offset in product(range(-radius, radius + 1), repeat=len(spatial)):
        if sum(o * o for o in offset) > radius * radius or any(
            abs(o) >= n for o, n in zip(offset, spatial, strict=True)
        ):
            continue
        target = [slice(None)]
        source = [slice(None)]
        for step, size in zip(offset, spatial, strict=True):
            target.append(slice(max(step, 0), size + min(step, 0)))
            source.append(slice(max(-step, 0), size - max(step, 0)))
        out[tuple(target)] |= masks[tuple(source)]
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(13)


def test_rank_equals_the_former_implementation_with_many_ties(rng: np.random.Generator) -> None:
    values = rng.integers(0, 6, size=(4, 50)).astype(np.float64)
    np.testing.assert_array_equal(rank(values), old_rank(values))
    continuous = rng.normal(size=(3, 200))
    np.testing.assert_array_equal(rank(continuous), old_rank(continuous))


def test_spearman_equals_pearson_of_the_former_ranks(rng: np.random.Generator) -> None:
    a, b = rng.normal(size=(5, 8, 8)), rng.integers(0, 4, size=(5, 8, 8)).astype(float)
    ra, rb = old_rank(a.reshape(5, -1)), old_rank(b.reshape(5, -1))
    expected = [np.corrcoef(x, y)[0, 1] for x, y in zip(ra, rb, strict=True)]
    np.testing.assert_allclose(spearman(a, b), expected, rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 24, 20), (2, 7, 9), (1, 3, 3), (2, 1, 5)])
def test_ssim_equals_the_former_sliding_window_filter(rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    a = rng.random(shape)
    b = np.clip(a + 0.3 * rng.normal(size=shape), 0, 1)
    np.testing.assert_allclose(ssim(a, b), old_ssim(a, b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("shape", "sigma", "layout"),
    [
        ((2, 3, 17, 12), 5.0, "channels_first"),  # the kernel (radius 20) is wider than the image
        ((2, 9, 11, 1), 1.3, "channels_last"),
        ((1, 2, 40), 2.0, "channels_first"),  # 1-D signals
        ((1, 1, 6, 5, 4), 0.7, "channels_first"),  # volumes
        ((2, 1, 8, 8), 0.0, "channels_first"),
    ],
)
def test_blur_equals_the_former_matrix_blur(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float, layout: str
) -> None:
    images = rng.random(shape).astype(np.float32)
    first = 2 if layout == "channels_first" else 1
    got = metrics.blur(images, sigma=sigma, input_layout=layout)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, old_blur(images, sigma, first), rtol=1e-6, atol=1e-7)
    as_float64 = metrics.blur(images.astype(np.float64), sigma=sigma, input_layout=layout)
    np.testing.assert_allclose(as_float64, old_blur(images.astype(np.float64), sigma, first), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("shape", "radius"), [((3, 30, 25), 4), ((2, 12, 12), 15), ((2, 9, 8, 7), 2), ((1, 40), 3)])
def test_dilation_equals_the_ball_by_brute_force(rng: np.random.Generator, shape: tuple[int, ...], radius: int) -> None:
    masks = rng.random(shape) > 0.985
    masks[0].flat[0] = True  # a seed at the corner: the ball is clipped at the border
    np.testing.assert_array_equal(localisation._dilate(masks, radius), old_dilate(masks, radius))


def test_pointing_game_tolerance_counts_whole_pixel_distances() -> None:
    # Peak at (0, 0), box at row 3..4, column 4..5: nearest box pixel (3, 4) is 5 pixels away.
    heat = np.zeros((1, 10, 10))
    heat[0, 0, 0] = 1.0
    box = np.array([[3, 4, 5, 6]])
    assert metrics.pointing_game(heat, box, tolerance=4).tolist() == [False]
    assert metrics.pointing_game(heat, box, tolerance=5).tolist() == [True]
    assert math.isclose(5.0, math.hypot(3, 4))


def test_import_anycam_and_the_plain_metrics_work_without_scipy() -> None:
    code = """
import sys
sys.modules["scipy"] = None  # makes every `import scipy...` fail, as if it were not installed
import numpy as np
import anycam
from anycam import metrics
from anycam.metrics import sanity
heat = np.zeros((1, 4, 4)); heat[0, 1, 1] = 1
assert metrics.pointing_game(heat, np.array([[1, 1, 2, 2]])).tolist() == [True]
for call in (lambda: metrics.blur(np.zeros((1, 1, 4, 4))), lambda: sanity.spearman(heat, heat),
             lambda: metrics.pointing_game(heat, np.array([[3, 3, 4, 4]]), tolerance=1)):
    try:
        call()
    except anycam.MissingExtraError as exc:
        assert isinstance(exc, ImportError)
        assert 'pip install "anycam[metrics]"' in str(exc), exc
    else:
        raise AssertionError("no MissingExtraError")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
