"""Ablation-CAM's copies on Keras (head_scores): a skip connection over the layer, one compile for any
number of copies, and a model left as it was after a failed call."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest

import anycam

pytestmark = pytest.mark.tensorflow

CLASSES = 4


@functools.cache
def residual() -> tuple[keras.Model, keras.Model]:
    """conv → conv "mid" (explained) → ReLU → + skip from before "mid" → GAP → dense.

    Returns the model and an oracle built from the *same layers* whose second input multiplies
    the output of "mid" (a channel mask): the full network run again with channels zeroed.
    """
    keras.utils.set_random_seed(1)
    image = keras.Input((8, 8, 3))
    mask = keras.Input((4,))
    first = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="first")
    mid = keras.layers.Conv2D(4, 3, padding="same", name="mid")
    after = keras.layers.Conv2D(4, 1, name="after")
    pool = keras.layers.GlobalAveragePooling2D()
    dense = keras.layers.Dense(CLASSES)

    def network(masked: bool) -> keras.KerasTensor:
        skip = first(image)
        out = mid(skip)
        if masked:
            out = keras.layers.Multiply()([out, keras.layers.Reshape((1, 1, 4))(mask)])
        branch = keras.layers.Activation("tanh")(after(keras.layers.ReLU()(out)))
        return dense(pool(keras.layers.Add()([branch, skip])))

    model = keras.Model(image, network(False))
    oracle = keras.Model([image, mask], network(True))
    return model, oracle


def batch(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_ablation_cam_with_a_skip_connection_equals_rerunning_with_channels_zeroed() -> None:
    model, oracle = residual()
    x = batch(3, 8, 8, 3)
    explanation = anycam.Explainer(model, "mid", method="ablationcam", batch_size=5).explain(x, target=[0, 1, 2])
    classes = np.array([0, 1, 2])
    full = oracle([x, np.ones((3, 4), np.float32)]).numpy()[np.arange(3), classes]
    expected = np.zeros((3, 4))
    for channel in range(4):
        keep = np.ones((3, 4), np.float32)
        keep[:, channel] = 0
        ablated = oracle([x, keep]).numpy()[np.arange(3), classes]
        expected[:, channel] = (full - ablated) / full  # Desai & Ramaswamy 2020, eq. 2
    np.testing.assert_allclose(explanation.scores, full, rtol=1e-5)
    np.testing.assert_allclose(explanation.weights, expected, rtol=1e-4, atol=1e-5)


def test_head_scores_compile_once_for_any_number_of_copies() -> None:
    model, _ = residual()
    x = batch(2, 8, 8, 3)
    explainer = anycam.Explainer(model, "mid", method="ablationcam", batch_size=4)
    first = explainer.explain(x, target=1)
    traced = explainer.backend.trace_count
    for size in (1, 3, 8):  # other chunk sizes, another target class: no new trace
        again = anycam.Explainer(model, "mid", method="ablationcam", batch_size=size).explain(x, target=1)
        np.testing.assert_allclose(again.weights, first.weights, rtol=1e-5, atol=1e-7)
    explainer.explain(batch(2, 8, 8, 3, seed=3), target=2)
    assert explainer.backend.trace_count == traced


def test_a_failed_head_scores_call_leaves_the_layer_as_it_was() -> None:
    model, _ = residual()
    x = batch(2, 8, 8, 3)
    layer = model.get_layer("mid")
    before = model(x).numpy()
    explainer = anycam.Explainer(model, "mid", method="ablationcam")
    wrong = np.zeros((2, 2, 8, 8, 5), np.float32)  # 5 channels where the layer has 4
    with pytest.raises(anycam.InputError, match="per-sample shape"):
        explainer.backend.head_scores(x, wrong, anycam.core.parse_target(0), np.zeros((2, 1), np.int64))
    assert "call" not in vars(layer)
    np.testing.assert_array_equal(model(x).numpy(), before)
