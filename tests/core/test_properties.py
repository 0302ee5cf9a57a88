"""Properties for any finite input (hypothesis): range, shape, no NaN, no warning, batch
independence, and the symmetries normalisation and upsampling must respect.

ANYCAM_HYPOTHESIS_EXAMPLES raises the number of examples for a thorough local run.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anycam import core

EXAMPLES = int(os.environ.get("ANYCAM_HYPOTHESIS_EXAMPLES", "40"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BIG = float(np.float32(1e30))
FLOAT32 = st.one_of(
    st.just(0.0),
    st.sampled_from([BIG, -BIG, 1.0, -1.0, float(np.float32(1e-30)), float(np.float32(1e-45))]),
    st.floats(-BIG, BIG, width=32),
    st.floats(-10.0, 10.0, width=32),
)


@st.composite
def captures(draw):
    """A layer's activations ``(N, *layout)`` and gradients ``(N, K, *layout)`` in float32."""
    batch = draw(st.integers(1, 3))
    count = draw(st.integers(1, 2))
    channels = draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    activations = draw(arrays(np.float32, (batch, channels, *spatial), elements=FLOAT32))
    gradients = draw(arrays(np.float32, (batch, count, channels, *spatial), elements=FLOAT32))
    layout = draw(st.sampled_from(["channels_first", "channels_last"]))
    if layout == "channels_last":
        activations = np.moveaxis(activations, 1, -1).copy()
        gradients = np.moveaxis(gradients, 2, -1).copy()
    return activations, gradients, layout, count, spatial


def run_pipeline(method, activations, gradients, layout, count, size, normalization, resize_mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # RuntimeWarnings (overflow, 0/0) fail the property
        result = core.layer_cam(method, activations, gradients, layout, count=count)
        heat = core.heatmaps([result.cam], size, normalization=normalization, resize_mode=resize_mode)
    return result, heat


@PROPERTY
@given(
    capture=captures(),
    method=st.sampled_from(core.CAPTURE_METHODS),
    normalization=st.sampled_from(["minmax", "max"]),
    resize_mode=st.sampled_from(core.RESIZE_MODES),
    data=st.data(),
)
def test_heatmaps_are_defined_for_every_finite_input(capture, method, normalization, resize_mode, data):
    activations, gradients, layout, count, spatial = capture
    size = tuple(data.draw(st.integers(1, 9)) for _ in spatial)
    result, heat = run_pipeline(method, activations, gradients, layout, count, size, normalization, resize_mode)
    batch = activations.shape[0]
    assert heat.shape == (batch, count, *size) and heat.dtype == np.float32
    assert result.cam.shape == (batch, count, *spatial) and result.cam.dtype == np.float32
    assert np.isfinite(result.cam).all() and (result.cam >= 0).all()  # a ReLU'd, finite raw map
    assert np.isfinite(heat).all()
    per_map = heat.reshape(batch, count, -1)
    # Every map either spans exactly [0, 1] at output resolution or is all zeros (flat).
    assert set(per_map.max(axis=-1).ravel().tolist()) <= {0.0, 1.0}
    assert per_map.min() >= 0.0
    if normalization == "minmax":
        assert (per_map.min(axis=-1) == 0.0).all()


@PROPERTY
@given(capture=captures(), method=st.sampled_from(core.CAPTURE_METHODS), data=st.data())
def test_batch_independence(capture, method, data):
    activations, gradients, layout, count, spatial = capture
    size = tuple(data.draw(st.integers(1, 9)) for _ in spatial)
    result, heat = run_pipeline(method, activations, gradients, layout, count, size, "minmax", "linear")
    for index in range(activations.shape[0]):
        alone_result, alone = run_pipeline(
            method,
            activations[index : index + 1],
            gradients[index : index + 1],
            layout,
            count,
            size,
            "minmax",
            "linear",
        )
        np.testing.assert_array_equal(alone_result.cam[0], result.cam[index])
        np.testing.assert_array_equal(alone[0], heat[index])


MAP_VALUES = st.one_of(st.just(0.0), st.floats(1e-30, 1e30), st.floats(-1e30, -1e-30), st.integers(-5, 5).map(float))
MAPS = arrays(
    np.float64,
    st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
    elements=MAP_VALUES,
)


@PROPERTY
@given(maps=MAPS, exponent=st.integers(-20, 20), mode=st.sampled_from(["minmax", "max"]))
def test_normalisation_ignores_scaling_by_powers_of_two(maps, exponent, mode):
    # Scaling by 2^e is exact in floating point, so the invariance must hold bit for bit.
    np.testing.assert_array_equal(core.normalize(maps * 2.0**exponent, mode), core.normalize(maps, mode))


@PROPERTY
@given(
    maps=arrays(np.float64, (2, 5, 4), elements=st.integers(-100, 100).map(float)),
    scale=st.floats(1e-6, 1e6),
    offset=st.floats(-1e3, 1e3),
)
def test_minmax_ignores_any_positive_affine_map(maps, scale, offset):
    expected = core.normalize(maps)
    np.testing.assert_allclose(core.normalize(maps * scale + offset), expected, atol=1e-9)


@PROPERTY
@given(
    maps=arrays(
        np.float64,
        st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6)),
        elements=st.integers(-100, 100).map(float),
    ),
    factor=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
)
def test_upsampling_commutes_with_normalisation(maps, factor, extra):
    # Linear resizing is affine-equivariant (rows sum to 1), and min-max normalisation removes
    # any positive affine map, so normalise ∘ upsample ∘ normalise = normalise ∘ upsample.
    size = tuple(n * f + e for n, f, e in zip(maps.shape[1:], factor, extra, strict=True))
    direct = core.normalize(core.resize(maps, size))
    np.testing.assert_allclose(core.normalize(core.resize(core.normalize(maps), size)), direct, atol=1e-9)
    np.testing.assert_allclose(core.resize(3.0 * maps - 7.0, size), 3.0 * core.resize(maps, size) - 7.0, atol=1e-9)
    # Nearest only copies values and, upsampling, copies every one: it commutes exactly.
    np.testing.assert_array_equal(
        core.normalize(core.resize(maps, size, "nearest")),
        core.resize(core.normalize(maps), size, "nearest"),
    )


@PROPERTY
@given(
    maps=arrays(
        np.float64, st.tuples(st.integers(1, 2), st.integers(1, 7), st.integers(1, 7)), elements=st.floats(-1e30, 1e30)
    ),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    mode=st.sampled_from(core.RESIZE_MODES),
)
def test_resizing_stays_within_each_maps_range(maps, size, mode):
    out = core.resize(maps, size, mode)
    assert out.shape == (maps.shape[0], *size)
    low, high = maps.min(axis=(1, 2)), maps.max(axis=(1, 2))
    # Convex combinations can round by an ulp of the largest magnitude, not more.
    slack = 4 * np.finfo(float).eps * np.abs(maps).max(axis=(1, 2))
    assert (out.min(axis=(1, 2)) >= low - slack).all()
    assert (out.max(axis=(1, 2)) <= high + slack).all()
