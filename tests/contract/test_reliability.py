"""Never a silently wrong map: the checks every backend makes, and sharing one Explainer.

Each test here failed before the check it covers existed (issue 10).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import anycam


def _jobs(case):  # type: ignore[no-untyped-def]
    """(batch size, target) pairs: different batch sizes and target forms."""
    return [
        (1, None),
        (3, 2),
        (2, [4, 0]),
        (3, anycam.top_k(2)),
        (2, None),
        (1, [3]),
    ]


def test_threads_sharing_an_explainer_get_the_single_threaded_answers(kit) -> None:
    """4 threads × 50 calls, different batch sizes and targets (issue 10, item 7)."""
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer, layout=case.layout, **case.options)
    jobs = _jobs(case)
    expected = [explainer(case.inputs[:size], target=target) for size, target in jobs]
    failures: list[BaseException] = []
    mismatches: list[int] = []

    def work(offset: int) -> None:
        try:
            for call in range(50):
                index = (call + offset) % len(jobs)
                size, target = jobs[index]
                heat = explainer(case.inputs[:size], target=target)
                if heat.shape != expected[index].shape or not np.allclose(heat, expected[index], atol=1e-5):
                    mismatches.append(index)
        except BaseException as exc:  # collected: an exception in a thread would be lost
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert not mismatches


@pytest.mark.parametrize(
    "options",
    [{"no_such_option": 1}, {"model_kwargs": [("train", False)]}],
    ids=["unknown-option", "model-kwargs-not-a-dict"],
)
def test_configuration_type_errors_are_anycam_errors(kit, options) -> None:
    """Item 10: ``except anycam.AnycamError`` catches them, ``except TypeError`` still does."""
    case = kit.case("conv2d")
    with pytest.raises(anycam.ConfigTypeError) as info:
        anycam.Explainer(case.model, case.layer, **case.options, **options)
    assert isinstance(info.value, TypeError) and isinstance(info.value, anycam.AnycamError)


# -- layouts are checked, not guessed (items 1-4) ----------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_a_signal_explained_at_a_two_dim_layer_gives_a_map_of_the_signal(kit, method: str) -> None:
    """Item 1: a (N, C, L) signal through a Conv2d on x[..., None] gives (N, L) maps, exact."""
    from anycam import core

    case = kit.odd_case("signal_as_image")
    _, _, outputs = case.reference(None)
    indices = np.argmax(outputs, axis=1)[:, None]
    activations, gradients, _ = case.reference(core.one_hot(indices, outputs.shape[1]))
    result = anycam.Explainer(case.model, case.layer, method=method, **case.options).explain(case.inputs)

    expected = core.layer_cam(method, activations, gradients, case.true_layout).cam  # (N, 1, L', 1)
    assert expected.shape[-1] == 1 and len(case.input_spatial) == 1
    # The oracle: the map as the 1-D map it is, upsampled to the signal's length.
    heat = core.normalize(core.resize(expected[..., 0], case.input_spatial), spatial_ndim=1)[:, 0]
    assert result.heatmap.shape == (outputs.shape[0], *case.input_spatial)
    np.testing.assert_allclose(result.heatmap, heat, atol=1e-4)


def test_a_two_dim_input_explained_at_a_one_dim_layer_is_refused(kit) -> None:
    """Item 1, the reverse: no reading fits, and the error names both shapes."""
    case = kit.odd_case("image_to_signal")
    activations, _, _ = case.reference(None)
    explainer = anycam.Explainer(case.model, case.layer, **case.options)
    with pytest.raises(anycam.InputError) as info:
        explainer(case.inputs)
    message = str(info.value)
    assert str(tuple(activations.shape)) in message and str(tuple(case.inputs.shape)) in message


def test_tokens_are_detected_without_layout(kit) -> None:
    """Item 2: a (N, 1 + h·w, C) output under a 2-D input is read as tokens, never as 1-D."""
    case = kit.case("tokens")
    assert case.layout == "tokens"
    told = anycam.Explainer(case.model, case.layer, layout="tokens", **case.options).explain(case.inputs)
    found = anycam.Explainer(case.model, case.layer, **case.options).explain(case.inputs)
    assert found.heatmap.shape == (case.inputs.shape[0], *case.input_spatial)
    np.testing.assert_array_equal(found.heatmap, told.heatmap)
    np.testing.assert_array_equal(found.cam, told.cam)


@pytest.mark.parametrize(
    ("kind", "wrong"),
    [("tokens", "channels_first"), ("tokens", "channels_last"), ("conv2d", "tokens")],
)
def test_a_layout_that_contradicts_the_shapes_is_refused(kit, kind: str, wrong: str) -> None:
    """Item 4: a given layout is checked against the shapes the same way, not trusted."""
    case = kit.case(kind)
    explainer = anycam.Explainer(case.model, case.layer, layout=wrong, **case.options)
    with pytest.raises(anycam.InputError, match=f"layout={wrong!r} contradicts the shapes"):
        explainer(case.inputs)


# -- input checks at every adapter's boundary (items 6, 8, 9, 11) -------------------------------


def _like(kit, array: np.ndarray):  # type: ignore[no-untyped-def]
    """``array`` as the backend's own tensor type."""
    if kit.name == "torch":
        import torch

        return torch.as_tensor(array)
    if kit.name == "tensorflow":
        import tensorflow as tf

        return tf.constant(array)
    import jax.numpy as jnp

    return jnp.asarray(array)


