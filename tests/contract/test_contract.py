"""The backend contract: every method × target form × layout, in every requested backend.

The expected maps are the core's math on activations and gradients that the backend's kit
computed with the framework's own autodiff, without anycam; the core itself is checked
against closed forms in tests/core.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import anycam
from anycam import core

from .kit import KINDS, POSITIONS, explain_through_head, offered_head

TARGETS = ("argmax", "int", "per_sample", "k_per_sample", "top_k", "callable")


def _target(form: str, outputs: np.ndarray, case):  # type: ignore[no-untyped-def]
    """Returns (target for the Explainer, (K, N, classes) cotangents, expected indices or None)."""
    batch, classes = outputs.shape
    rng = np.random.default_rng(1)
    if form == "callable":
        weights = rng.normal(size=classes).astype(np.float32)
        return case.linear_target(weights), np.broadcast_to(weights, (1, batch, classes)).copy(), None
    if form == "argmax":
        target, indices = None, np.argmax(outputs, axis=1)[:, None]
    elif form == "int":
        target, indices = 2, np.full((batch, 1), 2)
    elif form == "per_sample":
        indices = rng.integers(0, classes, size=(batch, 1))
        target = [int(i) for i in indices[:, 0]]
    elif form == "k_per_sample":
        indices = rng.integers(0, classes, size=(batch, 3))
        target = indices
    else:
        target, indices = anycam.top_k(2), np.argsort(-outputs, axis=1, kind="stable")[:, :2]
    return target, core.one_hot(indices, classes), indices


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", TARGETS)
@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_matches_independent_computation(kit, kind: str, form: str, method: str) -> None:
    case = kit.case(kind)
    _, _, outputs = case.reference(None)
    target, cotangents, indices = _target(form, outputs, case)
    activations, gradients, _ = case.reference(cotangents)

    explainer = anycam.Explainer(case.model, case.layer, method=method, layout=case.layout, **case.options)
    result = explainer.explain(case.inputs, target=target)

    count = cotangents.shape[0]
    expected = core.layer_cam(method, activations, gradients, case.true_layout, count=count)
    expected_heat = core.heatmaps([expected.cam], case.input_spatial)
    squeeze = form in ("argmax", "int", "per_sample", "callable")
    cam = result.cam[:, None] if squeeze else result.cam
    heat = result.heatmap[:, None] if squeeze else result.heatmap
    scale = max(float(np.abs(expected.cam).max()), 1e-12)
    np.testing.assert_allclose(cam / scale, expected.cam / scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(heat, expected_heat, atol=1e-4)
    assert heat.shape == (outputs.shape[0], count, *case.input_spatial)
    assert heat.dtype == np.float32 and heat.min() >= 0 and heat.max() <= 1
    expected_scores = np.einsum("kno,no->nk", cotangents, outputs)
    scores = result.scores[:, None] if squeeze else result.scores
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    if indices is None:
        assert result.target is None
    else:
        np.testing.assert_array_equal(result.target, indices[:, 0] if squeeze else indices)


def test_batch_equals_each_sample_alone(kit) -> None:
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer)
    batch = explainer(case.inputs, target=1)
    for index in range(batch.shape[0]):
        alone = explainer(case.inputs[index : index + 1], target=1)
        np.testing.assert_allclose(alone[0], batch[index], atol=1e-5)


def test_wrong_target_count_is_an_error(kit) -> None:
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer)
    with pytest.raises(anycam.TargetError, match="for a batch of"):
        explainer(case.inputs, target=[0, 1, 2, 3, 4, 0, 1])


def test_target_out_of_range_is_an_error(kit) -> None:
    case = kit.case("conv2d")
    with pytest.raises(anycam.TargetError, match="out of range"):
        anycam.Explainer(case.model, case.layer)(case.inputs, target=99)


def test_unknown_layer_lists_close_names(kit) -> None:
    case = kit.case("conv2d")
    with pytest.raises(anycam.LayerError, match="closest"):
        anycam.Explainer(case.model, "featurez")


@pytest.mark.parametrize("kind", POSITIONS)
@pytest.mark.parametrize("method", ("gradcam", "layercam"))
def test_gradient_methods_at_every_layer_position(kit, kind: str, method: str) -> None:
    """Where a residual block reads the layer (in place, inside, after the add, before pooling)."""
    case = kit.case(kind)
    _, _, outputs = case.reference(None)
    target, cotangents, _ = _target("k_per_sample", outputs, case)
    activations, gradients, _ = case.reference(cotangents)
    explainer = anycam.Explainer(case.model, case.layer, method=method, layout=case.layout, **case.options)
    result = explainer.explain(case.inputs, target=target)
    expected = core.layer_cam(method, activations, gradients, case.true_layout, count=cotangents.shape[0])
    scale = max(float(np.abs(expected.cam).max()), 1e-12)
    np.testing.assert_allclose(result.cam / scale, expected.cam / scale, rtol=1e-4, atol=1e-5)


# -- the methods beyond one capture (issue 9): each against a computation written here -------

BEYOND_TARGETS = ("argmax", "k_per_sample", "callable")


def _needs(case, *names: str) -> None:  # type: ignore[no-untyped-def]
    missing = [name for name in names if getattr(case, name) is None]
    if missing:
        pytest.skip(f"this backend's kit has no {', '.join(missing)} reference yet")


def _channels_first(case, activations: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return core.to_channels_first(activations, case.true_layout, lead=1)


def _scores(cotangents: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(N, K) scores of the targets that (K, N, classes) one-hot or linear cotangents select."""
    return np.einsum("kno,no->nk", cotangents, outputs)


