"""The core on non-NumPy arrays (issue 21, item 1): the same maps as the NumPy reference.

The NumPy path computes in float64 and is the reference (its own tests check it against closed
forms). On torch, JAX and ``array_api_strict`` arrays the core computes with their namespace,
in float32 (float64 for float64 inputs), and must return arrays of that namespace equal to the
NumPy result to float32 rounding. Tolerances: a map is a sum of C products (or a mean over S
positions) with cancellation, so its float32 error is a few ulps of the sum of the absolute
terms, not of the result; the absolute tolerance is 1e-5 of that scale, the relative one 1e-5.
Normalised heatmaps lie in [0, 1]: 1e-5 absolute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from anycam import core

# Without array-api-compat every array takes the NumPy path (as before issue 21): nothing to test.
pytest.importorskip("array_api_compat")

RTOL = 1e-5
# The weighted-sum family; the Eigen methods (an SVD, conditioned by the spectral gap) have
# tests of their own on data with a clear leading component.
SUM_METHODS = tuple(m for m in core.GRADIENT_METHODS if not m.startswith("eigen"))


def _strict() -> tuple[Callable[[np.ndarray], Any], Callable[[Any], bool]]:
    xs = pytest.importorskip("array_api_strict")
    return xs.asarray, lambda array: type(array).__module__.startswith("array_api_strict")


def _torch() -> tuple[Callable[[np.ndarray], Any], Callable[[Any], bool]]:
    torch = pytest.importorskip("torch")
    return (lambda a: torch.from_numpy(np.array(a))), (lambda a: isinstance(a, torch.Tensor) and a.device.type == "cpu")


def _jax() -> tuple[Callable[[np.ndarray], Any], Callable[[Any], bool]]:
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    return jnp.asarray, lambda array: isinstance(array, jax.Array)


NAMESPACES = {"array_api_strict": _strict, "torch": _torch, "jax": _jax}


@pytest.fixture(params=sorted(NAMESPACES))
def kind(request: pytest.FixtureRequest) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], bool]]:
    """(to the namespace, is an array of it) for each namespace that can be imported."""
    return NAMESPACES[request.param]()


def to_numpy(array: Any) -> np.ndarray:
    """Returns a NumPy copy of a CPU array of any of the namespaces above."""
    return np.asarray(np.from_dlpack(array))


def capture(layout: str, dtype: type = np.float32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns activations ``(2, C, 6, 7)`` (≥ 0, as after a ReLU) and gradients for K = 3 targets."""
    rng = np.random.default_rng(seed)
    acts = rng.gamma(2.0, 1.0, size=(2, 5, 6, 7)).astype(dtype)
    grads = rng.normal(size=(2, 3, 5, 6, 7)).astype(dtype)
    if layout == "channels_last":
        return np.moveaxis(acts, 1, -1).copy(), np.moveaxis(grads, 2, -1).copy()
    return acts, grads


def scale_of(method: str, acts: np.ndarray, grads: np.ndarray) -> float:
    """Returns the size of the terms a map sums (its float32 error is relative to this)."""
    acts64, grads64 = np.abs(acts.astype(np.float64)), np.abs(grads.astype(np.float64))
    if method in ("gradcam++", "xgradcam"):
        return float(np.max(np.sum(acts64[:, None] * grads64, axis=(-2, -1)) / np.sum(acts64, axis=(-2, -1))[:, None]))
    return float(np.max(np.sum(acts64[:, None] * grads64, axis=2)))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("method", SUM_METHODS)
