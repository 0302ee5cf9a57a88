"""Captures on Keras: K targets per sample in one forward and one vectorised backward (the same maps as
K backward passes), and several layers in one pass."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam

from .test_backend import batchnorm_model, images

pytestmark = pytest.mark.tensorflow


def tape_gradcam(model, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Raw Grad-CAM (N, K, H, W) by K plain tape gradients through a sub-model (the oracle)."""
    sub = keras.Model(model.input, [model.get_layer("relu").output, model.output])
    cams = []
    for k in range(targets.shape[1]):
        with tf.GradientTape() as tape:
            activations, output = sub(x, training=False)
            score = tf.reduce_sum(tf.gather(output, targets[:, k], batch_dims=1))
        gradients = tape.gradient(score, activations).numpy()
        weights = gradients.mean(axis=(1, 2))
        cams.append(np.maximum(np.einsum("nhwc,nc->nhw", activations.numpy(), weights), 0))
    return np.stack(cams, axis=1)


def capture_ops(explainer: anycam.Explainer, k: int) -> int:
    explainer(images(3, 10, 8, 3), target=anycam.top_k(k))
    functions = explainer.backend._program._functions
    function = next(f for key, f in functions.items() if key[:3] == ("topk", k, True))
    return len(function.get_concrete_function().graph.get_operations())


def test_k_targets_are_one_vectorised_backward_not_k() -> None:
    # K backward passes put K copies of the head's gradient in the graph; the Jacobian by
    # pfor puts one, with a leading K axis, whatever K is.
    explainer = anycam.Explainer(batchnorm_model(), "relu")
    assert capture_ops(explainer, 2) == capture_ops(explainer, 4)
    assert explainer.backend.trace_count == 2


def test_fallback_without_pfor_gives_the_same_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    x = images(3, 10, 8, 3)
    targets = np.array([[0, 3, 1], [1, 1, 2], [2, 0, 3]])
    expected = tape_gradcam(batchnorm_model(), x, targets)
    vectorised = anycam.Explainer(batchnorm_model(), "relu").explain(x, target=targets)

    def no_pfor(*args: object, **kwargs: object) -> None:
        raise ValueError("no pfor converter for this op (simulated)")

    monkeypatch.setattr(tf.GradientTape, "jacobian", no_pfor)
    looped = anycam.Explainer(batchnorm_model(), "relu").explain(x, target=targets)
    for explanation in (vectorised, looped):
        np.testing.assert_allclose(explanation.cam, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vectorised.heatmap, looped.heatmap, atol=1e-6)


def test_k_targets_come_from_one_forward_and_match_single_targets() -> None:
    model = batchnorm_model()
    x = images(2, 10, 8, 3)
    explainer = anycam.Explainer(model, "relu")
    top = explainer.explain(x, target=anycam.top_k(3))
    assert top.heatmap.shape == (2, 3, 10, 8)
    logits = model(x, training=False).numpy()
    np.testing.assert_array_equal(top.target, np.argsort(-logits, axis=1)[:, :3])
    for k in range(3):
        single = explainer.explain(x, target=top.target[:, k])
        np.testing.assert_allclose(single.heatmap, top.heatmap[:, k], atol=1e-5)
        np.testing.assert_allclose(single.scores, top.scores[:, k], rtol=1e-6)


def test_several_layers_in_one_pass() -> None:
    model = batchnorm_model()
    x = images(2, 10, 8, 3)
    both = anycam.Explainer(model, ["conv", "relu"]).explain(x, target=1)
    conv = anycam.Explainer(model, "conv").explain(x, target=1)
    relu = anycam.Explainer(model, "relu").explain(x, target=1)
    np.testing.assert_allclose(both.cams[0], conv.cam, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(both.cams[1], relu.cam, rtol=1e-5, atol=1e-7)
