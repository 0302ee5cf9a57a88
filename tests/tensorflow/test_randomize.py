"""The sanity check on Keras models: layers listed in order, copies randomised, the model untouched."""

from __future__ import annotations

import random

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam
from anycam.metrics.sanity import sanity_check, spearman

pytestmark = pytest.mark.tensorflow

X = np.random.default_rng(0).normal(size=(3, 10, 10, 3)).astype(np.float32)


def _perturbed(model: keras.Model) -> keras.Model:
    """Gives every weight a value no initializer would give (zero biases, unit gammas are out)."""
    rng = np.random.default_rng(1)
    model.set_weights([rng.uniform(0.5, 1.5, size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def _nested() -> keras.Model:
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [
            keras.Input((10, 10, 4)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
        ],
        name="inner",
    )
    inputs = keras.Input((10, 10, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    hidden = keras.layers.ReLU(name="relu")(inner(hidden))
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return _perturbed(keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden)))


def _flat() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 3))
    hidden = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    hidden = keras.layers.ReLU(name="feat")(keras.layers.Conv2D(8, 3, padding="same", name="c2")(hidden))
    hidden = keras.layers.GlobalAveragePooling2D(name="pool")(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def _snapshot(model: keras.Model) -> list[bytes]:
    return [w.numpy().tobytes() for w in model.weights]


def _weights(model: keras.Model, path: str) -> list[np.ndarray]:
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return [w.numpy() for w in layer.weights]


def test_parameter_layers_from_input_to_output() -> None:
    assert anycam.Explainer(_flat(), "feat").backend.parameter_layers() == ("c1", "c2", "head")
    # A nested model is listed through its layers, where it runs; BatchNorm's moving stats count.
    assert anycam.Explainer(_nested(), "relu").backend.parameter_layers() == (
        "stem", "inner/conv", "inner/bn", "head",
    )  # fmt: skip


def test_randomised_copy_changes_exactly_the_chosen_layers() -> None:
    model = _nested()
    backend = anycam.Explainer(model, "relu").backend
    before, python_state = _snapshot(model), random.getstate()
    copy = backend.randomized(["head", "inner/bn"], seed=3)
    assert _snapshot(model) == before  # the user's model, bit for bit
    assert random.getstate() == python_state
    for path in ("stem", "inner/conv"):
        for kept, original in zip(_weights(copy.model, path), _weights(model, path), strict=True):
            np.testing.assert_array_equal(kept, original)
    # Fresh values from each layer's own initializers: BatchNorm's are constants ...
    gamma, beta, mean, variance = _weights(copy.model, "inner/bn")
    np.testing.assert_array_equal(np.stack([gamma, beta, mean, variance]), [[1] * 4, [0] * 4, [0] * 4, [1] * 4])
    # ... the head's kernel is Glorot-uniform (limit sqrt(6 / (fan_in + fan_out))), its bias zero.
    kernel, bias = _weights(copy.model, "head")
    assert not np.array_equal(kernel, _weights(model, "head")[0])
    assert np.abs(kernel).max() <= np.sqrt(6 / (4 + 3)) and np.array_equal(bias, np.zeros(3))
    # Seeded: the same seed gives the same weights, another seed others.
    np.testing.assert_array_equal(_weights(backend.randomized(["head"], seed=3).model, "head")[0], kernel)
    assert not np.array_equal(_weights(backend.randomized(["head"], seed=4).model, "head")[0], kernel)
    # The copy explains the same layer with its own compiled captures.
    assert copy.layer_names == backend.layer_names and copy.output is backend.output
    assert copy._program is not backend._program
    traces = backend.trace_count
    copy.predict(X)
    assert backend.trace_count == traces and copy.trace_count == 1
    assert _snapshot(model) == before


def test_randomised_copy_errors() -> None:
    backend = anycam.Explainer(_nested(), "relu").backend
    with pytest.raises(anycam.LayerError, match="not found"):
        backend.randomized(["nope"])
    with pytest.raises(anycam.LayerError, match="owns no weights to randomise; randomise its layers: 'inner/conv'"):
        backend.randomized(["inner"])
    dense = keras.layers.Dense(3)
    pair = (keras.layers.Conv2D(2, 3), lambda features: dense(tf.reduce_mean(features, (1, 2))))
    pair = anycam.Explainer(pair, None, backend="tensorflow")
    with pytest.raises(NotImplementedError, match="pair"):
        pair.backend.parameter_layers()
    with pytest.raises(NotImplementedError, match="pair"):
        pair.backend.randomized(["features"])


class SmallNet(keras.Model):
    """A subclassed model with auto-named layers: its copy's layers get other names."""

    def __init__(self, classes: int = 3, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.features = keras.Sequential([keras.layers.Conv2D(4, 3, padding="same"), keras.layers.ReLU()])
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(classes)

    def call(self, inputs):  # type: ignore[no-untyped-def]
        return self.head(self.pool(self.features(inputs)))


class Wrapped(SmallNet):
    """Takes a layer in ``__init__``, so Keras cannot rebuild it from its config."""

    def __init__(self, backbone: keras.Layer, **kwargs) -> None:  # type: ignore[no-untyped-def]
        keras.Model.__init__(self, **kwargs)
        self.features, self.pool, self.head = backbone, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)


def test_subclassed_models() -> None:
    model = SmallNet()
    model(X)
    backend = anycam.Explainer(model, "features").backend
    layers = backend.parameter_layers()
    assert len(layers) == 2 and layers[1] == model.head.name
    before = _snapshot(model)
    copy = backend.randomized([layers[1]], seed=1)
    assert _snapshot(model) == before
    np.testing.assert_array_equal(copy.model.features.weights[0].numpy(), model.features.weights[0].numpy())
    assert not np.array_equal(copy.model.head.kernel.numpy(), model.head.kernel.numpy())
    assert copy.layer_names == ("features",) and copy.predict(X).shape == (3, 3)
    wrapper = Wrapped(keras.layers.Conv2D(4, 3))
    wrapper(X)
    with pytest.raises(NotImplementedError, match="get_config"):
        anycam.Explainer(wrapper, "features").backend.randomized([wrapper.head.name])


def test_sanity_check_steps_and_oracle() -> None:
    model = _flat()
    before = _snapshot(model)
    explainer = anycam.Explainer(model, "feat")
    cascading = sanity_check(explainer, X, target=1)
    independent = sanity_check(explainer, X, target=1, mode="independent")
    assert cascading.layers == independent.layers == ("head", "c2", "c1")
    np.testing.assert_allclose(cascading.spearman[0], independent.spearman[0])
    # Independent oracle for the first step: the signed Grad-CAM of the randomised copy, by tape.
    copy = explainer.backend.randomized(["head"], seed=0).model
    activations = copy.get_layer("feat")(copy.get_layer("c2")(copy.get_layer("c1")(X)))
    with tf.GradientTape() as tape:
        tape.watch(activations)
        scores = copy.get_layer("head")(copy.get_layer("pool")(activations))[:, 1]
    gradients = tape.gradient(scores, activations).numpy()
    signed = np.einsum("nhwc,nc->nhw", activations.numpy(), gradients.mean(axis=(1, 2)))
    reference = anycam.Explainer(model, "feat", relu=False, normalize=None).explain(X, target=1).cam
    np.testing.assert_allclose(cascading.spearman[0], spearman(reference, signed), atol=1e-6)
    assert cascading.ssim is not None and cascading.ssim.shape == (3, 3)
    full = sanity_check(explainer, X, target=1, mode="full")
    assert full.layers == ("all",) and full.ssim is not None
    np.testing.assert_array_equal(full.spearman[0], cascading.spearman[-1])
    np.testing.assert_array_equal(full.ssim[0], cascading.ssim[-1])
    assert _snapshot(model) == before