def _check(result, form: str, cam: np.ndarray, weights: np.ndarray | None, case, scores=None) -> None:  # type: ignore[no-untyped-def]
    """Compares maps and weights; ``scores`` (N, K) marks Ablation-CAM's weights (y − y_k)/y.

    Those divide a float32 score difference by the score y, so their rounding grows as 1/|y|
    (2.7e-6 seen at y ≈ 0.05 in JAX): they are compared multiplied back by |y|, as the drops
    y − y_k, whose rounding is a few float32 ulps of the scores' scale S whatever y is (see
    tests/parity/test_parity.py::_score_scaled); 64 ulps of S.
    """
    squeeze = form in ("argmax", "int", "per_sample", "callable")
    got_cam = result.cam[:, None] if squeeze else result.cam
    scale = max(float(np.abs(cam).max()), 1e-12)
    np.testing.assert_allclose(got_cam / scale, cam / scale, rtol=1e-4, atol=1e-5)
    if weights is not None and scores is not None:
        got = result.weights[:, None] if squeeze else result.weights
        y = np.abs(np.asarray(scores, np.float64))[..., None]
        size = max(float(y.max()), float(np.abs(np.asarray(scores)[..., None] * (1 - weights)).max()))
        eps = float(np.finfo(np.float32).eps)
        np.testing.assert_allclose(got * y, weights * y, rtol=0, atol=64 * eps * size)
    elif weights is not None:
        got = result.weights[:, None] if squeeze else result.weights
        np.testing.assert_allclose(got, weights, rtol=1e-4, atol=1e-5)
    heat = result.heatmap[:, None] if squeeze else result.heatmap
    np.testing.assert_allclose(heat, core.heatmaps([cam.astype(np.float32)], case.input_spatial), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS + POSITIONS)
@pytest.mark.parametrize("form", BEYOND_TARGETS)
def test_ablationcam_equals_zeroing_each_channel_in_the_whole_model(kit, kind: str, form: str) -> None:
    case = kit.case(kind)
    _needs(case, "ablated_outputs")
    activations, _, outputs = case.reference(None)
    target, cotangents, _ = _target(form, outputs, case)
    acts = _channels_first(case, activations)
    channels = acts.shape[1]
    y = _scores(cotangents, outputs)
    drops = np.stack([_scores(cotangents, case.ablated_outputs(k)) for k in range(channels)], axis=-1)
    weights = (y[..., None] - drops) / y[..., None]  # (N, K, C), the paper's eq. 3
    cam = np.maximum(np.einsum("nkc,nc...->nk...", weights, acts), 0)
    # batch_size=4 with N=3: one copy per chunk, so chunking is exercised too.
    explainer = anycam.Explainer(
        case.model, case.layer, method="ablationcam", layout=case.layout, batch_size=4, **case.options
    )
    _check(explainer.explain(case.inputs, target=target), form, cam, weights, case, scores=y)