def test_finite_inputs_whose_sum_overflows_are_accepted(kit) -> None:
    """The input check sums the input first (a NaN or inf makes the sum so); a sum that overflows
    on finite values must fall back to the element-wise check, not refuse the input."""
    case = kit.case("conv2d")
    values = np.asarray(case.inputs).astype(np.float32)
    huge = np.full_like(values, np.finfo(np.float32).max / 2)
    assert not np.isfinite(huge.sum(dtype=np.float32))
    explainer = anycam.Explainer(case.model, case.layer, **case.options)
    for given in (huge, _like(kit, huge)):
        try:
            explainer(given)
        except anycam.NonFiniteError as exc:
            # The model itself may overflow on such values; the *input* must not be blamed.
            assert "in the input" not in str(exc), exc


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_is_refused(kit, bad: float) -> None:
    """Item 6: TensorFlow's fused kernels hid a NaN input; every backend now checks the input."""
    case = kit.case("conv2d")
    values = np.asarray(case.inputs).astype(np.float32)
    values[1, 0, 0] = bad
    explainer = anycam.Explainer(case.model, case.layer, **case.options)
    with pytest.raises(anycam.NonFiniteError, match=f"{'NaN' if np.isnan(bad) else 'inf'} in the input"):
        explainer(_like(kit, values))
    with pytest.raises(anycam.NonFiniteError):
        explainer(values)


def test_an_empty_batch_is_one_clear_error(kit) -> None:
    """Item 9: N = 0 is refused with an InputError (documented in check_batch), not a NumPy error."""
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer, **case.options)
    with pytest.raises(anycam.InputError, match=r"empty batch \(N = 0\)"):
        explainer(case.inputs[:0])


def test_a_callable_target_with_no_scores_is_a_target_error(kit) -> None:
    """Item 11: (N, 0) scores raised IndexError (torch, TF) or gave an empty map (JAX)."""
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer, **case.options)
    with pytest.raises(anycam.TargetError, match=r"\(N, 0\)"):
        explainer(case.inputs, target=lambda output: output[:, :0])


def test_a_forward_that_fails_on_the_input_is_an_input_error(kit) -> None:
    """Item 8: wrong channel count → InputError naming the shape, the framework's error as cause."""
    case = kit.case("conv2d")
    values = np.asarray(case.inputs).astype(np.float32)
    axis = 1 if kit.name == "torch" else -1
    wrong = np.concatenate([values, values], axis=axis)  # 6 channels for a 3-channel model
    explainer = anycam.Explainer(case.model, case.layer, **case.options)
    with pytest.raises(anycam.InputError) as info:
        explainer(_like(kit, wrong))
    assert str(tuple(wrong.shape)) in str(info.value)
