"""Guided backpropagation and Guided Grad-CAM on Keras: every ReLU spelling, the rule kept inside its own
call, no retrace, and the ReLUs it cannot reach reported."""

from __future__ import annotations

import functools
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam

pytestmark = pytest.mark.tensorflow

CLASSES = 4


def batch(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


class OpsReLU(keras.layers.Layer):
    """A subclassed layer that calls ``keras.ops.relu`` itself."""

    def call(self, inputs):  # type: ignore[no-untyped-def]
        return keras.ops.relu(inputs)


@functools.cache
def every_relu() -> keras.Model:
    """Dense layers on a (3, 6) signal joined by each spelling of ReLU a Keras user writes."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((3, 6))
    h = keras.layers.Dense(8, activation="relu", name="d0")(inputs)
    h = keras.layers.ReLU()(keras.layers.Dense(8, name="d1")(h))
    h = keras.layers.Activation(keras.activations.relu)(keras.layers.Dense(8, name="d2")(h))
    h = keras.layers.Lambda(tf.nn.relu)(keras.layers.Dense(8, name="d3")(h))
    h = OpsReLU()(keras.layers.Dense(8, name="d4")(h))
    outputs = keras.layers.Dense(CLASSES, name="out")(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, outputs)


def _guided_by_hand(model: keras.Model, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The same network in plain TF ops with a guided ReLU written here."""

    @tf.custom_gradient
    def guided_relu(z):  # type: ignore[no-untyped-def]
        def gradient(upstream):  # type: ignore[no-untyped-def]
            return tf.where((z > 0) & (upstream > 0), upstream, 0.0)

        return tf.maximum(z, 0.0), gradient

    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        hidden = inputs
        for name in ("d0", "d1", "d2", "d3", "d4"):
            kernel, bias = model.get_layer(name).get_weights()
            hidden = guided_relu(hidden @ kernel + bias)
        kernel, bias = model.get_layer("out").get_weights()
        logits = tf.reduce_mean(hidden, axis=1) @ kernel + bias
        score = tf.reduce_sum(tf.gather(logits, classes, batch_dims=1))
    return tape.gradient(score, inputs).numpy()


def test_guided_backprop_catches_every_relu_spelling() -> None:
    model = every_relu()
    x = batch(5, 3, 6)
    classes = np.array([0, 1, 2, 3, 0])
    explanation = anycam.Explainer(model, "d4", method="guided-backprop").explain(x, target=classes)
    # attribution is channels first, (N, C_in, L).
    expected = np.moveaxis(_guided_by_hand(model, x, classes), -1, 1)
    np.testing.assert_allclose(explanation.attribution, expected, rtol=1e-4, atol=1e-6)
    with tf.GradientTape() as tape:  # and it differs from the plain gradient
        inputs = tf.constant(x)
        tape.watch(inputs)
        score = tf.reduce_sum(tf.gather(model(inputs), classes, batch_dims=1))
    plain = np.moveaxis(tape.gradient(score, inputs).numpy(), -1, 1)
    assert not np.allclose(explanation.attribution, plain, atol=1e-4)


def test_the_guided_rule_stays_inside_its_own_call() -> None:
    """After a guided call — also one that fails while tracing — gradients are ordinary again."""
    model = every_relu()
    x = tf.constant(batch(4, 3, 6))

    @tf.function
    def plain_gradient(inputs: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            score = tf.reduce_sum(model(inputs)[:, 1])
        return tape.gradient(score, inputs)

    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.reduce_sum(model(x)[:, 1])
    expected = tape.gradient(score, x).numpy()

    def failing(output: tf.Tensor) -> tf.Tensor:
        raise RuntimeError("target failed")

    explainer = anycam.Explainer(model, "d4", method="guided-backprop")
    with pytest.raises(RuntimeError, match="target failed"):
        explainer.explain(x, target=failing)
    explainer.explain(x, target=1)
    # Traced after the guided calls: ordinary ReLU gradients.
    np.testing.assert_allclose(plain_gradient(x).numpy(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam"])
def test_guided_backprop_without_relu_gives_an_anycam_warning(method: str) -> None:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3, 5))
    hidden = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(hidden)))
    # An AnycamWarning, so that filtering anycam's warnings (issue 19.13) also filters this one.
    with pytest.warns(anycam.AnycamWarning, match="no ReLU"):
        anycam.Explainer(model, "hidden", method=method)(batch(2, 3, 5))


def test_guided_gradients_compile_once() -> None:
    model = every_relu()
    explainer = anycam.Explainer(model, "d4", method="guided-backprop")
    explainer(batch(3, 3, 6), target=1)
    traced = explainer.backend.trace_count
    explainer(batch(3, 3, 6, seed=1), target=2)
    explainer(batch(5, 3, 6, seed=2), target=[0, 1, 2, 3, 0])
    # One class for all, or one per sample, is the same (N, 1) indices argument; N is open.
    assert explainer.backend.trace_count == traced


@tf.function
def _inner_relu(x: tf.Tensor) -> tf.Tensor:
    return tf.nn.relu(x)


class _HiddenRelu(keras.layers.Layer):
    """A ReLU where the guided override cannot reach it: a nested tf.function or a tf.cond body."""

    def __init__(self, how: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.how = how

    def call(self, x: tf.Tensor) -> tf.Tensor:
        if self.how == "cond":
            return tf.cond(tf.reduce_sum(x) > -1e30, lambda: tf.nn.relu(x), lambda: x)
        return _inner_relu(x) if self.how == "function" else tf.nn.relu(x)


def _hidden_relu_model(how: str) -> keras.Model:
    keras.utils.set_random_seed(3)
    image = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(image)
    h = _HiddenRelu(how)(h)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(h)
    return keras.Model(image, keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling2D()(h)))


@pytest.mark.parametrize("how", ["function", "cond"])
def test_relus_the_guided_rule_cannot_reach_are_reported_not_hidden(how: str) -> None:
    # The same weights with the ReLU in the traced graph itself: fully guided, no warning.
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    flat = anycam.Explainer(_hidden_relu_model("plain"), "conv2", method="guided-backprop")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        guided = flat.explain(x, target=1).attribution
    hidden = anycam.Explainer(_hidden_relu_model(how), "conv2", method="guided-backprop")
    reported = r"1 ReLU op\(s\) run inside a nested tf.function.*partly guided"
    with pytest.warns(anycam.AnycamWarning, match=reported) as record:
        partial = hidden.explain(x, target=1).attribution
    assert [w.filename for w in record if "partly guided" in str(w.message)] == [__file__]
    # What the warning says is so: that ReLU kept the ordinary gradient, and the result differs.
    assert np.abs(partial - guided).max() > 1e-3 * np.abs(guided).max()
