"""The pipeline: layout → method → upsample → normalise → aggregate, and finiteness checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import anycam
from anycam import core


@pytest.fixture(autouse=True)
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def peak(size=7, at=(3, 3)):
    cam = np.zeros((1, 1, size, size))
    cam[(0, 0, *at)] = 1.0
    return cam


def test_upsample_then_normalise_spans_exactly_zero_to_one():
    heat = core.heatmaps([peak() * 5.0 + 2.0], (224, 224))
    assert heat.shape == (1, 1, 224, 224) and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0


def test_normalising_first_would_not_reach_one():
    # 7 → 224 with half-pixel centres: output i samples (i + ½)/32 − ½, so the pixels nearest
    # source centre 3 sample 3 ∓ 1/64 and the peak keeps (63/64) per axis: (63/64)² ≈ 0.969.
    cam = peak()
    wrong_order = core.resize(core.normalize(cam), (224, 224))
    assert wrong_order.max() == pytest.approx((63 / 64) ** 2, rel=1e-12)
    assert wrong_order.max() < 1
    right_order = core.heatmaps([cam], (224, 224))
    assert right_order.max() == 1.0
    # The two orders differ by exactly the rescaling by that peak (the minimum stays 0).
    np.testing.assert_allclose(right_order, wrong_order / (63 / 64) ** 2, atol=1e-6)


def test_heatmap_of_a_gap_head_is_the_normalised_upsampled_cam():
    # CAM oracle end to end: ReLU(Σ_k W_k A_k) / Z, upsampled 4×4 → 8×8 by hand-known weights.
    rng = np.random.default_rng(18)
    activations = rng.random((2, 3, 4, 4)).astype(np.float32)
    head = rng.standard_normal((5, 3))
    targets = np.array([[1, 4], [0, 2]])  # (N, K)
    gradients = np.stack(
        [np.broadcast_to(head[targets[:, k]][:, :, None, None] / 16, (2, 3, 4, 4)) for k in range(2)], axis=1
    ).astype(np.float32)
    result = core.layer_cam("gradcam", activations, gradients, "channels_first", count=2)
    signed = np.einsum("nkc,nchw->nkhw", head[targets], activations.astype(float))
    # Every map has a clipped and a kept part, so the ReLU and the normalisation both matter.
    assert ((signed > 0).any(axis=(2, 3)) & (signed < 0).any(axis=(2, 3))).all()
    cam = np.maximum(signed, 0) / 16
    np.testing.assert_allclose(result.cam, cam, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.weights, head[targets] / 16, rtol=1e-6)
    # 4 → 8: rows/cols sample -0.25, 0.25, 0.75, ..., 3.25 → weights (1,0), (.75,.25), (.25,.75), ...
    matrix = np.zeros((8, 4))
    for i in range(8):
        source = min(max((i + 0.5) / 2 - 0.5, 0), 3)
        low = min(math.floor(source), 3)
        high = min(low + 1, 3)
        matrix[i, low] += 1 - (source - low)
        matrix[i, high] += source - low
    upsampled = np.einsum("ih,nkhw,jw->nkij", matrix, cam, matrix)
    low = upsampled.min(axis=(2, 3), keepdims=True)
    high = upsampled.max(axis=(2, 3), keepdims=True)
    heat = core.heatmaps([result.cam], (8, 8))
    np.testing.assert_allclose(heat, (upsampled - low) / (high - low), atol=1e-6)


def test_heatmap_max_normalisation_and_no_resize():
    cam = np.array([[[[0.0, 2.0], [4.0, 8.0]]]])
    np.testing.assert_array_equal(core.heatmaps([cam], None, normalization="max"), [[[[0, 0.25], [0.5, 1]]]])
    np.testing.assert_array_equal(core.heatmaps([cam], (9, 9), resize_mode=None), [[[[0, 0.25], [0.5, 1]]]])
    raw = core.heatmaps([cam], (4, 4), normalization=None)
    np.testing.assert_allclose(raw[0, 0, 0], [0.0, 0.5, 1.5, 2.0])


def test_heatmap_nearest():
    cam = np.array([[[[1.0, 3.0], [5.0, 9.0]]]])
    heat = core.heatmaps([cam], (3, 4), resize_mode="nearest")
    np.testing.assert_array_equal(heat[0, 0], [[0, 0, 0.25, 0.25], [0, 0, 0.25, 0.25], [0.5, 0.5, 1, 1]])


def test_volumes_are_normalised_over_all_spatial_axes():
    # Varies only along depth: a per-slice normalisation would give zeros, a per-volume one the
    # depth profile 0, ¼, ¾, 1 of a 2 → 4 upsampling.
    cam = np.zeros((1, 1, 2, 3, 3))
    cam[0, 0, 1] = 7.0
    heat = core.heatmaps([cam], (4, 5, 2))
    assert heat.shape == (1, 1, 4, 5, 2)
    np.testing.assert_allclose(heat[0, 0, :, 2, 1], [0, 0.25, 0.75, 1], atol=1e-7)
    np.testing.assert_allclose(heat[0, 0], np.broadcast_to(heat[0, 0, :, :1, :1], (4, 5, 2)))


def test_multi_layer_mean_and_max_by_hand():
    first = np.array([[[[0.0, 1.0], [2.0, 4.0]]]])  # minmax → [[0, ¼], [½, 1]]
    second = np.array([[[[3.0, 0.0], [1.0, 1.0]]]])  # minmax → [[1, 0], [⅓, ⅓]]
    # mean [[½, ⅛], [5/12, ⅔]] → minmax over span 13/24.
    mean = core.heatmaps([first, second], None, aggregate="mean")
    np.testing.assert_allclose(mean[0, 0], [[9 / 13, 0.0], [7 / 13, 1.0]], atol=1e-7)
    # max [[1, ¼], [½, 1]] → minmax.
    maxed = core.heatmaps([first, second], None, aggregate="max")
    np.testing.assert_allclose(maxed[0, 0], [[1.0, 0.0], [1 / 3, 1.0]], atol=1e-7)
    np.testing.assert_array_equal(core.heatmaps([first, second], None), mean)


def test_multi_layer_maps_of_different_resolutions_meet_at_the_output_size():
    rng = np.random.default_rng(1)
    coarse, fine = rng.random((2, 3, 4, 4)), rng.random((2, 3, 8, 8))
    heat = core.heatmaps([coarse, fine], (16, 16), aggregate="mean")
    each = [core.normalize(core.resize(m, (16, 16))) for m in (coarse, fine)]
    np.testing.assert_allclose(heat, core.normalize((each[0] + each[1]) / 2), atol=1e-6)
    assert heat.min(axis=(2, 3)).max() == 0.0 and heat.max(axis=(2, 3)).min() == 1.0


def test_multi_layer_errors():
    with pytest.raises(ValueError, match="different shapes"):
        core.heatmaps([np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3))], None)
    with pytest.raises(ValueError, match="unknown aggregate 'sum'"):
        core.heatmaps([np.ones((1, 1, 2, 2))], None, aggregate="sum")


@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_layer_cam_channels_last_with_k_targets_equals_channels_first(method):
    rng = np.random.default_rng(2)
    activations = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)  # (N, H, W, C)
    gradients = rng.standard_normal((2, 2, 5, 4, 3)).astype(np.float32)  # (N, K, H, W, C)
    result = core.layer_cam(method, activations, gradients, "channels_last", count=2)
    assert result.cam.dtype == np.float32 and result.cam.shape == (2, 2, 5, 4)
    for k in range(2):
        cam, weights = core.compute_cam(method, np.moveaxis(activations, -1, 1), np.moveaxis(gradients[:, k], -1, 1))
        np.testing.assert_allclose(result.cam[:, k], cam, rtol=1e-6, atol=1e-6)
        if weights is None:
            assert result.weights is None
        else:
            assert result.weights.dtype == np.float32
            np.testing.assert_allclose(result.weights[:, k], weights, rtol=1e-6)


def test_layer_cam_eigencam_repeats_one_map_for_every_target():
    activations = np.random.default_rng(3).random((2, 4, 3, 3))
    result = core.layer_cam("eigencam", activations, None, "channels_first", count=3)
    expected = core.eigencam(activations)
    assert result.weights is None
    for k in range(3):
        np.testing.assert_allclose(result.cam[:, k], expected, rtol=1e-6)


def test_layer_cam_tokens_ignore_the_class_token():
    # Grad-CAM weights on tokens are means over the patch tokens only: a huge gradient on the
    # class token must not leak into them.
    rng = np.random.default_rng(4)
    patches = rng.random((1, 9, 4))  # (N, T=9, C)
    patch_grads = rng.standard_normal((1, 1, 9, 4))
    tokens = np.concatenate([np.full((1, 1, 4), 50.0), patches], axis=1)
    token_grads = np.concatenate([np.full((1, 1, 1, 4), 1e6), patch_grads], axis=2)
    result = core.layer_cam("gradcam", tokens, token_grads, "tokens")
    weights = patch_grads[0, 0].mean(axis=0)
    np.testing.assert_allclose(result.weights[0, 0], weights, rtol=1e-6)
    cam = np.maximum(patches[0] @ weights, 0).reshape(3, 3)
    np.testing.assert_allclose(result.cam[0, 0], cam, rtol=1e-5, atol=1e-7)


def test_layer_cam_saturates_instead_of_overflowing_float32():
    # 1e30 activations and gradients are finite float32; their products (2e60 here) are not.
    # The cast to float32 must neither warn nor produce inf (an inf map upsamples to NaN).
    activations = np.full((1, 2, 3, 3), 1e30, np.float32)
    gradients = np.full((1, 1, 2, 3, 3), 1e30, np.float32)
    limit = np.finfo(np.float32).max
    result = core.layer_cam("hirescam", activations, gradients, "channels_first")
    np.testing.assert_array_equal(result.cam, np.full((1, 1, 3, 3), limit, np.float32))
    result = core.layer_cam("gradcam", activations, gradients, "channels_first")
    np.testing.assert_array_equal(result.weights, np.full((1, 1, 2), np.float32(1e30)))
    heat = core.heatmaps([result.cam], (6, 6))
    assert np.isfinite(heat).all()
    # Within float32's range the map is exact: 1e19 · 1e19 · 2 = 2e38 < 3.4e38.
    result = core.layer_cam("hirescam", activations / 1e11, gradients / 1e11, "channels_first")
    np.testing.assert_allclose(result.cam, 2 * float(np.float32(1e19)) ** 2, rtol=1e-6)


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_check_finite_names_the_layer(value, kind):
    array = np.zeros((2, 3, 4, 4), np.float32)
    array[1, 2, 0, 3] = value
    array[1, 2, 3, 3] = value
    with pytest.raises(anycam.NonFiniteError) as info:
        core.check_finite(array, "gradients", "layer4.1.conv2")
    message = str(info.value)
    assert f"{kind} in the gradients of layer 'layer4.1.conv2'" in message
    assert "(1, 2, 0, 3)" in message and "2 values in all" in message
    assert isinstance(info.value, anycam.AnycamError) and isinstance(info.value, FloatingPointError)


def test_check_finite_accepts_extreme_finite_values():
    limit = np.finfo(np.float32).max
    assert core.check_finite(np.array([limit, -limit, 0.0, 1e-45], np.float32), "activations", "x") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "gradcam+"},
        {"normalize": "l2"},
        {"upsample": "cubic"},
        {"aggregate": "sum"},
        {"layout": "HWNC"},
        {"input_layout": "tokens?"},
    ],
)
def test_explainer_configuration_errors_are_anycam_value_errors(kwargs) -> None:
    """Issue 10, item 10: one family; the builtin still catches them. No framework needed."""
    import anycam

    with pytest.raises(anycam.ConfigError) as info:
        anycam.Explainer(object(), "layer", **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, anycam.AnycamError)


@pytest.mark.parametrize(
    "call",
    [
        lambda: core.compute_cam("nope", np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 3))),
        lambda: core.normalize(np.ones((1, 3, 3)), "l2"),
        lambda: core.resize(np.ones((1, 3, 3)), (4, 4), "cubic"),
        lambda: core.heatmaps([np.ones((1, 1, 3, 3))], (4, 4), aggregate="sum"),
        lambda: core.canonical_layout("sideways"),
    ],
)
def test_core_configuration_errors_are_anycam_errors(call) -> None:
    import anycam

    with pytest.raises(anycam.ConfigError):
        call()


def test_a_missing_output_key_lists_the_keys_and_the_closest():
    """Issue 10, item 15: output='logit' for a dict output names what is there."""
    from anycam.protocol.backend import select_output

    with pytest.raises(anycam.TargetError, match=r"its keys are 'logits', 'hidden_states'; closest: 'logits'"):
        select_output({"logits": 1, "hidden_states": 2}, "logit")
    with pytest.raises(anycam.TargetError, match=r"3 items: use an index 0..2"):
        select_output((1, 2, 3), 5)
