"""Guided backpropagation in JAX: ReLU in Flax, Equinox, plain functions and loops, no recompilation,
and jax.nn.relu untouched, also after a failure."""

from __future__ import annotations

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from tests.jax.test_head import CLASSES, TRACES, batch, residual

pytestmark = pytest.mark.jax


@jax.custom_vjp
def guided_relu(z: jax.Array) -> jax.Array:
    return jnp.where(z > 0, z, 0.0)


guided_relu.defvjp(lambda z: (guided_relu(z), z), lambda z, g: (jnp.where((z > 0) & (g > 0), g, 0.0),))


def _mlp(params: dict, x: jax.Array, relus: tuple) -> jax.Array:
    """(N, L, C) → dense layers joined by ``relus`` → mean over L → (N, classes)."""
    hidden = x
    for index, relu in enumerate(relus):
        hidden = relu(hidden @ params[f"w{index}"] + params[f"b{index}"])
    return hidden.mean(1) @ params["out"]


@functools.cache
def mlp_params() -> dict:
    rng = np.random.default_rng(1)
    shapes = {"w0": (6, 8), "b0": (8,), "w1": (8, 8), "b1": (8,), "w2": (8, 8), "b2": (8,), "out": (8, CLASSES)}
    return {k: jnp.asarray(rng.normal(size=s).astype(np.float32) / np.sqrt(s[0])) for k, s in shapes.items()}


def _guided_oracle(x: jax.Array, classes: np.ndarray) -> np.ndarray:
    params = mlp_params()
    _, vjp_fn = jax.vjp(lambda xs: _mlp(params, xs, (guided_relu,) * 3), x)
    return np.asarray(vjp_fn(jax.nn.one_hot(classes, CLASSES))[0])


def test_guided_backprop_catches_relu_in_plain_functions() -> None:
    """jax.nn.relu, jnp.maximum(x, 0) and a ReLU inside lax.scan, in a (features, head) pair."""
    params = mlp_params()

    def looped(z: jax.Array) -> jax.Array:
        out, _ = jax.lax.scan(lambda carry, _: (jax.nn.relu(carry), None), z, None, length=1)
        return out

    relus = (jax.nn.relu, lambda z: jnp.maximum(z, 0.0), looped)

    def features(x: jax.Array) -> jax.Array:
        return _hidden(params, x, relus)

    def head(hidden: jax.Array) -> jax.Array:
        return hidden.mean(1) @ params["out"]

    x = batch(5, 3, 6)
    classes = np.array([0, 1, 2, 3, 0])
    explainer = anycam.Explainer((features, head), None, method="guided-backprop", backend="jax")
    result = explainer.explain(x, target=classes)
    # A (features, head) pair's input is channels first, (N, C, L): the attribution has its shape.
    np.testing.assert_allclose(result.attribution, _guided_oracle(x, classes), rtol=1e-4, atol=1e-6)
    _, vjp_fn = jax.vjp(lambda xs: head(features(xs)), x)
    plain = np.asarray(vjp_fn(jax.nn.one_hot(classes, CLASSES))[0])
    assert not np.allclose(result.attribution, plain, atol=1e-4)


def _hidden(params: dict, x: jax.Array, relus: tuple) -> jax.Array:
    hidden = x
    for index, relu in enumerate(relus):
        hidden = relu(hidden @ params[f"w{index}"] + params[f"b{index}"])
    return hidden


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = nn.relu(nn.Dense(8, name="d0")(x))
        hidden = jax.nn.relu(nn.Dense(8, name="d1")(hidden))
        hidden = nn.activation.relu(nn.Dense(8, name="d2")(hidden))
        return nn.Dense(CLASSES, use_bias=False, name="out")(hidden.mean(1))


def test_guided_backprop_catches_relu_in_flax() -> None:
    params = mlp_params()
    variables = {"params": {f"d{i}": {"kernel": params[f"w{i}"], "bias": params[f"b{i}"]} for i in range(3)}}
    variables["params"]["out"] = {"kernel": params["out"]}
    x = batch(4, 3, 6)
    classes = np.array([3, 2, 1, 0])
    result = anycam.Explainer((FlaxMLP(), variables), "d2", method="guided-backprop").explain(x, target=classes)
    # Flax inputs are channels last: attribution (N, C_in, L) is the gradient moved.
    np.testing.assert_allclose(result.attribution, np.moveaxis(_guided_oracle(x, classes), -1, 1), rtol=1e-4, atol=1e-6)


class EquinoxDense(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight + self.bias


class EquinoxMLP(eqx.Module):
    layers: list
    out: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:  # one sample (C, L): Equinox is channels first
        hidden = x.T
        for layer in self.layers:
            hidden = jax.nn.relu(layer(hidden))
        return hidden.mean(0) @ self.out


def test_guided_backprop_catches_relu_in_equinox() -> None:
    params = mlp_params()
    layers = [EquinoxDense(params[f"w{i}"], params[f"b{i}"]) for i in range(3)]
    model = EquinoxMLP(layers, params["out"])
    x = batch(4, 3, 6)
    classes = np.array([1, 1, 0, 2])
    x_cl = jnp.moveaxis(x, -1, 1)  # (N, C, L)
    result = anycam.Explainer(model, "layers.2", method="guided-backprop").explain(x_cl, target=classes)
    expected = np.moveaxis(_guided_oracle(x, classes), -1, 1)
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-4, atol=1e-6)


def test_jax_nn_relu_is_untouched_also_after_a_failure() -> None:
    model, variables = residual()
    x = batch(2, 8, 8, 3)
    relu, flax_relu = jax.nn.relu, nn.relu

    def failing(output: jax.Array) -> jax.Array:
        raise RuntimeError("target failed")

    explainer = anycam.Explainer((model, variables), "mid", method="guided-backprop")
    with pytest.raises(RuntimeError, match="target failed"):
        explainer.explain(x, target=failing)
    explainer.explain(x, target=1)
    assert jax.nn.relu is relu and nn.relu is flax_relu
    # Ordinary gradients afterwards: the ReLU's own rule.
    z = jnp.array([-1.0, 2.0])
    np.testing.assert_array_equal(jax.grad(lambda v: (jax.nn.relu(v) * jnp.array([3.0, -4.0])).sum())(z), [0.0, -4.0])


def test_guided_gradients_compile_once_and_warn_without_relu() -> None:
    model, variables = residual()
    explainer = anycam.Explainer((model, variables), "mid", method="guided-backprop")
    explainer(batch(2, 8, 8, 3), target=1)
    traced = TRACES["count"]
    explainer(batch(2, 8, 8, 3, seed=1), target=[2, 3])
    assert TRACES["count"] == traced

    def features(x: jax.Array) -> jax.Array:
        return jnp.tanh(x)

    def head(hidden: jax.Array) -> jax.Array:
        return hidden.mean((2, 3))

    with pytest.warns(UserWarning, match="no ReLU"):
        anycam.Explainer((features, head), None, method="guided-backprop", backend="jax")(batch(2, 3, 4, 4))
