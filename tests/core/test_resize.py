"""Resizing against hand-computed values and one closed form: half-pixel linear interpolation
reproduces any function that is linear in each axis, with the sample point clamped to the edge."""

from __future__ import annotations

import numpy as np
import pytest

from anycam import core


@pytest.mark.parametrize(
    ("size_in", "size_out", "expected"),
    [
        # Output pixel i samples the input at (i + 0.5) · in/out − 0.5, clamped to [0, in − 1].
        (2, 4, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]),  # -0.25, 0.25, 0.75, 1.25
        (2, 3, [[1, 0], [0.5, 0.5], [0, 1]]),  # -1/6, 0.5, 7/6
        (3, 2, [[0.75, 0.25, 0], [0, 0.25, 0.75]]),  # 0.25, 1.75
        (4, 2, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]),  # 0.5, 2.5
        (3, 1, [[0, 1, 0]]),  # 1
        (4, 1, [[0, 0.5, 0.5, 0]]),  # 1.5
        (1, 3, [[1], [1], [1]]),
        (5, 5, np.eye(5)),
    ],
)
def test_linear_matrix_by_hand(size_in, size_out, expected):
    np.testing.assert_allclose(core.interpolation_matrix(size_in, size_out), np.asarray(expected, float), atol=1e-15)


