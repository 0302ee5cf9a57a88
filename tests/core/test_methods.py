"""CAM methods against closed forms: a conv → GAP → linear head built in NumPy, hand-computed
Grad-CAM++ and LayerCAM values, and a rank-1 Eigen-CAM whose principal component is known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from anycam import core
from anycam.core import methods as methods_module

GRADIENT_METHODS = core.GRADIENT_METHODS


def gap_head(seed: int, batch: int = 3, channels: int = 6, spatial=(5, 4), classes: int = 4):
    """Returns a GAP → linear head: activations, head weights, targets and dscore/dA by hand.

    score[n, c] = W[c] · mean_s A[n, :, s], so dscore[n, t_n]/dA[n, k, s] = W[t_n, k] / Z.
    """
    rng = np.random.default_rng(seed)
    activations = rng.random((batch, channels, *spatial))  # post-ReLU: non-negative
    head = rng.standard_normal((classes, channels))
    targets = rng.integers(classes, size=batch)
    size = math.prod(spatial)
    gradients = np.broadcast_to(
        (head[targets] / size).reshape(batch, channels, *(1,) * len(spatial)), activations.shape
    ).copy()
    return activations, head, targets, gradients, size


def gap_scores(activations: np.ndarray, head: np.ndarray) -> np.ndarray:
    pooled = activations.reshape(*activations.shape[:2], -1).mean(axis=-1)
    return pooled @ head.T


def cam_reference(activations: np.ndarray, head: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """CAM (Zhou 2016) by einsum: M[n, s] = Σ_k W[t_n, k] A[n, k, s]."""
    flat = activations.reshape(*activations.shape[:2], -1)
    return np.einsum("nk,nks->ns", head[targets], flat).reshape(activations.shape[0], *activations.shape[2:])


def test_gap_head_gradient_is_what_the_oracle_says():
    # The oracle's gradient checked by central differences of the NumPy head (linear: exact
    # up to rounding), so the closed forms below rest on a verified derivative.
    activations, head, targets, gradients, _ = gap_head(0, batch=2, channels=3, spatial=(2, 3))
    step = 1e-3
    numerical = np.zeros_like(activations)
    for index in np.ndindex(activations.shape):
        up, down = activations.copy(), activations.copy()
        up[index] += step
        down[index] -= step
        n = index[0]
        numerical[index] = (gap_scores(up, head)[n, targets[n]] - gap_scores(down, head)[n, targets[n]]) / (2 * step)
    np.testing.assert_allclose(gradients, numerical, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("spatial", [(5, 4), (9,), (3, 4, 2)])
def test_gradcam_hirescam_xgradcam_equal_cam_over_z_on_gap_head(spatial):
    activations, head, targets, gradients, size = gap_head(1, spatial=spatial)
    reference = cam_reference(activations, head, targets)
    # The oracle only tests the ReLU if the CAM has both signs.
    assert (reference < 0).any() and (reference > 0).any()
    expected = np.maximum(reference, 0) / size

    cam, weights = core.compute_cam("gradcam", activations, gradients)
    np.testing.assert_allclose(cam, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(weights, head[targets] / size, rtol=1e-12)

    cam, weights = core.compute_cam("hirescam", activations, gradients)
    assert weights is None
    np.testing.assert_allclose(cam, expected, rtol=1e-12, atol=1e-15)

    # XGrad-CAM: w_k = Σ_s G A / (Σ_s A + eps) = (W_k / Z) · S_k / (S_k + eps), exactly.
    sums = activations.reshape(*activations.shape[:2], -1).sum(axis=-1)
    cam, weights = core.compute_cam("xgradcam", activations, gradients)
    np.testing.assert_allclose(weights, head[targets] / size * sums / (sums + 1e-7), rtol=1e-12)
    np.testing.assert_allclose(cam, expected, rtol=1e-6, atol=1e-12)


def test_class_activation_map_is_the_unrectified_cam():
    activations, head, targets, _, _ = gap_head(2)
    np.testing.assert_allclose(
        core.class_activation_map(activations, head[targets]),
        cam_reference(activations, head, targets),
        rtol=1e-12,
    )


def test_gradcam_weights_are_spatial_means_by_hand():
    gradients = np.array([[[[1.0, 3.0], [5.0, -1.0]], [[0.0, 0.0], [-2.0, -6.0]]]])
    np.testing.assert_array_equal(core.gradcam_weights(gradients), [[2.0, -2.0]])


def test_gradcampp_by_hand():
    # Channel 0: A = [[1, 2], [3, 4]] (Σ = 10), g = 1/2 everywhere:
    #   α = g² / (2g² + Σ A g³) = (1/4) / (1/2 + 10/8) = 1/7;  w = Σ_s α ReLU(g) = 4 · 1/7 · 1/2 = 2/7.
    # Channel 1: g = -1 → ReLU(g) = 0 → w = 0.  Channel 2: g = 0 → α = 0 (the paper's mask) → w = 0.
    activations = np.array([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 1.0], [1.0, 1.0]], [[9.0, 9.0], [9.0, 9.0]]]])
    gradients = np.empty_like(activations)
    gradients[0, 0], gradients[0, 1], gradients[0, 2] = 0.5, -1.0, 0.0
    weights = core.gradcampp_weights(activations, gradients)
    np.testing.assert_allclose(weights, [[2 / 7, 0.0, 0.0]], rtol=1e-15)
    cam, _ = core.compute_cam("gradcam++", activations, gradients)
    np.testing.assert_allclose(cam, [[[2 / 7, 4 / 7], [6 / 7, 8 / 7]]], rtol=1e-15)


def test_gradcampp_constant_gradients_closed_form():
    # g constant per channel: α = 1 / (2 + S g), w = Z ReLU(g) / (2 + S g), S = Σ_s A.
    rng = np.random.default_rng(3)
    activations = rng.random((2, 7, 4, 5))
    per_channel = rng.standard_normal((2, 7))
    gradients = np.broadcast_to(per_channel[:, :, None, None], activations.shape)
    sums = activations.sum(axis=(2, 3))
    expected = 20 * np.maximum(per_channel, 0) / (2 + sums * per_channel)
    assert (per_channel < 0).any() and (per_channel > 0).any()
    np.testing.assert_allclose(core.gradcampp_weights(activations, gradients), expected, rtol=1e-12)


def test_gradcampp_varying_gradients_against_a_loop():
    # Eq. 19 written out with plain loops: an independent reading of the paper.
    rng = np.random.default_rng(4)
    activations = rng.random((2, 3, 3, 2))
    gradients = rng.standard_normal((2, 3, 3, 2))
    gradients[0, 1, 0, 0] = 0.0
    expected = np.zeros((2, 3))
    for n in range(2):
        for k in range(3):
            total = activations[n, k].sum()
            for s in np.ndindex(3, 2):
                g = gradients[n, k][s]
                if g != 0:
                    alpha = g**2 / (2 * g**2 + total * g**3)
                    expected[n, k] += alpha * max(g, 0.0)
    np.testing.assert_allclose(core.gradcampp_weights(activations, gradients), expected, rtol=1e-12)


def test_gradcampp_zero_denominator_gives_zero_weight_without_warning():
    # Σ A g = -2 makes 2g² + Σ A g³ = 0: the location gets α = 0, not inf/NaN.
    activations = np.array([[[-1.0, -1.0]]])
    gradients = np.array([[[1.0, 1.0]]])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        weights = core.gradcampp_weights(activations, gradients)
    np.testing.assert_array_equal(weights, [[0.0]])


def test_layercam_by_hand_on_one_dimensional_maps():
    activations = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    gradients = np.array([[[1.0, -1.0, 2.0], [-1.0, 0.5, -2.0]]])
    # ReLU(G) ⊙ A = [[1, 0, 6], [0, 2.5, 0]] → Σ_k = [1, 2.5, 6].
    np.testing.assert_array_equal(core.layercam(activations, gradients), [[1.0, 2.5, 6.0]])
    # G ⊙ A = [[1, -2, 6], [-4, 2.5, -12]] → Σ_k = [-3, 0.5, -6] → ReLU.
    np.testing.assert_array_equal(core.hirescam(activations, gradients), [[0.0, 0.5, 0.0]])


def test_layercam_equals_hirescam_for_positive_gradients():
    rng = np.random.default_rng(5)
    activations = rng.standard_normal((2, 4, 3, 3))
    gradients = rng.random((2, 4, 3, 3)) + 0.1
    layer, _ = core.compute_cam("layercam", activations, gradients)
    hires, _ = core.compute_cam("hirescam", activations, gradients)
    np.testing.assert_allclose(layer, hires, rtol=1e-14)
    # ...and differs once a gradient is negative (the test can tell them apart).
    gradients[0, 0] = -gradients[0, 0]
    layer, _ = core.compute_cam("layercam", activations, gradients)
    hires, _ = core.compute_cam("hirescam", activations, gradients)
    assert not np.allclose(layer[0], hires[0])
    np.testing.assert_allclose(layer[1], hires[1], rtol=1e-14)


def rank_one(channel_profile, spatial_profile, offsets):
    """A[k, s] = u_k v_s + m_k as (1, C, *S)."""
    u = np.asarray(channel_profile, float)
    v = np.asarray(spatial_profile, float)
    m = np.asarray(offsets, float)
    return (u[:, None] * v.reshape(1, -1) + m[:, None]).reshape(1, u.size, *v.shape)


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_eigencam_rank_one_closed_form(flip):
    # Centred over space, A = u (v − v̄)ᵀ: the first component is ±u/|u| and the projection is
    # ±|u| (v − v̄). The channel-mean activation is ū v + m̄, so the sign that correlates with
    # it is sign(ū): the map is ReLU(sign(ū) |u| (v − v̄)).
    u = flip * np.array([1.0, 2.0, 0.5, 3.0])
    v = np.array([[0.0, 1.0, 4.0], [2.0, 7.0, 1.0]])
    m = np.array([0.3, -1.0, 2.0, 0.0])
    activations = rank_one(u, v, m)
    expected = np.maximum(np.sign(u.mean()) * np.linalg.norm(u) * (v - v.mean()), 0)
    np.testing.assert_allclose(core.eigencam(activations)[0], expected, atol=1e-12)
    assert core.eigencam(activations)[0].argmax() == (v if flip > 0 else -v).argmax()


def test_eigencam_sign_cannot_follow_the_svd(monkeypatch):
    # A singular vector's sign is arbitrary: flip what SVD returns and the map must not change.
    rng = np.random.default_rng(6)
    activations = rng.random((2, 5, 4, 4)) + rank_one(rng.random(5), rng.random((4, 4)), np.zeros(5))
    before = core.eigencam(activations)
    assert before.max() > 0
    svd = np.linalg.svd

    def flipped(a, *args, **kwargs):
        u, s, vt = svd(a, *args, **kwargs)
        return -u, s, -vt

    monkeypatch.setattr(np.linalg, "svd", flipped)
    np.testing.assert_allclose(core.eigencam(activations), before, atol=1e-12)


def test_eigencam_matches_an_eigendecomposition_of_the_covariance():
    # An independent route to the first principal component: eigh of the C×C scatter matrix.
    rng = np.random.default_rng(7)
    activations = rng.random((3, 6, 5, 3))
    got = core.eigencam(activations)
    for n in range(3):
        points = activations[n].reshape(6, -1).T
        centred = points - points.mean(axis=0)
        _, vectors = np.linalg.eigh(centred.T @ centred)
        projection = centred @ vectors[:, -1]
        reference = points.mean(axis=1)
        if projection @ (reference - reference.mean()) < 0:
            projection = -projection
        np.testing.assert_allclose(got[n].ravel(), np.maximum(projection, 0), atol=1e-10)


def test_eigencam_of_spatially_constant_activations_is_zero():
    activations = np.broadcast_to(np.arange(4.0)[None, :, None, None], (2, 4, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam, weights = core.compute_cam("eigencam", activations, None)
    assert weights is None
    np.testing.assert_array_equal(cam, np.zeros((2, 3, 3)))


@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_k_targets_broadcast_equal_a_loop_over_targets(method):
    rng = np.random.default_rng(8)
    activations = rng.standard_normal((2, 1, 5, 4, 3))
    gradients = rng.standard_normal((2, 3, 5, 4, 3))
    cam, weights = core.compute_cam(method, activations, gradients, channel_axis=2)
    free = method in core.TARGET_FREE_METHODS
    assert cam.shape == (2, 3, 4, 3) or free
    for k in range(3):
        one_cam, one_weights = core.compute_cam(method, activations[:, 0], gradients[:, k], channel_axis=1)
        np.testing.assert_allclose(cam[:, k] if not free else cam[:, 0], one_cam, rtol=1e-12)
        if weights is not None:
            np.testing.assert_allclose(weights[:, 0 if free else k], one_weights, rtol=1e-12)
    if not free:
        # Different targets must give different maps, or the loop comparison proves little.
        assert not np.allclose(cam[:, 0], cam[:, 1])


@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_channel_axis_positions_agree(method):
    # (C, L) with channel_axis=0, (1, C, L) with 1 and with -2 are the same computation.
    rng = np.random.default_rng(9)
    activations = rng.standard_normal((4, 6))
    gradients = rng.standard_normal((4, 6))
    single, _ = core.compute_cam(method, activations, gradients, channel_axis=0)
    batched, _ = core.compute_cam(method, activations[None], gradients[None], channel_axis=1)
    negative, _ = core.compute_cam(method, activations[None], gradients[None], channel_axis=-2)
    np.testing.assert_allclose(single, batched[0], rtol=1e-12)
    np.testing.assert_allclose(negative, batched, rtol=1e-12)


def test_products_beyond_float32_stay_finite():
    # A = G = 1e30 are finite float32 but A·G = 1e60 is not: the core computes in float64.
    activations = np.full((1, 2, 2, 2), 1e30, np.float32)
    gradients = np.full((1, 2, 2, 2), 1e30, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in core.GRADIENT_METHODS:
            cam, _ = core.compute_cam(method, activations, gradients)
            assert cam.dtype == np.float64 and np.isfinite(cam).all(), method
        cam, _ = core.compute_cam("hirescam", activations, gradients)
    expected = 2 * float(np.float32(1e30)) ** 2
    np.testing.assert_allclose(cam, np.full((1, 2, 2), expected), rtol=1e-12)


def test_compute_cam_rejects_unknown_methods_and_missing_gradients():
    activations = np.ones((1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"unknown method 'gradcam\+'"):
        core.compute_cam("gradcam+", activations, activations)
    for method in GRADIENT_METHODS:
        with pytest.raises(ValueError, match="needs gradients"):
            core.compute_cam(method, activations, None)


def test_relu_and_weighted_cam_by_hand():
    np.testing.assert_array_equal(core.relu(np.array([-2.0, 0.0, 3.0])), [0.0, 0.0, 3.0])
    activations = np.array([[[[1.0, 2.0]], [[3.0, -4.0]]]])  # (1, 2, 1, 2)
    np.testing.assert_array_equal(core.weighted_cam(activations, np.array([[2.0, 1.0]])), [[[5.0, 0.0]]])


def test_methods_module_computes_in_float64():
    # The module states float64 arithmetic; float32 inputs that cancel catastrophically in
    # float32 must not: (1 + 1e-8) − 1 is 0 in float32 but 1e-8 here.
    activations = np.array([[[1.0], [1.0]]], np.float32)
    weights = np.array([[1.0 + 1e-8, -1.0]])
    assert methods_module.weighted_cam(activations, weights)[0, 0] == pytest.approx(1e-8, rel=1e-6)
