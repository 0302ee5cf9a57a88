"""Normalisation by hand: min-max, max and none; flat, zero, huge and negative maps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from anycam import core
from anycam.core.normalize import scaled


@pytest.fixture(autouse=True)
def no_warnings():
    # A division warning is a bug here (DESIGN §4), so every warning fails these tests; the
    # numpy error state is set to raise so that a silenced 0/0 would also surface.
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        yield


def test_minmax_by_hand_per_map():
    maps = np.array([[[1.0, 3.0], [2.0, 1.0]], [[-4.0, 0.0], [4.0, 2.0]]])
    np.testing.assert_array_equal(core.normalize(maps), [[[0.0, 1.0], [0.5, 0.0]], [[0.0, 0.5], [1.0, 0.75]]])
    np.testing.assert_array_equal(core.normalize(maps, "minmax"), core.normalize(maps))


def test_max_by_hand_clips_negatives():
    maps = np.array([[[2.0, 4.0], [1.0, 0.0]], [[-4.0, 2.0], [8.0, -1.0]]])
    np.testing.assert_array_equal(core.normalize(maps, "max"), [[[0.5, 1.0], [0.25, 0.0]], [[0.0, 0.25], [1.0, 0.0]]])


def test_max_keeps_a_positive_floor_where_minmax_removes_it():
    maps = np.array([[2.0, 3.0], [4.0, 4.0]])
    np.testing.assert_array_equal(core.normalize(maps, "max"), [[0.5, 0.75], [1.0, 1.0]])
    np.testing.assert_array_equal(core.normalize(maps, "minmax"), [[0.0, 0.5], [1.0, 1.0]])


def test_none_returns_the_values():
    maps = np.array([[-3.0, 7.5], [0.0, 1e30]], np.float32)
    out = core.normalize(maps, None)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, maps.astype(np.float64))


@pytest.mark.parametrize("value", [0.0, 5.0, -2.0, 1e30])
def test_flat_maps_become_zeros(value):
    maps = np.full((2, 3, 4, 4), value)
    np.testing.assert_array_equal(core.normalize(maps, "minmax"), np.zeros_like(maps))
    # "max" is x / max: zero (not 0/0 = NaN) for max ≤ 0, and x / x = 1 for a flat positive map.
    expected = np.ones_like(maps) if value > 0 else np.zeros_like(maps)
    np.testing.assert_array_equal(core.normalize(maps, "max"), expected)


def test_all_negative_or_zero_max_gives_zeros_in_max_mode():
    maps = np.array([[[-1.0, -5.0], [-0.5, -2.0]], [[0.0, -1.0], [-3.0, 0.0]]])
    np.testing.assert_array_equal(core.normalize(maps, "max"), np.zeros((2, 2, 2)))
    # minmax still ranks them: the least negative is 1.
    np.testing.assert_allclose(core.normalize(maps[0], "minmax"), [[8 / 9, 0.0], [1.0, 2 / 3]])


def test_a_flat_map_does_not_affect_its_neighbours():
    maps = np.stack([np.zeros((3, 3)), np.arange(9.0).reshape(3, 3)])
    out = core.normalize(maps)
    np.testing.assert_array_equal(out[0], np.zeros((3, 3)))
    np.testing.assert_array_equal(out[1], np.arange(9.0).reshape(3, 3) / 8)


def test_huge_and_tiny_values():
    np.testing.assert_array_equal(core.normalize(np.array([[0.0, 1e30, 5e29]]), spatial_ndim=1), [[0.0, 1.0, 0.5]])
    np.testing.assert_allclose(
        core.normalize(np.array([[1e30, 3e30, 2e30]]), "max", spatial_ndim=1),
        [[1 / 3, 1.0, 2 / 3]],
        rtol=1e-15,
    )
    limit = float(np.finfo(np.float32).max)
    extreme = np.array([[-limit, 0.0, limit]], np.float32)
    np.testing.assert_array_equal(core.normalize(extreme, spatial_ndim=1), [[0.0, 0.5, 1.0]])
    # The smallest subnormal span is still a span.
    tiny = np.array([[0.0, 5e-324]])
    np.testing.assert_array_equal(core.normalize(tiny, spatial_ndim=1), [[0.0, 1.0]])


@pytest.mark.parametrize("spatial_ndim", [1, 2, 3])
def test_spatial_ndim_chooses_what_one_map_is(spatial_ndim):
    data = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    out = core.normalize(data, spatial_ndim=spatial_ndim)
    lead = data.shape[: data.ndim - spatial_ndim]
    for index in np.ndindex(*lead):
        block = data[index]
        np.testing.assert_allclose(out[index], (block - block.min()) / (block.max() - block.min()), rtol=1e-15)


def test_output_is_in_the_unit_interval_and_hits_both_ends():
    data = np.random.default_rng(1).standard_normal((4, 6, 6)) * 1e3
    out = core.normalize(data)
    assert out.min(axis=(1, 2)).tolist() == [0.0] * 4
    assert out.max(axis=(1, 2)).tolist() == [1.0] * 4


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown normalisation 'l2'"):
        core.normalize(np.ones((2, 2)), "l2")
    assert core.NORMALIZATIONS == ("minmax", "max", None)


def _by_hand(maps: np.ndarray, mode: str | None) -> np.ndarray:
    """normalize's contract written out per map with Python floats (an independent oracle)."""
    out = np.zeros(maps.shape, dtype=np.float64)
    for index in np.ndindex(maps.shape[:-2]):
        values = maps[index].astype(np.float64)
        if mode is None:
            out[index] = values
            continue
        high = float(values.max())
        low = float(values.min()) if mode == "minmax" else 0.0
        shifted = values - low if mode == "minmax" else np.maximum(values, 0.0)
        span = high - low
        if np.isfinite(span) and span > 0:
            out[index] = np.clip(shifted / span, 0.0, 1.0)
    return out


@pytest.mark.parametrize("mode", ["minmax", "max", None])
@pytest.mark.parametrize("overwrite", [False, True])
def test_scaled_stores_the_float64_result_rounded_once(mode, overwrite):
    # The fast path heatmaps use (fewer passes, float32 out): equal to the float64 contract
    # rounded once to float32, bit for bit, flat/negative maps included, input untouched
    # unless it may be overwritten.
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(3, 4, 5, 6))
    maps[0, 0] = 2.5  # flat
    maps[1, 2] = -np.abs(maps[1, 2])  # all negative: zeros in "max" mode
    expected = _by_hand(maps, mode)
    given = maps.copy()
    got = scaled(given, mode, 2, np.float32, overwrite=overwrite)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    if not overwrite:
        np.testing.assert_array_equal(given, maps)
    wide = scaled(maps.copy(), mode, 2, np.float64, overwrite=overwrite)
    np.testing.assert_allclose(wide, expected, rtol=1e-15, atol=0)
