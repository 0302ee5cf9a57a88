"""Keras multi-input models: inputs as a list or a dict, as Keras takes them; ``spatial_input=``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam

pytestmark = pytest.mark.tensorflow

RNG = np.random.default_rng(2)


@pytest.fixture(scope="module")
def two_inputs() -> keras.Model:
    """An image branch (conv "features") and a metadata branch, joined before the classifier."""
    keras.utils.set_random_seed(8)
    image = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((4,), name="meta")
    features = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="features")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    joined = keras.layers.Concatenate(name="join")([pooled, keras.layers.Dense(5, name="meta_dense")(meta)])
    return keras.Model({"image": image, "meta": meta}, keras.layers.Dense(3, name="fc")(joined))


def tape_gradcam(model: keras.Model, inputs: dict[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
    """Raw Grad-CAM at "features" by a sub-model and a GradientTape (the Keras example's recipe)."""
    split = keras.Model(model.input, [model.get_layer("features").output, model.output])
    with tf.GradientTape() as tape:
        activations, outputs = split(inputs, training=False)
        scores = tf.gather(outputs, tf.constant(classes)[:, None], batch_dims=1)
    alpha = tf.reduce_mean(tape.gradient(scores, activations), axis=(1, 2))
    return tf.nn.relu(tf.einsum("nhwc,nc->nhw", activations, alpha)).numpy()


def batch() -> dict[str, np.ndarray]:
    return {
        "image": RNG.normal(size=(2, 8, 8, 3)).astype(np.float32),
        "meta": RNG.normal(size=(2, 4)).astype(np.float32),
    }


def test_dict_inputs_match_a_plain_tape(two_inputs: keras.Model) -> None:
    inputs = batch()
    classes = np.array([2, 0])
    result = anycam.Explainer(two_inputs, "features").explain(inputs, target=classes)
    expected = tape_gradcam(two_inputs, inputs, classes)
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)
    assert result.heatmap.shape == (2, 8, 8)  # the image's grid, not the metadata's


def test_list_inputs_in_the_model_order_and_tensors_give_the_same_maps(two_inputs: keras.Model) -> None:
    inputs = batch()
    explainer = anycam.Explainer(two_inputs, "features", method="gradcam++")
    by_key = explainer.explain(inputs, target=anycam.top_k(2))
    # A dict model takes its inputs by name; a list gives them in the order of model.inputs.
    order = [tensor.name for tensor in two_inputs.inputs]
    as_list = [tf.constant(inputs[name]) for name in order]
    by_position = explainer.explain(as_list, target=anycam.top_k(2))
    np.testing.assert_allclose(by_position.cam, by_key.cam, rtol=1e-6)
    np.testing.assert_array_equal(by_position.target, by_key.target)


def test_spatial_input_picks_the_grid_and_a_bad_one_lists_the_inputs(two_inputs: keras.Model) -> None:
    inputs = batch()
    default = anycam.Explainer(two_inputs, "features").explain(inputs)
    named = anycam.Explainer(two_inputs, "features", spatial_input="image").explain(inputs)
    np.testing.assert_array_equal(named.heatmap, default.heatmap)
    with pytest.raises(anycam.InputError, match=r"spatial_input='mask' names no input.*'image'.*'meta'"):
        anycam.Explainer(two_inputs, "features", spatial_input="mask").explain(inputs)


def test_auto_and_input_ports_with_several_inputs(two_inputs: keras.Model) -> None:
    inputs = batch()
    explainer = anycam.Explainer(two_inputs, "auto")
    chosen = explainer.explain(inputs)
    assert explainer.layer_names == ("features",)
    through_pool = anycam.Explainer(two_inputs, "pool:input").explain(inputs)
    np.testing.assert_allclose(through_pool.cam, chosen.cam, rtol=1e-6)


def test_model_kwargs_reach_every_call() -> None:
    class Scaled(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3, name="conv")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.fc = keras.layers.Dense(2)

        def call(self, x, scale=1.0, training=None):  # type: ignore[no-untyped-def]
            return self.fc(self.pool(self.conv(x) * scale))

    keras.utils.set_random_seed(9)
    model = Scaled()
    x = RNG.normal(size=(2, 6, 6, 1)).astype(np.float32)
    model(x)
    # relu=False: the signed map, so the comparison cannot pass on two all-zero maps.
    plain = anycam.Explainer(model, "conv", relu=False).explain(x, target=0)
    doubled = anycam.Explainer(model, "conv", relu=False, model_kwargs={"scale": 2.0}).explain(x, target=0)
    assert np.abs(plain.cam).max() > 0
    # ∂(f(2A))/∂A = 2 f'(2A): with a linear head after the conv the raw map doubles exactly.
    np.testing.assert_allclose(doubled.cam, 2 * plain.cam, rtol=1e-5)
    np.testing.assert_allclose(doubled.scores, 2 * plain.scores - model.fc.bias.numpy()[0], rtol=1e-5)


def test_a_dict_key_the_model_does_not_take_names_the_keys(two_inputs: keras.Model) -> None:
    inputs = batch()
    inputs["extra"] = inputs.pop("meta")
    with pytest.raises(anycam.InputError, match=r"'image'.*'extra'"):
        anycam.Explainer(two_inputs, "features").explain(inputs)


def test_a_spatial_input_without_spatial_axes_names_the_input_and_spatial_input(two_inputs: keras.Model) -> None:
    """Issue 19.14: "no spatial axis" alone does not say which input, nor how to name another."""
    inputs = batch()
    with pytest.raises(anycam.InputError, match=r"input 'meta' carries the heatmap's grid \(spatial_input='meta'"):
        anycam.Explainer(two_inputs, "features", spatial_input="meta").explain(inputs)
    with pytest.raises(anycam.InputError, match=r"input 1 .*spatial_input=1.*spatial_input="):
        anycam.Explainer(two_inputs, "features", spatial_input=1).explain([inputs["image"], inputs["meta"]])
