"""Oracles for the issue-9 core math: Score-CAM, Ablation-CAM, guided products, the extra CAMs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import anycam
from anycam import core


def test_scorecam_masks_by_hand():
    # [0, 1] upsampled to 4 with half-pixel centres is [0, .25, .75, 1]; with aligned corners
    # (torch's UpsamplingBilinear2d) it is [0, 1/3, 2/3, 1]. Both already span [0, 1].
    maps = np.array([[[0.0, 1.0]], [[2.0, 6.0]]])  # (C=2, 1, 2)
    np.testing.assert_allclose(core.scorecam_masks(maps, (1, 4))[:, 0], [[0, 0.25, 0.75, 1]] * 2, atol=1e-12)
    np.testing.assert_allclose(
        core.scorecam_masks(maps, (1, 4), align_corners=True)[:, 0], [[0, 1 / 3, 2 / 3, 1]] * 2, atol=1e-12
    )


def test_scorecam_masks_of_a_flat_channel_are_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = core.scorecam_masks(np.full((1, 3, 3), 5.0), (6, 6))
    np.testing.assert_array_equal(masks, np.zeros((1, 6, 6)))


def test_scorecam_masks_are_minmax_of_the_upsampled_channel_in_3d():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((2, 3, 2, 4, 3))
    masks = core.scorecam_masks(maps, (4, 8, 6))
    up = core.resize(maps, (4, 8, 6))
    low = up.min(axis=(2, 3, 4), keepdims=True)
    high = up.max(axis=(2, 3, 4), keepdims=True)
    np.testing.assert_allclose(masks, (up - low) / (high - low), atol=1e-12)


def test_scorecam_weights_closed_forms():
    scores = np.array([[1.0, 2.0, 3.0]])
    expected = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(core.scorecam_weights(scores, "softmax"), expected, rtol=1e-12)
    np.testing.assert_allclose(core.scorecam_weights(scores, "pytorch-grad-cam"), expected, rtol=1e-12)
    np.testing.assert_array_equal(core.scorecam_weights(scores, "probability"), scores)
    # A baseline score subtracted from every channel cancels in the channel softmax.
    np.testing.assert_allclose(core.scorecam_weights(scores - 7.5, "softmax"), expected, rtol=1e-12)
    # Channels left out (Faster Score-CAM) get 0 and leave the softmax of the others.
    mask = np.array([[True, False, True]])
    kept = np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum()
    np.testing.assert_allclose(core.scorecam_weights(scores, "softmax", mask=mask), [[kept[0], 0, kept[1]]])
    np.testing.assert_array_equal(core.scorecam_weights(scores, "probability", mask=mask), [[1.0, 0.0, 3.0]])
    with pytest.raises(anycam.ConfigError, match="unknown Score-CAM variant"):
        core.scorecam_weights(scores, "paper")


def test_scorecam_softmax_is_stable_for_huge_scores():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = core.scorecam_weights(np.array([[1000.0, 1000.0, -1000.0]]), "softmax")
    np.testing.assert_allclose(weights, [[0.5, 0.5, 0.0]], atol=1e-12)


def test_top_variance_channels():
    activations = np.zeros((2, 4, 3))
    activations[0, 1] = [0, 10, 0]  # largest variance in sample 0
    activations[0, 3] = [0, 1, 0]
    activations[1, 2] = [5, -5, 5]
    activations[1, 0] = [1, 0, 0]
    np.testing.assert_array_equal(core.top_variance_channels(activations, 2), [[1, 3], [2, 0]])
    # Ties keep channel order; k beyond C takes every channel.
    np.testing.assert_array_equal(core.top_variance_channels(np.zeros((1, 3, 2)), 5), [[0, 1, 2]])
    with pytest.raises(anycam.ConfigError):
        core.top_variance_channels(activations, 0)


def test_ablation_weights_closed_form_and_zero_score_rule():
    np.testing.assert_allclose(core.ablation_weights(np.array([4.0]), np.array([[3.0, 5.0, 4.0]])), [[0.25, -0.25, 0]])
    # y < 0: the paper's formula divides by the signed y.
    np.testing.assert_allclose(core.ablation_weights(np.array([-2.0]), np.array([[-1.0]])), [[0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero = core.ablation_weights(np.array([0.0]), np.array([[1.0, -2.0]]))
    np.testing.assert_array_equal(zero, [[-1.0, 2.0]])


def test_ablation_cam_of_a_linear_gap_head_is_cam_over_the_score():
    # y = Σ_k v_k mean(A_k): zeroing channel k removes exactly v_k mean(A_k), so
    # w_k = v_k mean(A_k) / y and Ablation-CAM is ReLU(Σ_k w_k A_k).
    rng = np.random.default_rng(1)
    activations = rng.random((2, 3, 4, 4))
    head = rng.standard_normal(3)
    means = activations.mean(axis=(2, 3))
    y = means @ head
    channels = np.arange(3)
    copies = core.ablated_copies(activations, channels, channel_axis=1)  # (C, N, C, H, W)
    ablated = np.einsum("bnc,c->nb", copies.mean(axis=(3, 4)), head)
    weights = core.ablation_weights(y, ablated)
    np.testing.assert_allclose(weights, head * means / y[:, None], atol=1e-6)  # copies are float32


def test_ablated_copies_zero_one_channel_each_in_both_layouts():
    activations = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) + 1
    first = core.ablated_copies(activations, [2, 0], channel_axis=1)
    assert first.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(first[0, :, 2], 0)
    np.testing.assert_array_equal(first[0, :, :2], activations[:, :2])
    np.testing.assert_array_equal(first[1, :, 0], 0)
    last = core.ablated_copies(np.moveaxis(activations, 1, -1), [1], channel_axis=-1)
    np.testing.assert_array_equal(last[0, ..., 1], 0)
    np.testing.assert_array_equal(last[0, ..., 0], np.moveaxis(activations, 1, -1)[..., 0])


def test_guided_gradcam_and_attribution_map_by_hand():
    guided = np.array([[[[1.0, -2.0]], [[3.0, 4.0]]]])  # (N=1, C=2, 1, 2)
    cam = np.array([[[0.5, 2.0]]])  # (N, 1, 2)
    product = core.guided_gradcam(guided, cam)
    np.testing.assert_allclose(product, [[[[0.5, -4.0]], [[1.5, 8.0]]]])
    np.testing.assert_allclose(core.attribution_map(product), [[[2.0, 12.0]]])


def test_gradcam_elementwise_closed_form():
    activations = np.array([[[1.0, 2.0], [3.0, 1.0]]])
    gradients = np.array([[[1.0, -1.0], [-1.0, 2.0]]])
    # Σ_k ReLU(G ⊙ A) = ReLU([1, -2]) + ReLU([-3, 2]) = [1, 2]; HiResCAM would give ReLU([-2, 0]).
    cam, weights = core.compute_cam("gradcam-elementwise", activations, gradients)
    np.testing.assert_allclose(cam, [[1.0, 2.0]])
    assert weights is None
    np.testing.assert_allclose(core.compute_cam("hirescam", activations, gradients)[0], [[0.0, 0.0]])


def test_eigengradcam_is_eigencam_of_the_product_with_a_rank_one_closed_form():
    # A ⊙ G = u vᵀ (rank one, centred columns): the first principal component is v and the
    # projection is u·|v|, sign chosen to correlate with the channel mean of the product.
    u = np.array([1.0, -1.0, 2.0, -2.0])  # over 4 positions, mean 0
    v = np.array([3.0, 1.0])  # over 2 channels
    product = np.outer(v, u).reshape(1, 2, 2, 2)  # (N, C, H, W)
    activations = np.abs(product) + 1.0
    gradients = product / activations
    cam, _ = core.compute_cam("eigengradcam", activations, gradients, rectify=False)
    np.testing.assert_allclose(cam.reshape(-1), u * np.linalg.norm(v), atol=1e-9)
    np.testing.assert_allclose(cam, core.eigencam(activations * gradients, rectify=False), atol=1e-12)


def _kpca_by_power_iteration(points: np.ndarray, gamma: float, coef0: float = 1.0) -> np.ndarray:
    """Independent kernel PCA: H K H with H = I − 11ᵀ/Z, top eigenpair by shifted power iteration."""
    centred = points - points.mean(axis=0)
    kernel = np.tanh(gamma * centred @ centred.T + coef0)
    count = len(points)
    h = np.eye(count) - np.ones((count, count)) / count
    gram = h @ kernel @ h
    shift = np.abs(gram).sum(axis=1).max()  # makes the largest *algebraic* eigenvalue dominant
    vector = np.random.default_rng(0).standard_normal(count)
    for _ in range(5000):
        vector = (gram + shift * np.eye(count)) @ vector
        vector /= np.linalg.norm(vector)
    value = vector @ gram @ vector
    return vector * np.sqrt(value)


def test_kpcacam_equals_an_independent_kernel_pca():
    rng = np.random.default_rng(3)
    activations = rng.random((2, 5, 3, 4)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1])[None, :, None, None]
    cam = core.kpcacam(activations, rectify=False)
    for n in range(2):
        points = activations[n].reshape(5, -1).T
        expected = _kpca_by_power_iteration(points, gamma=1 / 5)
        got = cam[n].reshape(-1)
        sign = np.sign(got @ expected)
        np.testing.assert_allclose(got, sign * expected, atol=1e-6)
        # The sign rule: positive correlation with the channel-mean activation.
        reference = points.mean(axis=1)
        assert got @ (reference - reference.mean()) >= 0


def test_kpcacam_refuses_huge_layers_and_is_zero_for_constant_ones():
    with pytest.raises(anycam.ConfigError, match="kernel"):
        core.kpcacam(np.zeros((1, 2, 100, 100)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(core.kpcacam(np.ones((1, 3, 2, 2))), np.zeros((1, 2, 2)))


def test_randomcam_weights_are_seeded_uniform_and_shared_by_samples():
    activations = np.random.default_rng(4).random((3, 1, 50, 2, 2))
    cam, weights = core.compute_cam("randomcam", activations, None, channel_axis=2, seed=7)
    again, same = core.compute_cam("randomcam", activations, None, channel_axis=2, seed=7)
    _, other = core.compute_cam("randomcam", activations, None, channel_axis=2, seed=8)
    assert weights is not None and same is not None and other is not None
    np.testing.assert_array_equal(weights, same)
    np.testing.assert_array_equal(cam, again)
    assert not np.allclose(weights, other)
    assert weights.shape == (3, 1, 50) and np.all(np.abs(weights) <= 1)
    np.testing.assert_array_equal(weights[0], weights[2])
    np.testing.assert_array_equal(weights[0, 0], np.random.default_rng(7).uniform(-1, 1, 50))
    np.testing.assert_allclose(cam, core.weighted_cam(activations, weights, channel_axis=2), rtol=1e-12)


def test_methods_needing_more_than_a_capture_say_so():
    for method in (*core.SCORE_METHODS, *core.GUIDED_METHODS, *core.methods.ATTENTION_METHODS):
        with pytest.raises(anycam.ConfigError, match="needs more than one capture"):
            core.compute_cam(method, np.ones((1, 2, 2, 2)), None)
    assert set(core.METHODS) == {
        *core.CAPTURE_METHODS,
        *core.SCORE_METHODS,
        *core.GUIDED_METHODS,
        *core.methods.ATTENTION_METHODS,
    }
