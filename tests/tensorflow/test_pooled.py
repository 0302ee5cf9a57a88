"""Ablation-CAM's pooled head on Keras: which networks after the layer are read from the graph
(and give the closed form, equal to rerunning the model with each channel zeroed), and which
are refused (then the network after the layer runs on every ablated copy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from anycam.backends import _keras

import anycam

from ..contract.kit import explain_through_head, offered_head
from ..contract.kit_tensorflow import ChannelsFirstConv2D

pytestmark = pytest.mark.tensorflow

CLASSES, CHANNELS = 4, 6
L = keras.layers


def batch(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _conv(**kwargs: Any) -> list[keras.Layer]:
    first = L.Conv2D(5, 3, padding="same", activation="relu")
    return [first, L.Conv2D(CHANNELS, 3, strides=2, padding="same", **kwargs)]


class Structure:
    """A model whose explained layer ``"last"`` is followed by ``after`` (run layer by layer for
    the oracle: the same layer objects, the channel zeroed in between)."""

    def __init__(self, before: Sequence[Any], after: Sequence[Any], shape: tuple[int, ...], how: str, axis: int = -1):
        self.before, self.after, self.shape, self.axis = list(before), list(after), shape, axis
        if how == "sequential":
            self.model: Any = keras.Sequential([keras.Input(shape), *before, *after])
        elif how == "functional":
            inputs = keras.Input(shape)
            hidden = inputs
            for layer in [*before, *after]:
                hidden = layer(hidden)
            self.model = keras.Model(inputs, hidden)
        elif how == "nested":  # a Functional model of two nested Sequentials, as the contract kit
            features = keras.Sequential([keras.Input(shape), *before], name="features")
            head = keras.Sequential([keras.Input(features.outputs[0].shape[1:]), *after], name="head")
            inputs = keras.Input(shape)
            self.model = keras.Model(inputs, head(features(inputs)))
        else:  # a (features, head) pair
            self.model = (keras.Sequential([keras.Input(shape), *before]), keras.Sequential(after))
        self.layer = None if how == "pair" else ("features" if how == "nested" else before[-1].name)

    def activations(self, x: np.ndarray) -> np.ndarray:
        hidden = tf.constant(x)
        for layer in self.before:
            hidden = layer(hidden, training=False)
        return hidden.numpy()

    def outputs(self, x: np.ndarray, channel: int | None = None) -> np.ndarray:
        """The model output, rerun with ``channel`` of the layer output zeroed."""
        values = self.activations(x)
        if channel is not None:
            np.moveaxis(values, self.axis, 0)[channel] = 0
        hidden = tf.constant(values)
        for layer in self.after:
            hidden = layer(hidden, training=False)
        return hidden.numpy()


def _build(name: str) -> Structure:
    keras.utils.set_random_seed(2)
    shape = (10, 8, 3)
    if name == "sequential: mean → dropout → dense(relu) → dense → softmax":
        after = [L.GlobalAveragePooling2D(), L.Dropout(0.5), L.Dense(7, activation="relu")]
        after += [L.Dense(CLASSES), L.Softmax()]
        return Structure([*_conv(), L.ReLU(name="last")], after, shape, "sequential")
    if name == "functional: mean (keepdims) → reshape → dense(softmax)":
        after = [L.GlobalAveragePooling2D(keepdims=True), L.Reshape((CHANNELS,))]
        after += [L.Dense(CLASSES, activation="softmax")]
        return Structure([*_conv(activation="relu", name="last")], after, shape, "functional")
    if name == "nested: max (keepdims) → flatten → dense without bias":
        after = [L.GlobalMaxPooling2D(keepdims=True), L.Flatten(), L.Dense(CLASSES, use_bias=False)]
        return Structure([*_conv(), L.ReLU()], after, shape, "nested")
    if name == "channels_first: mean → dense":
        before = [ChannelsFirstConv2D(CHANNELS, 3, name="last")]
        after = [L.GlobalAveragePooling2D(data_format="channels_first"), L.Dense(CLASSES)]
        return Structure(before, after, (3, 10, 8), "functional", axis=1)
    if name == "conv1d: max → tanh (no dense)":
        before = [L.Conv1D(CLASSES, 3, padding="same", activation="relu", name="last")]
        return Structure(before, [L.GlobalMaxPooling1D(), L.Activation("tanh")], (12, 3), "functional")
    if name == "pair: mean (keepdims) → batchnorm → dense":  # no dense right after: the tail runs it
        after = [L.GlobalAveragePooling2D(keepdims=True), L.BatchNormalization(), L.Flatten(), L.Dense(CLASSES)]
        return Structure([*_conv(), L.ReLU()], after, shape, "pair")
    raise ValueError(name)


RECOGNISED = (
    "sequential: mean → dropout → dense(relu) → dense → softmax",
    "functional: mean (keepdims) → reshape → dense(softmax)",
    "nested: max (keepdims) → flatten → dense without bias",
    "channels_first: mean → dense",
    "conv1d: max → tanh (no dense)",
    "pair: mean (keepdims) → batchnorm → dense",
)


def _explainer(structure: Structure, **options: Any) -> anycam.Explainer:
    backend = "tensorflow" if isinstance(structure.model, tuple) else None
    return anycam.Explainer(
        structure.model, structure.layer, method="ablationcam", progress=False, backend=backend, **options
    )


def _centred_first_class(output: tf.Tensor) -> tf.Tensor:
    # Reads every sample of the (N, classes) output it is given: right only if applied per copy.
    return output[:, 0] - tf.reduce_mean(output[:, 0]) + 2.0


@pytest.mark.parametrize("form", ["indices", "callable"])
@pytest.mark.parametrize("name", RECOGNISED)
def test_a_recognised_head_gives_the_closed_form_equal_to_zeroing(name: str, form: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    structure = _build(name)
    x = batch(3, *structure.shape)
    count = structure.activations(x).shape[structure.axis]
    if form == "indices":
        target: Any = [0, 1, 3]

        def score(out: np.ndarray) -> np.ndarray:
            return out[np.arange(3), [0, 1, 3]][:, None]
    else:
        target = _centred_first_class

        def score(out: np.ndarray) -> np.ndarray:
            return (out[:, 0] - out[:, 0].mean() + 2.0)[:, None]

    y = score(structure.outputs(x))
    drops = np.stack([score(structure.outputs(x, k)) for k in range(count)], axis=-1)
    expected = (y[..., None] - drops) / y[..., None]
    explainer = _explainer(structure)  # every copy in one tail call: B > 1 rows per sample
    result, _ = explain_through_head(explainer, x, target, monkeypatch)
    np.testing.assert_allclose(result.weights, expected[:, 0], rtol=1e-4, atol=1e-5)


def test_the_tail_compiles_once_per_target_form_and_shapes() -> None:
    structure = _build("sequential: mean → dropout → dense(relu) → dense → softmax")
    x = batch(2, *structure.shape)
    first = _explainer(structure, batch_size=4).explain(x, target=1)
    traced = _explainer(structure).backend.trace_count
    for size in (2, 6, 100):  # other chunk sizes, another class, other inputs: no new trace
        again = _explainer(structure, batch_size=size).explain(x, target=1)
        np.testing.assert_allclose(again.weights, first.weights, rtol=1e-5, atol=1e-7)
    _explainer(structure).explain(batch(2, *structure.shape, seed=3), target=2)
    assert _explainer(structure).backend.trace_count == traced


class PoolingModel(keras.Model):
    """A subclassed model: its call could do anything after the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.last = L.Conv2D(CHANNELS, 3, activation="relu")
        self.pool = L.GlobalAveragePooling2D()
        self.dense = L.Dense(CLASSES)

    def call(self, inputs):  # type: ignore[no-untyped-def]
        return self.dense(self.pool(self.last(inputs)))


