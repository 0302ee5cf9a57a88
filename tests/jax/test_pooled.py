"""Ablation-CAM's pooled head in JAX: which suffixes ``ablation_head`` reads from the jaxpr, and
which it refuses.

The oracle everywhere: the whole model run again with channel k of the layer output zeroed
(a ``keep`` mask in the model, or the model's own modules called on the zeroed output).
"""

from __future__ import annotations

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import anycam
from tests.contract.kit import explain_through_head, offered_head
from tests.contract.kit_jax import numpy_init

pytestmark = pytest.mark.jax

CLASSES, CHANNELS = 5, 4
TRACES = {"count": 0}


class Features(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(nn.Conv(CHANNELS, (3, 3), padding="SAME")(x))


class Net(nn.Module):
    """``features`` (explained) → a head chosen by ``head``; ``keep`` masks the channels of ``features``."""

    head: str

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        TRACES["count"] += 1
        a = Features(name="features")(x)
        if keep is not None:
            a = a * keep[:, None, None, :]
        if self.head == "scaled_sum":  # sum pooling, a constant scale, then the dense layer
            return nn.Dense(CLASSES, name="fc")(a.sum((1, 2)) * 0.5)
        if self.head == "shifted":  # a shift is not zero-keeping: the dense layer runs in the tail
            return nn.Dense(CLASSES, name="fc")(a.mean((1, 2)) + 1.0)
        if self.head == "dict":
            return {"aux": x.mean(), "logits": nn.Dense(CLASSES, name="fc")(a.max((1, 2)))}
        if self.head == "gap_module":
            return nn.Dense(CLASSES, name="fc")(Pool(name="gap")(a))
        if self.head == "skip_over":  # the head also reads the input: a skip connection over the layer
            return nn.Dense(CLASSES, name="fc")(a.mean((1, 2))) + nn.Dense(CLASSES)(x.mean((1, 2)))
        if self.head == "some_axes":  # pools the rows only
            return nn.Dense(CLASSES, name="fc")(a.mean(1)).mean(1)
        if self.head == "read_twice":
            return nn.Dense(CLASSES, name="fc")(jnp.concatenate([a.mean((1, 2)), a.max((1, 2))], axis=1))
        raise ValueError(self.head)


class Pool(nn.Module):
    """Mean pooling times a parameter (a module must own a variable to be named as a layer)."""

    @nn.compact
    def __call__(self, a: jax.Array) -> jax.Array:
        return a.mean((1, 2)) * self.param("scale", nn.initializers.ones, ())


def batch(*shape: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


X = batch(3, 8, 6, 3)


@functools.cache
def linen(head: str) -> tuple[Net, dict]:
    model = Net(head)
    return model, numpy_init(model, X, np.random.default_rng(0))


def _expected_weights(scores_of, x: jax.Array, classes: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(N, C) (y − y_k) / y with y_k the model's score with channel k zeroed (Desai & Ramaswamy 2020, eq. 3)."""
    rows = np.arange(x.shape[0])
    full = np.asarray(scores_of(np.ones((x.shape[0], CHANNELS), np.float32)))[rows, classes]
    weights = np.zeros((x.shape[0], CHANNELS))
    for channel in range(CHANNELS):
        keep = np.ones((x.shape[0], CHANNELS), np.float32)
        keep[:, channel] = 0
        weights[:, channel] = (full - np.asarray(scores_of(keep))[rows, classes]) / full
    return weights


@pytest.mark.parametrize("head", ["scaled_sum", "shifted", "dict"])
def test_linen_heads_take_the_closed_form_and_equal_zeroing(head: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, variables = linen(head)
    output = "logits" if head == "dict" else None
    explainer = anycam.Explainer((model, variables), "features", method="ablationcam", output=output)
    found, capture = offered_head(explainer, X)
    assert isinstance(found, anycam.AblationHead)
    acts = capture.activations[0]
    if head == "shifted":
        assert found.weight is None
        np.testing.assert_allclose(found.pooled, acts.mean((1, 2)), rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(found.weight, variables["params"]["fc"]["kernel"])
        pooled = acts.sum((1, 2)) * 0.5 if head == "scaled_sum" else acts.max((1, 2))
        np.testing.assert_allclose(found.pooled, pooled, rtol=1e-6, atol=1e-6)

    classes = np.array([0, 3, 1])
    result, _ = explain_through_head(explainer, X, classes, monkeypatch)

    def scores_of(keep: np.ndarray) -> jax.Array:
        out = model.apply(variables, X, jnp.asarray(keep))
        return out["logits"] if head == "dict" else out

    np.testing.assert_allclose(result.weights, _expected_weights(scores_of, X, classes), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["skip_over", "some_axes", "read_twice"])
def test_no_head_when_the_layer_is_not_read_by_one_global_pooling_alone(head: str) -> None:
    model, variables = linen(head)
    explainer = anycam.Explainer((model, variables), "features", method="ablationcam")
    found, _ = offered_head(explainer, X)
    assert found is None
    classes = np.array([2, 0, 4])
    result = explainer.explain(X, target=classes)  # the suffix on every copy, still exact

    def scores_of(keep: np.ndarray) -> jax.Array:
        return model.apply(variables, X, jnp.asarray(keep))

    np.testing.assert_allclose(result.weights, _expected_weights(scores_of, X, classes), rtol=1e-4, atol=1e-5)


def test_no_head_for_a_layer_input_or_several_layers() -> None:
    model, variables = linen("gap_module")
    # The same tensor as the output of "features": only the output port is read this way.
    assert offered_head(anycam.Explainer((model, variables), "features"), X)[0] is not None
    assert offered_head(anycam.Explainer((model, variables), "gap:input"), X)[0] is None
    assert offered_head(anycam.Explainer((model, variables), ["features", "features/Conv_0"]), X)[0] is None


def test_the_head_is_traced_and_compiled_once_per_shapes() -> None:
    model, variables = linen("scaled_sum")
    explainer = anycam.Explainer((model, variables), "features", method="ablationcam", batch_size=6)
    first = explainer.explain(X, target=1)
    traced = TRACES["count"]
    explainer.explain(X, target=3)
    explainer.explain(batch(3, 8, 6, 3, seed=4), target=[0, 2, 1])
    assert TRACES["count"] == traced
    np.testing.assert_allclose(explainer.explain(X, target=1).weights, first.weights, rtol=1e-6)


class NnxFeatures(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(3, CHANNELS, (3, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.conv(x))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.features = NnxFeatures(rngs)
        self.fc = nnx.Linear(CHANNELS, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.softmax(self.fc(self.features(x).mean((1, 2))))


class EqxFeatures(eqx.Module):
    conv: eqx.nn.Conv2d

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


class EqxNet(eqx.Module):
    """Per sample (C, H, W), run under ``jax.vmap``: its Linear is ``kernel @ x``."""

    features: EqxFeatures
    fc: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        first, second = jax.random.split(key)
        self.features = EqxFeatures(eqx.nn.Conv2d(3, CHANNELS, 3, padding=1, key=first))
        self.fc = eqx.nn.Linear(CHANNELS, CLASSES, key=second)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.features(x).max((1, 2)))


def _family(name: str):  # type: ignore[no-untyped-def]
    """Returns (model, layer, input, features(x), head(a) of the real model's modules, kernel (C, F))."""
    if name == "nnx":
        model = NnxNet(nnx.Rngs(0))
        head = lambda a: jax.nn.softmax(model.fc(a.mean((1, 2))))  # noqa: E731
        return model, "features", X, model.features, head, model.fc.kernel[...]
    if name == "equinox":
        model = EqxNet(jax.random.key(0))
        x = jnp.moveaxis(X, -1, 1)
        head = jax.vmap(lambda a: model.fc(a.max((1, 2))))
        return model, "features", x, jax.vmap(model.features), head, model.fc.weight.T
    kernel = batch(CHANNELS, CLASSES, seed=2) / 2
    conv = batch(CHANNELS, 3, 3, 3, seed=3)

    def features(x: jax.Array) -> jax.Array:
        out = jax.lax.conv_general_dilated(x, conv, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jax.nn.relu(out)

    def head(a: jax.Array) -> jax.Array:
        return jnp.tanh(jnp.mean(a, axis=(2, 3)) @ kernel + 0.1)

    return (features, head), None, jnp.moveaxis(X, -1, 1), features, head, kernel


@pytest.mark.parametrize("name", ["nnx", "equinox", "functions"])
def test_every_model_family_gives_the_dense_kernel_and_zeroing_weights(name: str) -> None:
    model, layer, x, features, head, kernel = _family(name)
    explainer = anycam.Explainer(model, layer, method="ablationcam", backend="jax")
    found, _ = offered_head(explainer, x)
    assert isinstance(found, anycam.AblationHead)
    np.testing.assert_allclose(found.weight, np.asarray(kernel), rtol=1e-6)
    classes = np.array([1, 4, 0])
    result = explainer.explain(x, target=classes)
    acts = np.asarray(features(x))
    axis = 1 if name != "nnx" else -1

    def scores_of(keep: np.ndarray) -> jax.Array:
        shape = [x.shape[0], 1, 1, 1]
        shape[axis] = CHANNELS
        return head(jnp.asarray(acts * keep.reshape(shape)))

    np.testing.assert_allclose(result.weights, _expected_weights(scores_of, x, classes), rtol=1e-4, atol=1e-5)
