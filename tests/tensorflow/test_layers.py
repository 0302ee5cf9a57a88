"""``layer="auto"`` and ``"name:input"`` in Keras: the shared rule, the parity net, ResNet50."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from anycam.backends.tensorflow.demo import build_demo_model

import anycam
from anycam.demo.data import load_demo

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def demo() -> tuple[keras.Model, np.ndarray]:
    data = load_demo()
    return build_demo_model(data["weights"]), data["images"][:3].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("layer", [None, "auto"])
def test_auto_picks_the_last_stage_of_the_parity_net(demo, layer) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    explainer = anycam.Explainer(model, layer)
    assert "auto" in repr(explainer) and explainer.layer_names == ()
    result = explainer.explain(x)
    # stage3 is the last layer with a 2-D map before global pooling; pool and fc have none.
    assert explainer.layer_names == ("stage3",) and "[stage3] (auto)" in repr(explainer)
    np.testing.assert_array_equal(result.cam, anycam.Explainer(model, "stage3").explain(x).cam)


def test_the_input_of_the_pooling_is_the_stage_output(demo) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    result = anycam.Explainer(model, "pool:input").explain(x, target=anycam.top_k(2))
    expected = anycam.Explainer(model, "stage3").explain(x, target=anycam.top_k(2))
    assert result.layer == "pool:input"
    np.testing.assert_array_equal(result.cam, expected.cam)
    np.testing.assert_array_equal(result.weights, expected.weights)


def _shared_activation_net() -> keras.Model:
    """conv → act → conv → act → GAP → dense, where both ``act`` are ONE layer object."""
    keras.utils.set_random_seed(3)
    shared = keras.layers.Activation("relu", name="act")
    inputs = keras.Input((12, 12, 3))
    x = shared(keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs))
    x = shared(keras.layers.Conv2D(5, 3, strides=2, padding="same", name="conv2")(x))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))


def test_a_shared_activation_is_explained_through_the_next_layer_input() -> None:
    model = _shared_activation_net()
    x = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32)
    with pytest.raises(anycam.LayerError, match="more than once"):
        anycam.Explainer(model, "act").explain(x)
    result = anycam.Explainer(model, "pool:input").explain(x)
    # Oracle: the post-activation map of conv2 by a plain tape.
    conv2, fc = model.get_layer("conv2"), model.get_layer("fc")
    first = tf.nn.relu(model.get_layer("conv1")(x))
    activations = tf.nn.relu(conv2(first))
    with tf.GradientTape() as tape:
        tape.watch(activations)
        outputs = fc(tf.reduce_mean(activations, axis=(1, 2)))
        scores = tf.gather(outputs, tf.argmax(outputs, axis=1)[:, None], batch_dims=1)
    alpha = tf.reduce_mean(tape.gradient(scores, activations), axis=(1, 2))
    expected = tf.nn.relu(tf.einsum("nhwc,nc->nhw", activations, alpha)).numpy()
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)
    # "auto" skips the shared layer (it runs twice) and takes conv2, whose map is the pre-activation one.
    explainer = anycam.Explainer(model, "auto")
    explainer.explain(x)
    assert explainer.layer_names == ("conv2",)


def test_auto_on_resnet50_picks_its_last_block() -> None:
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 64, 3)).astype(np.float32)
    explainer = anycam.Explainer(model, None)
    result = explainer.explain(x)
    assert explainer.layer_names == ("conv5_block3_out",)
    np.testing.assert_array_equal(result.cam, anycam.Explainer(model, "conv5_block3_out").explain(x).cam)


def test_auto_inside_a_nested_backbone_and_a_dead_branch() -> None:
    keras.utils.set_random_seed(4)
    inner_in = keras.Input((10, 10, 2))
    inner = keras.Model(inner_in, keras.layers.Conv2D(3, 3, name="features")(inner_in), name="backbone")
    inputs = keras.Input((10, 10, 2))
    mapped = inner(inputs)
    keras.layers.Conv2D(2, 1, name="unused")(mapped)  # never reaches the output
    outputs = keras.layers.Dense(2, name="fc")(keras.layers.GlobalAveragePooling2D(name="pool")(mapped))
    model = keras.Model(inputs, outputs)
    explainer = anycam.Explainer(model, "auto")
    explainer.explain(np.ones((2, 10, 10, 2), np.float32))
    # The nested model reports after its layers, so the backbone (whole) wins over backbone/features.
    assert explainer.layer_names == ("backbone",)


def test_auto_without_a_feature_map_lists_what_it_considered() -> None:
    keras.utils.set_random_seed(5)
    flat, hidden = keras.layers.Flatten(name="flat"), keras.layers.Dense(4, name="hidden")
    model = keras.Sequential([keras.Input((4, 4, 2)), flat, hidden, keras.layers.Dense(2)])
    with pytest.raises(anycam.LayerError, match=r"considered.*'flat'.*'hidden'"):
        anycam.Explainer(model, "auto").explain(np.ones((2, 4, 4, 2), np.float32))


def test_auto_cannot_be_one_of_several_layers(demo) -> None:  # type: ignore[no-untyped-def]
    model, _ = demo
    with pytest.raises(anycam.LayerError, match="cannot be part of a list"):
        anycam.Explainer(model, ["stage2", "auto"])