def test_layer_cam_on_any_namespace_equals_numpy(kind, method, layout):
    convert, is_native = kind
    acts, grads = capture(layout)
    expected = core.layer_cam(method, acts, grads, layout, count=3)
    result = core.layer_cam(method, convert(acts), convert(grads), layout, count=3)
    assert is_native(result.cam) and result.cam.dtype == convert(np.zeros(1, np.float32)).dtype
    first = (acts, grads) if layout == "channels_first" else (np.moveaxis(acts, -1, 1), np.moveaxis(grads, -1, 2))
    atol = RTOL * scale_of(method, *first)
    np.testing.assert_allclose(to_numpy(result.cam), expected.cam, rtol=RTOL, atol=atol)
    assert (result.weights is None) == (expected.weights is None)
    if expected.weights is not None:
        assert is_native(result.weights)
        np.testing.assert_allclose(to_numpy(result.weights), expected.weights, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("method", SUM_METHODS)
def test_float64_inputs_compute_in_float64_like_numpy(method):
    # float64 in → float64 arithmetic: the namespace path is the NumPy path's formula, to
    # float64 rounding (only the order of the sums may differ).
    xs = pytest.importorskip("array_api_strict")
    acts, grads = capture("channels_first", np.float64, seed=1)
    expected, _ = core.compute_cam(method, acts[:, None], grads, channel_axis=2)
    cam, _ = core.compute_cam(method, xs.asarray(acts[:, None]), xs.asarray(grads), channel_axis=2)
    assert cam.dtype == xs.float64
    np.testing.assert_allclose(to_numpy(cam), expected, rtol=1e-12, atol=1e-12 * scale_of(method, acts, grads))


def test_half_precision_inputs_are_computed_in_float32():
    torch = pytest.importorskip("torch")
    acts, grads = capture("channels_first", np.float16, seed=2)
    expected = core.layer_cam("gradcam", acts, grads, "channels_first", count=3)
    result = core.layer_cam("gradcam", torch.from_numpy(acts), torch.from_numpy(grads), "channels_first", count=3)
    assert result.cam.dtype == torch.float32
    atol = RTOL * scale_of("gradcam", acts, grads)
    np.testing.assert_allclose(result.cam.numpy(), expected.cam, rtol=RTOL, atol=atol)


def test_tokens_on_any_namespace_equal_numpy(kind):
    convert, is_native = kind
    rng = np.random.default_rng(3)
    tokens = rng.normal(size=(2, 1 + 16, 6)).astype(np.float32)  # class token + a 4 × 4 grid
    token_grads = rng.normal(size=(2, 2, 1 + 16, 6)).astype(np.float32)
    expected = core.layer_cam("gradcam", tokens, token_grads, "tokens", count=2)
    result = core.layer_cam("gradcam", convert(tokens), convert(token_grads), "tokens", count=2)
    assert is_native(result.cam) and tuple(result.cam.shape) == (2, 2, 4, 4)
    np.testing.assert_allclose(to_numpy(result.cam), expected.cam, rtol=RTOL, atol=RTOL * 6 * 16)


@pytest.mark.parametrize("mode", core.RESIZE_MODES)
@pytest.mark.parametrize(
    "size_in,size_out", [((3, 4), (10, 7)), ((7, 7), (224, 224)), ((9, 6), (4, 5)), ((5,), (12,)), ((22,), (30,))]
)
def test_resize_on_any_namespace_equals_numpy(kind, mode, size_in, size_out):
    # Half-pixel linear with the edge clamp, and nearest (integer indices), up and down.
    convert, is_native = kind
    maps = np.random.default_rng(4).normal(size=(2, *size_in)).astype(np.float32)
    expected = core.resize(maps, size_out, mode)
    result = core.resize(convert(maps), size_out, mode)
    assert is_native(result) and tuple(result.shape) == (2, *size_out)
    # A convex combination of ≤ 2^d values: float32 error a few ulps of max |input|.
    np.testing.assert_allclose(to_numpy(result), expected, rtol=RTOL, atol=RTOL * float(np.abs(maps).max()))
    if mode == "nearest":
        np.testing.assert_array_equal(to_numpy(result), expected)  # a pure selection: exact


@pytest.mark.parametrize("mode", core.NORMALIZATIONS)
def test_normalize_on_any_namespace_equals_numpy(kind, mode):
    convert, is_native = kind
    maps = np.random.default_rng(5).normal(size=(3, 2, 5, 6)).astype(np.float32)
    maps[1, 0] = 2.5  # a flat map: zeros under "minmax"
    maps[2, 1] = -np.abs(maps[2, 1])  # max ≤ 0: zeros under "max"
    expected = core.normalize(maps, mode)
    result = core.normalize(convert(maps), mode)
    assert is_native(result)
    np.testing.assert_allclose(to_numpy(result), expected, rtol=RTOL, atol=RTOL)
    if mode == "minmax":
        assert not to_numpy(result)[1, 0].any()
    if mode == "max":
        assert not to_numpy(result)[2, 1].any()


@pytest.mark.parametrize("normalization", core.NORMALIZATIONS)
@pytest.mark.parametrize("resize_mode", core.RESIZE_MODES)
@pytest.mark.parametrize("aggregate", core.AGGREGATIONS)
def test_heatmaps_on_any_namespace_equal_numpy(kind, normalization, resize_mode, aggregate):
    convert, is_native = kind
    rng = np.random.default_rng(6)
    coarse = np.maximum(rng.normal(size=(2, 3, 4, 4)), 0).astype(np.float32)
    fine = np.maximum(rng.normal(size=(2, 3, 8, 8)), 0).astype(np.float32)
    for cams in ([coarse], [coarse, fine]):
        expected = core.heatmaps(
            cams, (16, 12), normalization=normalization, resize_mode=resize_mode, aggregate=aggregate
        )
        result = core.heatmaps(
            [convert(c) for c in cams],
            (16, 12),
            normalization=normalization,
            resize_mode=resize_mode,
            aggregate=aggregate,
        )
        assert is_native(result) and result.dtype == convert(np.zeros(1, np.float32)).dtype
        scale = 1.0 if normalization else float(max(np.abs(c).max() for c in cams))
        np.testing.assert_allclose(to_numpy(result), expected, rtol=RTOL, atol=RTOL * scale)


def test_heatmaps_follow_the_alignment_on_any_namespace(kind):
    convert, is_native = kind
    cam = np.random.default_rng(7).random((1, 2, 4, 1)).astype(np.float32)
    expected = core.heatmaps([cam], (8,), aligned=[((4, 1), (8, 1))])
    result = core.heatmaps([convert(cam)], (8,), aligned=[((4, 1), (8, 1))])
    assert is_native(result) and tuple(result.shape) == (1, 2, 8)
    np.testing.assert_allclose(to_numpy(result), expected, rtol=RTOL, atol=RTOL)


def test_the_pipeline_keeps_nan_visible(kind):
    # ReLU and the normalisation must not turn a NaN into a plausible 0 (NumPy's np.maximum
    # propagates NaN; a `where(x > 0, x, 0)` would hide it).
    convert, _ = kind
    cam = np.ones((1, 1, 3, 3), np.float32)
    cam[0, 0, 1, 1] = np.nan
    assert np.isnan(to_numpy(core.relu(convert(cam)))).sum() == 1
    assert np.isnan(core.relu(cam)).sum() == 1


# array_api_strict runs NumPy underneath, which warns on the float32 overflow the test provokes.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_saturation_matches_numpy_when_products_overflow_float32(kind):
    # NumPy computes A·G = 1e60 in float64 and saturates at float32's max; the float32 path
    # overflows to +inf and must saturate to the same value, not leave inf for the resize.
    convert, _ = kind
    acts = np.full((1, 2, 3, 3), 1e30, np.float32)
    grads = np.full((1, 1, 2, 3, 3), 1e30, np.float32)
    expected = core.layer_cam("hirescam", acts, grads, "channels_first")
    result = core.layer_cam("hirescam", convert(acts), convert(grads), "channels_first")
    np.testing.assert_array_equal(to_numpy(result.cam), expected.cam)
    heat = core.heatmaps([result.cam], (6, 6))
    assert np.isfinite(to_numpy(heat)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_no_nan_where_numpy_is_finite_when_products_of_both_signs_overflow():
    xs = pytest.importorskip("array_api_strict")
    acts = np.full((1, 2, 3, 3), 1e30, np.float32)
    grads = np.full((1, 1, 2, 3, 3), 1e30, np.float32)
    grads[:, :, 1] = -1e30  # NumPy (float64): 1e60 − 1e60 = 0, a finite map
    expected = core.layer_cam("hirescam", acts, grads, "channels_first")
    result = core.layer_cam("hirescam", xs.asarray(acts), xs.asarray(grads), "channels_first")
    assert np.isfinite(expected.cam).all()
    assert np.isfinite(to_numpy(result.cam)).all()


def test_host_weights_with_native_activations_give_native_maps(kind):
    # CAM with a linear head's NumPy weight rows on device activations: the weights move over.
    convert, is_native = kind
    acts, _ = capture("channels_first")
    rows = np.random.default_rng(8).normal(size=(2, 5)).astype(np.float32)
    expected = core.class_activation_map(acts, rows)
    result = core.class_activation_map(convert(acts), rows)
    assert is_native(result)
    scale = float(np.max(np.sum(np.abs(acts * rows[:, :, None, None].astype(np.float64)), axis=1)))
    np.testing.assert_allclose(to_numpy(result), expected, rtol=RTOL, atol=RTOL * scale)


def leading_component(seed: int, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Returns activations ``(2, 6, 5, 7)`` = one spatial pattern ⊗ one channel profile + 2 % noise,
    and gradients for K targets: the top singular vector is far from the next (gap ≈ 50×), so
    float32 and float64 SVDs agree to ~1e-6 of the map's size."""
    rng = np.random.default_rng(seed)
    pattern = rng.normal(size=(2, 1, 5, 7))
    profile = rng.gamma(2.0, 1.0, size=(2, 6, 1, 1))
    acts = (3.0 + pattern * profile + 0.02 * rng.normal(size=(2, 6, 5, 7))).astype(np.float32)
    grads = (1.0 + 0.02 * rng.normal(size=(2, k, 6, 5, 7))).astype(np.float32)
    return acts, grads


@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("method", ["eigencam", "eigengradcam", "kpcacam"])
def test_eigen_methods_on_any_namespace_equal_numpy(kind, method, rectify):
    # Also the sign rule: a flipped map would differ by 2× its size, far beyond the tolerance.
    convert, is_native = kind
    acts, grads = leading_component(9)
    expected, _ = core.compute_cam(method, acts[:, None], grads, channel_axis=2, rectify=rectify)
    cam, _ = core.compute_cam(method, convert(acts[:, None]), convert(grads), channel_axis=2, rectify=rectify)
    assert is_native(cam) and tuple(cam.shape) == expected.shape
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(to_numpy(cam), expected, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("method", ["eigencam", "kpcacam"])
def test_eigen_map_of_an_all_zero_sample_is_zero_on_any_namespace(kind, method):
    convert, _ = kind
    acts, _ = leading_component(10)
    acts[1] = 0.0
    cam, _ = core.compute_cam(method, convert(acts), None, channel_axis=1, rectify=False)
    assert not to_numpy(cam)[1].any() and to_numpy(cam)[0].any()
    assert np.isfinite(to_numpy(cam)).all()


def test_randomcam_on_any_namespace_uses_numpys_seeded_weights(kind):
    convert, is_native = kind
    acts, _ = capture("channels_first")
    expected = core.layer_cam("randomcam", acts, None, "channels_first", count=2, seed=5)
    result = core.layer_cam("randomcam", convert(acts), None, "channels_first", count=2, seed=5)
    assert is_native(result.cam) and is_native(result.weights)
    np.testing.assert_allclose(to_numpy(result.weights), expected.weights, rtol=1e-7)  # float32 of the same draws
    scale = float(np.max(np.sum(np.abs(acts.astype(np.float64)), axis=1)))  # |w| ≤ 1
    np.testing.assert_allclose(to_numpy(result.cam), expected.cam, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_the_core_runs_inside_jax_jit(method):
    # No host branch on values anywhere in the path (the Eigen methods' per-sample skips are
    # masks): a traced call gives the NumPy map. Item 4 builds the public pure function on this.
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    acts, grads = leading_component(11, k=2)
    gradients = grads if method in core.GRADIENT_METHODS else None

    def explain(a: Any, g: Any) -> Any:
        cam = core.layer_cam(method, a, g, "channels_first", count=2).cam
        return core.heatmaps([cam], (10, 14))

    expected = explain(acts, gradients)
    traced = jax.jit(explain)(jnp.asarray(acts), None if gradients is None else jnp.asarray(gradients))
    assert isinstance(traced, jax.Array)
    np.testing.assert_allclose(np.asarray(traced), expected, rtol=RTOL, atol=RTOL)


def test_half_precision_maps_are_normalised_in_float32():
    # Without a resize the map goes straight to the normalisation: float16 there would round
    # (x − min)/(max − min) to 3 digits.
    torch = pytest.importorskip("torch")
    cam = np.random.default_rng(12).random((1, 2, 5, 5)).astype(np.float16)
    expected = core.heatmaps([cam], None)
    result = core.heatmaps([torch.from_numpy(cam)], None)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=RTOL, atol=RTOL)


def test_gradcampp_weights_survive_gradients_whose_cube_overflows_float32(kind):
    # |g| = 1e12: g³ · Σ A ≈ 1e39 is beyond float32; α = g²/(2g² + Σ A g³) must not shrink to 0
    # (the float64 NumPy map is well defined: α ≈ 1/(Σ A g)).
    convert, _ = kind
    rng = np.random.default_rng(13)
    acts = (rng.random((1, 3, 4, 4)) * 100).astype(np.float32)
    grads = (rng.normal(size=(1, 1, 3, 4, 4)) * 1e12).astype(np.float32)
    expected = core.layer_cam("gradcam++", acts, grads, "channels_first")
    result = core.layer_cam("gradcam++", convert(acts), convert(grads), "channels_first")
    np.testing.assert_allclose(to_numpy(result.weights), expected.weights, rtol=RTOL)
    np.testing.assert_allclose(to_numpy(result.cam), expected.cam, rtol=RTOL, atol=RTOL * float(expected.cam.max()))