@pytest.mark.parametrize(
    ("size_in", "size_out", "indices"),
    [
        (2, 5, [0, 0, 0, 1, 1]),  # floor(i · 2/5)
        (3, 2, [0, 1]),  # floor(i · 1.5)
        (4, 2, [0, 2]),
        (3, 7, [0, 0, 0, 1, 1, 2, 2]),
        (5, 1, [0]),
        (1, 3, [0, 0, 0]),
        # 11 · (30/22) is 14.999… in float64 but exactly 15 = floor(11 · 30 / 22): PyTorch
        # picks pixel 15, and so must we.
        (30, 22, [(i * 30) // 22 for i in range(22)]),
    ],
)
def test_nearest_matrix_by_hand(size_in, size_out, indices):
    expected = np.zeros((size_out, size_in))
    expected[np.arange(size_out), indices] = 1
    np.testing.assert_array_equal(core.interpolation_matrix(size_in, size_out, "nearest"), expected)


def test_nearest_picks_floor_of_exact_ratio_for_many_sizes():
    for size_in in range(1, 40):
        for size_out in range(1, 70):
            matrix = core.interpolation_matrix(size_in, size_out, "nearest")
            exact = [min(i * size_in // size_out, size_in - 1) for i in range(size_out)]
            np.testing.assert_array_equal(matrix.argmax(axis=1), exact, err_msg=f"{size_in}->{size_out}")


def test_resize_values_by_hand():
    np.testing.assert_allclose(core.resize(np.array([0.0, 1.0]), (4,)), [0, 0.25, 0.75, 1])
    np.testing.assert_allclose(core.resize(np.array([0.0, 1.0, 2.0]), (2,)), [0.25, 1.75])
    np.testing.assert_allclose(core.resize(np.array([3.0, 5.0, 9.0, 1.0]), (1,)), [7.0])
    np.testing.assert_allclose(core.resize(np.array([4.0]), (3,)), [4.0, 4.0, 4.0])
    # 2-D, 2×2 → 4×4: rows and columns each weighted (1, 0), (¾, ¼), (¼, ¾), (0, 1).
    grid = np.array([[0.0, 4.0], [8.0, 16.0]])
    weights = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    expected = np.array(
        [
            [sum(weights[i, a] * weights[j, b] * grid[a, b] for a in (0, 1) for b in (0, 1)) for j in range(4)]
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(core.resize(grid, (4, 4)), expected)
    assert core.resize(grid, (4, 4))[1, 1] == pytest.approx(0.5625 * 0 + 0.1875 * 4 + 0.1875 * 8 + 0.0625 * 16)


def sample_points(size_in: int, size_out: int) -> np.ndarray:
    """Where output pixel i samples the input: (i + ½)·in/out − ½, clamped to the input."""
    points = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    return np.clip(points, 0, size_in - 1)


@pytest.mark.parametrize(
    ("shape_in", "shape_out"),
    [((7, 7), (224, 224)), ((3, 5), (7, 4)), ((10, 6), (4, 9)), ((6,), (13,)), ((4, 3, 5), (6, 7, 2))],
)
def test_linear_reproduces_multilinear_functions(shape_in, shape_out):
    # f(x) = c0 + Σ_d a_d x_d + b Π_d x_d is linear in each coordinate, so separable linear
    # interpolation reproduces it exactly at every (clamped) sample point: up, down, N-d.
    rng = np.random.default_rng(0)
    coefficients = rng.standard_normal(len(shape_in))
    constant, product = rng.standard_normal(2)

    def f(*coords):
        return (
            constant + sum(a * x for a, x in zip(coefficients, coords, strict=True)) + product * np.prod(coords, axis=0)
        )

    source = f(*np.meshgrid(*(np.arange(n, dtype=float) for n in shape_in), indexing="ij"))
    points = np.meshgrid(*(sample_points(i, o) for i, o in zip(shape_in, shape_out, strict=True)), indexing="ij")
    np.testing.assert_allclose(core.resize(source, shape_out), f(*points), atol=1e-12)


def test_linear_never_leaves_the_input_range():
    rng = np.random.default_rng(1)
    for size_in in range(1, 12):
        for size_out in range(1, 30):
            matrix = core.interpolation_matrix(size_in, size_out)
            # Convex weights: non-negative, each row sums to one.
            assert (matrix >= 0).all()
            np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-15)
    data = rng.standard_normal((3, 9, 7)) * 1e6
    for size in [(20, 3), (2, 30), (9, 7), (1, 1)]:
        out = core.resize(data, size)
        assert (out.min(axis=(1, 2)) >= data.min(axis=(1, 2))).all()
        assert (out.max(axis=(1, 2)) <= data.max(axis=(1, 2))).all()


@pytest.mark.parametrize("mode", core.RESIZE_MODES)
def test_identity_when_size_is_unchanged(mode):
    data = np.random.default_rng(2).standard_normal((2, 3, 5, 4))
    np.testing.assert_array_equal(core.resize(data, (5, 4), mode), data)
    np.testing.assert_array_equal(core.resize(data, (3, 5, 4), mode), data)
    np.testing.assert_array_equal(core.interpolation_matrix(6, 6, mode), np.eye(6))


@pytest.mark.parametrize("mode", core.RESIZE_MODES)
def test_separable_axes_in_any_order(mode):
    # Resizing all axes at once equals resizing one axis at a time, in either order.
    data = np.random.default_rng(3).standard_normal((2, 5, 6, 4))
    whole = core.resize(data, (9, 3, 7), mode)
    by_axis = core.resize(core.resize(core.resize(data, (7,), mode), (3, 7), mode), (9, 3, 7), mode)
    np.testing.assert_allclose(whole, by_axis, atol=1e-12)
    reverse = np.moveaxis(core.resize(np.moveaxis(data, 1, -1), (3, 7, 9), mode), -1, 1)
    np.testing.assert_allclose(whole, reverse, atol=1e-12)


@pytest.mark.parametrize("mode", core.RESIZE_MODES)
def test_leading_axes_are_independent_maps(mode):
    data = np.random.default_rng(4).standard_normal((3, 2, 4, 5))
    out = core.resize(data, (7, 3), mode)
    for index in np.ndindex(3, 2):
        np.testing.assert_allclose(out[index], core.resize(data[index], (7, 3), mode), atol=1e-14)


def test_nearest_values_and_upsampling_keeps_every_pixel():
    data = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(
        core.resize(data, (3, 5), "nearest"),
        [[1, 1, 1, 2, 2], [1, 1, 1, 2, 2], [3, 3, 3, 4, 4]],
    )
    # Upsampled by any factor, nearest copies every input value at least once.
    wide = np.arange(12.0).reshape(3, 4)
    out = core.resize(wide, (7, 11), "nearest")
    assert set(out.ravel()) == set(wide.ravel())


def test_errors():
    with pytest.raises(ValueError, match="unknown resize mode 'cubic'"):
        core.resize(np.zeros((2, 2)), (4, 4), "cubic")
    # Rejected even when no axis needs resizing: a typo must not pass silently.
    with pytest.raises(ValueError, match="unknown resize mode 'bilinear'"):
        core.resize(np.zeros((2, 2)), (2, 2), "bilinear")
    with pytest.raises(ValueError, match="cannot resize"):
        core.resize(np.zeros((2, 2)), (2, 2, 2))
    with pytest.raises(ValueError, match="sizes must be positive"):
        core.resize(np.zeros((2, 2)), (0, 2))
    with pytest.raises(ValueError, match="unknown resize mode"):
        core.interpolation_matrix(2, 3, "area")