# Networks whose layer is read only by a global pooling: mean pooling → flatten → dense → softmax,
# and max pooling → dense. Ablation-CAM takes them through the backend's AblationHead.
POOLED_HEADS = ("pooled_head", "max_pooled_head")


@pytest.mark.parametrize("kind", POOLED_HEADS)
@pytest.mark.parametrize("form", BEYOND_TARGETS)
def test_ablationcam_of_a_pooled_head_takes_the_closed_form_and_equals_zeroing(kit, kind, form, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    case = kit.case(kind)
    activations, _, outputs = case.reference(None)
    target, cotangents, _ = _target(form, outputs, case)
    acts = _channels_first(case, activations)
    y = _scores(cotangents, outputs)
    drops = np.stack([_scores(cotangents, case.ablated_outputs(k)) for k in range(acts.shape[1])], axis=-1)
    weights = (y[..., None] - drops) / y[..., None]
    cam = np.maximum(np.einsum("nkc,nc...->nk...", weights, acts), 0)
    explainer = anycam.Explainer(case.model, case.layer, method="ablationcam", layout=case.layout, **case.options)
    result, _ = explain_through_head(explainer, case.inputs, target, monkeypatch)
    _check(result, form, cam, weights, case, scores=y)
    # The suffix on every copy (no head offered) gives the same weights.
    monkeypatch.setattr(explainer.backend, "ablation_head", lambda *a, **k: None)
    honest = explainer.explain(case.inputs, target=target)
    np.testing.assert_allclose(result.weights, honest.weights, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_no_ablation_head_when_the_layer_is_not_read_by_a_pooling_alone(kit, kind: str) -> None:
    # Every KINDS network runs a convolution (or a token block) on the layer before pooling.
    case = kit.case(kind)
    explainer = anycam.Explainer(case.model, case.layer, method="ablationcam", layout=case.layout, **case.options)
    assert offered_head(explainer, case.inputs)[0] is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", BEYOND_TARGETS)
def test_scorecam_equals_masked_forwards(kit, kind: str, form: str) -> None:
    case = kit.case(kind)
    _needs(case, "masked_outputs", "upsample")
    activations, _, outputs = case.reference(None)
    target, cotangents, _ = _target(form, outputs, case)
    acts = _channels_first(case, activations)
    up = case.upsample(acts, case.input_spatial)
    axes = tuple(range(2, up.ndim))
    low, high = up.min(axis=axes, keepdims=True), up.max(axis=axes, keepdims=True)
    masks = np.where(high > low, (up - low) / np.where(high > low, high - low, 1), 0)
    columns = []
    for channel in range(acts.shape[1]):
        masked = case.masked_outputs(masks[:, channel])
        if form == "callable":
            columns.append(_scores(cotangents, masked))  # the callable's value is the weight
        else:
            shifted = np.exp(masked - masked.max(axis=1, keepdims=True))
            columns.append(_scores(cotangents, shifted / shifted.sum(axis=1, keepdims=True)))
    weights = np.stack(columns, axis=-1)
    cam = np.maximum(np.einsum("nkc,nc...->nk...", weights, acts), 0)
    explainer = anycam.Explainer(
        case.model, case.layer, method="scorecam", layout=case.layout, batch_size=5, **case.options
    )
    _check(explainer.explain(case.inputs, target=target), form, cam, weights, case)


def _guided_explain(case, method: str, target):  # type: ignore[no-untyped-def]
    explainer = anycam.Explainer(case.model, case.layer, method=method, layout=case.layout, **case.options)
    if case.has_relu:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            # A random small net can give a legitimately all-zero Grad-CAM map; that warning is
            # not the "no ReLU" one this checks for.
            warnings.simplefilter("ignore", anycam.ZeroMapWarning)
            return explainer.explain(case.inputs, target=target)
    with pytest.warns(UserWarning, match="no ReLU") as record:
        result = explainer.explain(case.inputs, target=target)
    # The warning points at the user's call, not into anycam or the adapter.
    assert [w.filename for w in record if "no ReLU" in str(w.message)] == [__file__]
    return result


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", BEYOND_TARGETS)
def test_guided_backprop_equals_a_hand_replaced_network(kit, kind: str, form: str) -> None:
    case = kit.case(kind)
    _needs(case, "guided")
    _, _, outputs = case.reference(None)
    target, cotangents, indices = _target(form, outputs, case)
    expected = case.guided(cotangents)  # (N, K, C_in, *S)
    result = _guided_explain(case, "guided-backprop", target)
    squeeze = form == "argmax" or form == "callable"
    attribution = result.attribution[:, None] if squeeze else result.attribution
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(attribution / scale, expected / scale, rtol=1e-4, atol=1e-6)
    reduced = np.abs(expected).sum(axis=2)
    heat = result.heatmap[:, None] if squeeze else result.heatmap
    np.testing.assert_allclose(heat, core.normalize(reduced, spatial_ndim=len(case.input_spatial)), atol=1e-4)
    scores = result.scores[:, None] if squeeze else result.scores
    np.testing.assert_allclose(scores, _scores(cotangents, outputs), rtol=1e-5, atol=1e-6)
    if indices is not None:
        np.testing.assert_array_equal(result.target, indices[:, 0] if squeeze else indices)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", BEYOND_TARGETS)
def test_guided_gradcam_equals_guided_gradients_times_upsampled_gradcam(kit, kind: str, form: str) -> None:
    case = kit.case(kind)
    _needs(case, "guided", "upsample")
    _, _, outputs = case.reference(None)
    target, cotangents, _ = _target(form, outputs, case)
    activations, gradients, _ = case.reference(cotangents)
    gradcam = core.layer_cam("gradcam", activations, gradients, case.true_layout, count=cotangents.shape[0])
    up = case.upsample(gradcam.cam.astype(np.float64), case.input_spatial)
    expected = case.guided(cotangents) * up[:, :, None]
    result = _guided_explain(case, "guided-gradcam", target)
    squeeze = form == "argmax" or form == "callable"
    attribution = result.attribution[:, None] if squeeze else result.attribution
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(attribution / scale, expected / scale, rtol=1e-4, atol=1e-6)
    cam = result.cam[:, None] if squeeze else result.cam
    np.testing.assert_allclose(cam, gradcam.cam, rtol=1e-4, atol=1e-6)


# -- round 2 (issue 19/20): one contract for every method and backend -----------------------


@pytest.mark.parametrize("method", ("gradcam", "scorecam", "ablationcam", "guided-backprop"))
@pytest.mark.parametrize("container", ("tuple", "dict"))
def test_inputs_of_different_batch_sizes_are_refused_naming_each(kit, method: str, container: str, request) -> None:  # type: ignore[no-untyped-def]
    """Item 19.4: one image with the metadata of two other rows is never broadcast."""
    case = kit.case("conv2d")
    batch = case.reference(None)[2].shape[0]
    meta = np.zeros((batch + 1, 4), np.float32)
    inputs = (case.inputs, meta) if container == "tuple" else {"image": case.inputs, "meta": meta}
    first, second = (0, 1) if container == "tuple" else ("'image'", "'meta'")
    explainer = anycam.Explainer(case.model, case.layer, method=method, layout=case.layout, **case.options)
    with pytest.raises(anycam.InputError, match="different batch sizes") as info:
        explainer.explain(inputs)
    assert f"{first}: N={batch}" in str(info.value) and f"{second}: N={batch + 1}" in str(info.value)


@pytest.mark.parametrize("kind", ("conv2d", "channels_last"))
@pytest.mark.parametrize("chunk", (1, 5, None))
def test_scorecam_hands_a_callable_target_the_n_samples_in_order(kit, kind: str, chunk: int | None) -> None:
    """Item 19.5: a per-sample callable (row i scores sample i) gets what it gets in Grad-CAM.

    The target weights sample i's outputs by its own row W_i, so it raises if it is given any
    other number of rows, and weights the wrong sample if the rows are out of order. Oracle: the
    masked forwards written here, scored with W.
    """
    case = kit.case(kind)
    _needs(case, "masked_outputs", "upsample")
    activations, _, outputs = case.reference(None)
    batch, classes = outputs.shape
    per_sample = np.random.default_rng(5).normal(size=(batch, classes)).astype(np.float32)
    sum_classes = case.linear_target(np.ones(classes, np.float32))

    def target(output):  # type: ignore[no-untyped-def]
        # A torch tensor times a NumPy array goes through NumPy; new_tensor keeps it in torch.
        weights = output.new_tensor(per_sample) if hasattr(output, "new_tensor") else per_sample
        return sum_classes(output * weights)  # (N, classes) * (N, classes): rows must be the N samples

    acts = _channels_first(case, activations)
    up = case.upsample(acts, case.input_spatial)
    axes = tuple(range(2, up.ndim))
    low, high = up.min(axis=axes, keepdims=True), up.max(axis=axes, keepdims=True)
    masks = np.where(high > low, (up - low) / np.where(high > low, high - low, 1), 0)
    weights = np.stack(
        [np.einsum("no,no->n", per_sample, case.masked_outputs(masks[:, c])) for c in range(acts.shape[1])], axis=-1
    )[:, None]
    cam = np.maximum(np.einsum("nkc,nc...->nk...", weights, acts), 0)
    explainer = anycam.Explainer(
        case.model, case.layer, method="scorecam", layout=case.layout, batch_size=chunk, **case.options
    )
    _check(explainer.explain(case.inputs, target=target), "callable", cam, weights, case)


def test_scorecam_probability_of_one_output_is_its_sigmoid(kit) -> None:
    """Item 19.6: a one-output model's "probability" is σ(logit), not a softmax over one value (≡ 1)."""
    case = kit.case("conv2d")
    _needs(case, "masked_outputs", "upsample")
    activations, _, _ = case.reference(None)
    acts = _channels_first(case, activations)
    up = case.upsample(acts, case.input_spatial)
    axes = tuple(range(2, up.ndim))
    low, high = up.min(axis=axes, keepdims=True), up.max(axis=axes, keepdims=True)
    masks = np.where(high > low, (up - low) / np.where(high > low, high - low, 1), 0)
    logits = np.stack([case.masked_outputs(masks[:, c])[:, 0] for c in range(acts.shape[1])], axis=-1)
    weights = (1.0 / (1.0 + np.exp(-logits.astype(np.float64))))[:, None]  # (N, 1, C)
    cam = np.maximum(np.einsum("nkc,nc...->nk...", weights, acts), 0)
    options = {**case.options, "output": lambda out: out[:, :1]}  # the model's first logit alone
    explainer = anycam.Explainer(case.model, case.layer, method="scorecam", layout=case.layout, **options)
    result = explainer.explain(case.inputs)
    assert not np.allclose(result.weights, 1.0)
    _check(result, "argmax", cam, weights, case)


def test_guided_backprop_needs_no_layer(kit, request) -> None:  # type: ignore[no-untyped-def]
    """Item 20.4: guided backprop reads no layer, so layer=None must not fail on choosing one."""
    case = kit.case("conv2d")
    _needs(case, "guided")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        given = anycam.Explainer(case.model, case.layer, method="guided-backprop", **case.options).explain(case.inputs)
        explainer = anycam.Explainer(case.model, method="guided-backprop", **case.options)
        auto = explainer.explain(case.inputs)
    np.testing.assert_array_equal(auto.attribution, given.attribution)
    np.testing.assert_array_equal(auto.heatmap, given.heatmap)
    # A backend that chooses the automatic layer without a forward pass (JAX) names it.
    assert auto.layer == (explainer.layer_names[0] if explainer.layer_names else ())


def test_progress_true_draws_a_bar_on_every_long_running_entry_point(kit, capsys) -> None:  # type: ignore[no-untyped-def]
    """Item 20.3: Score-CAM, Ablation-CAM, TTA and the sanity check draw a tqdm bar for progress=True."""
    pytest.importorskip("tqdm")
    case = kit.case("conv2d")
    options = {"layout": case.layout, **case.options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        for method in ("scorecam", "ablationcam"):
            anycam.Explainer(case.model, case.layer, method=method, progress=True, **options).explain(case.inputs)
            assert f"anycam {method} " in capsys.readouterr().err
            anycam.Explainer(case.model, case.layer, method=method, progress=False, **options).explain(case.inputs)
            assert capsys.readouterr().err == ""
        explainer = anycam.Explainer(case.model, case.layer, progress=True, **options)
        anycam.TTAExplainer(explainer, flip=True).explain(case.inputs)  # two views of one size (Keras fixes it)
        assert "anycam tta:" in capsys.readouterr().err
        anycam.sanity_check(explainer, case.inputs, mode="full", progress=True)
        assert "anycam sanity_check full:" in capsys.readouterr().err
        anycam.sanity_check(explainer, case.inputs, mode="full", progress=False)
        assert capsys.readouterr().err == ""


def test_ablationcam_hands_a_callable_target_the_n_samples_in_order(kit) -> None:  # type: ignore[no-untyped-def]
    """Item 19.5's contract in Ablation-CAM: each ablated copy's N rows, in order, to a per-sample callable."""
    case = kit.case("conv2d")
    _needs(case, "ablated_outputs")
    activations, _, outputs = case.reference(None)
    batch, classes = outputs.shape
    per_sample = np.random.default_rng(6).normal(size=(batch, classes)).astype(np.float32)
    sum_classes = case.linear_target(np.ones(classes, np.float32))

    def target(output):  # type: ignore[no-untyped-def]
        weights = output.new_tensor(per_sample) if hasattr(output, "new_tensor") else per_sample
        return sum_classes(output * weights)

    acts = _channels_first(case, activations)
    y = np.einsum("no,no->n", per_sample, outputs)[:, None]
    drops = np.stack(
        [np.einsum("no,no->n", per_sample, case.ablated_outputs(k)) for k in range(acts.shape[1])], axis=-1
    )[:, None]
    weights = (y[..., None] - drops) / y[..., None]
    cam = np.maximum(np.einsum("nkc,nc...->nk...", weights, acts), 0)
    explainer = anycam.Explainer(
        case.model, case.layer, method="ablationcam", layout=case.layout, batch_size=4, **case.options
    )
    _check(explainer.explain(case.inputs, target=target), "callable", cam, weights, case, scores=y)


def test_an_unknown_option_names_the_near_miss(kit) -> None:  # type: ignore[no-untyped-def]
    """Item 19.14: ``normalise=`` is answered with ``normalize``, not only the backend's option list."""
    case = kit.case("conv2d")
    with pytest.raises(anycam.ConfigTypeError, match="closest: 'normalize'"):
        anycam.Explainer(case.model, case.layer, normalise="max", **case.options)


def test_an_unknown_layer_with_no_close_name_lists_candidates(kit, request) -> None:  # type: ignore[no-untyped-def]
    """Item 20.6: a name with no near miss lists the top-level layers and the automatic choice."""
    case = kit.case("conv2d")
    with pytest.raises(anycam.LayerError, match="layer=None") as info:
        anycam.Explainer(case.model, "qqqqqqqqqqqq", **case.options)
    assert "top-level layers" in str(info.value)