def _refused(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """Returns (model, layer, Explainer options) of a network after the layer that is no pooled head."""
    keras.utils.set_random_seed(3)
    # Height 6 = CHANNELS: a pooling over the wrong axes gives as many numbers as the right one.
    image = keras.Input((6, 8, 3))
    early = L.Conv2D(CHANNELS, 3, padding="same", activation="relu", name="early")(image)
    last = L.Conv2D(CHANNELS, 3, padding="same", activation="relu", name="last")(early)
    options: dict[str, Any] = {}
    if name == "skip connection over the layer":
        pooled = L.Concatenate()([L.GlobalAveragePooling2D()(last), L.GlobalAveragePooling2D()(early)])
        out = L.Dense(CLASSES)(pooled)
    elif name == "layer read by two layers":
        pooled = L.Concatenate()([L.GlobalAveragePooling2D()(last), L.GlobalMaxPooling2D()(last)])
        out = L.Dense(CLASSES)(pooled)
    elif name == "branch after the pooling":
        pooled = L.GlobalAveragePooling2D()(last)
        out = L.Add()([L.Dense(CLASSES)(pooled), L.Dense(CLASSES)(pooled)])
    elif name == "pooling over some axes (channels_first pooling of a channels_last layer)":
        out = L.Dense(CLASSES)(L.GlobalAveragePooling2D(data_format="channels_first")(last))
    elif name == "local pooling":
        out = L.Dense(CLASSES)(L.Flatten()(L.AveragePooling2D((6, 1))(last)))
    elif name == "dropout kept on at inference":
        out = L.Dense(CLASSES)(L.Dropout(0.5)(L.GlobalAveragePooling2D()(last), training=True))
    elif name == "unknown layer in the tail":
        out = L.Lambda(lambda t: t - keras.ops.mean(t, axis=0))(L.Dense(CLASSES)(L.GlobalAveragePooling2D()(last)))
    elif name == "mixed precision dense":
        out = L.Dense(CLASSES, dtype="mixed_float16")(L.GlobalAveragePooling2D()(last))
    elif name == "output selector":
        out = {"logits": L.Dense(CLASSES)(L.GlobalAveragePooling2D()(last))}
        options["output"] = "logits"
    elif name == "input port":
        out = L.Dense(CLASSES)(L.GlobalAveragePooling2D(name="pool")(last))
        return keras.Model(image, out), "pool:input", options
    elif name == "layer inside a nested model, not its output":
        inner = keras.Sequential([keras.Input((6, 8, 3)), L.Conv2D(CHANNELS, 3, name="inner"), L.ReLU()])
        out = L.Dense(CLASSES)(L.GlobalAveragePooling2D()(inner(image)))
        return keras.Model(image, out), "inner", options
    elif name == "subclassed model":
        model = PoolingModel()
        model(np.zeros((1, 6, 8, 3), np.float32))
        return model, "last", options
    else:
        raise ValueError(name)
    return keras.Model(image, out), "last", options


REFUSED = (
    "skip connection over the layer",
    "layer read by two layers",
    "branch after the pooling",
    "pooling over some axes (channels_first pooling of a channels_last layer)",
    "local pooling",
    "dropout kept on at inference",
    "unknown layer in the tail",
    "mixed precision dense",
    "output selector",
    "input port",
    "layer inside a nested model, not its output",
    "subclassed model",
)


@pytest.mark.parametrize("name", REFUSED)
def test_no_head_for_anything_but_a_pooling_alone_then_a_chain(name: str) -> None:
    model, layer, options = _refused(name)
    explainer = anycam.Explainer(model, layer, method="ablationcam", layout="channels_last", **options)
    assert offered_head(explainer, batch(2, 6, 8, 3))[0] is None


def test_no_head_for_a_layer_that_runs_twice() -> None:
    # The capture refuses a shared layer too; the graph walk must not pick one of its calls.
    keras.utils.set_random_seed(3)
    image = keras.Input((10, 8, 3))
    shared = L.ReLU(name="shared")
    hidden = shared(L.Conv2D(CHANNELS, 3, padding="same")(shared(L.Conv2D(CHANNELS, 3)(image))))
    model = keras.Model(image, L.Dense(CLASSES)(L.GlobalAveragePooling2D()(hidden)))
    assert _keras.pooled_head(model, shared, 4, -1) is None


def test_no_head_for_several_layers() -> None:
    structure = _build("sequential: mean → dropout → dense(relu) → dense → softmax")
    x = batch(2, *structure.shape)
    assert offered_head(anycam.Explainer(structure.model, "last"), x)[0] is not None
    assert offered_head(anycam.Explainer(structure.model, ["last", structure.before[0].name]), x)[0] is None
