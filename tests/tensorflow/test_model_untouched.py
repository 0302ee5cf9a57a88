"""Issue 19.2: no method changes a Keras model with BatchNormalization and Dropout.

Every variable (weights, BatchNormalization's moving statistics, Dropout's seed state) is
bit-identical after each method, every layer keeps its attributes, and the model's own
inference output is unchanged — also after the user ran the model in training mode.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam

pytestmark = pytest.mark.tensorflow


def bn_dropout_net() -> keras.Model:
    keras.utils.set_random_seed(4)
    image = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(image)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.SpatialDropout2D(0.3, name="drop2d")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", name="features")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    return keras.Model(image, keras.layers.Dense(4, name="logits")(h))


def snapshot(model: keras.Model) -> dict[str, tuple[bytes, tuple[int, ...], str]]:
    """Every variable's bytes, by path: weights, moving statistics and seed states alike."""
    return {v.path: (np.asarray(v.numpy()).tobytes(), tuple(v.shape), str(v.dtype)) for v in model.variables}


def attributes(model: keras.Model) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Each layer's instance attribute names and trainable flag (a left-over patched ``call`` shows here)."""
    return {layer.name: (tuple(sorted(vars(layer))), layer.trainable) for layer in model._flatten_layers()}


@pytest.fixture(scope="module")
def trained() -> keras.Model:
    """The model after the user ran it in training mode: moving statistics moved away from their start."""
    model = bn_dropout_net()
    start = model.get_layer("bn1").moving_mean.numpy().copy()
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(6, 8, 8, 3)).astype(np.float32)
    model(x, training=True)
    assert np.abs(model.get_layer("bn1").moving_mean.numpy() - start).max() > 1e-3
    return model


@pytest.mark.parametrize("method", [m for m in anycam.core.METHODS if m not in anycam.core.methods.ATTENTION_METHODS])
def test_no_method_changes_a_batchnorm_dropout_model(trained: keras.Model, method: str) -> None:
    model = trained
    x = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype(np.float32)
    before, layers = snapshot(model), attributes(model)
    outputs = model(x, training=False).numpy()
    explainer = anycam.Explainer(model, "features", method=method, batch_size=4)
    first = explainer.explain(x, target=[0, 3, 1])
    assert snapshot(model) == before
    assert attributes(model) == layers
    # Inference mode throughout: Dropout off, the moving statistics used (not the batch's), so
    # a second call gives the same map and the model's own output is unchanged.
    second = explainer.explain(x, target=[0, 3, 1])
    np.testing.assert_array_equal(first.heatmap, second.heatmap)
    np.testing.assert_array_equal(model(x, training=False).numpy(), outputs)
    assert snapshot(model) == before


def test_training_in_model_kwargs_is_refused_not_run() -> None:
    """training=True would update the moving statistics inside anycam's forward passes."""
    model = bn_dropout_net()
    x = np.zeros((2, 8, 8, 3), np.float32)
    model(x)
    before = snapshot(model)
    with pytest.raises(anycam.ConfigError, match="training"):
        anycam.Explainer(model, "features", model_kwargs={"training": True})(x)
    assert snapshot(model) == before


def test_the_model_is_untouched_when_a_method_fails(trained: keras.Model) -> None:
    before, layers = snapshot(trained), attributes(trained)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype(np.float32)

    def failing(output: tf.Tensor) -> tf.Tensor:
        raise RuntimeError("target failed")

    for method in ("gradcam", "scorecam", "ablationcam", "guided-backprop"):
        with pytest.raises(RuntimeError, match="target failed"):
            anycam.Explainer(trained, "features", method=method).explain(x, target=failing)
        assert snapshot(trained) == before and attributes(trained) == layers


@pytest.mark.parametrize("method", ["gradcam", "ablationcam", "guided-backprop"])
def test_the_automatic_layer_choice_leaves_the_model_untouched(trained: keras.Model, method: str) -> None:
    """layer=None taps every layer's call for one eager pass: each call must be put back."""
    before, layers = snapshot(trained), attributes(trained)
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 3)).astype(np.float32)
    anycam.Explainer(trained, None, method=method).explain(x)
    assert snapshot(trained) == before and attributes(trained) == layers
