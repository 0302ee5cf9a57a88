"""Guided backpropagation reaches every spelling of a ReLU, or says what it did not reach (issue 19, item 7).

Each model is written twice: once with the spelling under test, once with a hand-written guided
ReLU (a ``jax.custom_vjp`` whose backward passes a gradient only where the ReLU's input and the
gradient are both positive) in its place. The oracle is plain ``jax.vjp`` of the second.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from tests.contract.kit_jax import numpy_init

pytestmark = pytest.mark.jax

RNG = np.random.default_rng(7)
W1 = jnp.asarray(RNG.normal(size=(3, 8)).astype(np.float32))
W2 = jnp.asarray(RNG.normal(size=(8, 8)).astype(np.float32) / np.sqrt(8))
W3 = jnp.asarray(RNG.normal(size=(8, 5)).astype(np.float32))
X = jnp.asarray(RNG.normal(size=(2, 5, 6, 3)).astype(np.float32))


@jax.custom_vjp
def guided_relu(z: jax.Array) -> jax.Array:
    return jnp.where(z > 0, z, 0.0)


guided_relu.defvjp(lambda z: (guided_relu(z), z), lambda z, g: (g * (z > 0) * (g > 0),))

SPELLINGS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "clip_0_none": lambda z: jnp.clip(z, 0, None),
    "clip_min": lambda z: jnp.clip(z, min=0.0),
    "maximum_int_zero": lambda z: jnp.maximum(z, 0),
    "maximum_zero_first": lambda z: jnp.maximum(0.0, z),
    "where_gt": lambda z: jnp.where(z > 0, z, 0),
    "where_lt": lambda z: jnp.where(z < 0, 0.0, z),
    "where_zeros_like": lambda z: jnp.where(0 < z, z, jnp.zeros_like(z)),
    "times_mask": lambda z: z * (z > 0),
}


def features(act: Callable[[jax.Array], jax.Array], x: jax.Array, remat: bool = False) -> jax.Array:
    """Two channel mixes, each followed by ``act``; with ``remat`` both inside ``jax.checkpoint``."""

    def body(x: jax.Array) -> jax.Array:
        return act(act(x @ W1) @ W2)

    return jax.checkpoint(body)(x) if remat else body(x)


def head(a: jax.Array) -> jax.Array:
    return a.mean(axis=(1, 2)) @ W3


def oracle(x: jax.Array, classes: np.ndarray, remat: bool = False) -> np.ndarray:
    """Guided gradients ``(N, C, H, W)`` of the ``classes`` from the hand-replaced network."""
    _, vjp_fn = jax.vjp(lambda x: head(features(guided_relu, x, remat)), x)
    return np.moveaxis(np.asarray(vjp_fn(jax.nn.one_hot(classes, 5))[0]), -1, 1)


def explain(model, layer=None, **options):  # type: ignore[no-untyped-def]
    """Explains with every anycam warning an error: a ReLU reached leaves nothing to warn about."""
    explainer = anycam.Explainer(model, layer, method="guided-backprop", backend="jax", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", anycam.AnycamWarning)
        return explainer.explain(X, target=[1, 3])


def _check(result: anycam.Explanation, expected: np.ndarray) -> None:
    plain = np.moveaxis(
        np.asarray(jax.vjp(lambda x: head(features(jax.nn.relu, x)), X)[1](jax.nn.one_hot([1, 3], 5))[0]), -1, 1
    )
    # The oracle must tell guided from plain gradients, or the comparison proves nothing.
    assert np.abs(plain - expected).max() > 1e-2 * np.abs(expected).max()
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(result.attribution / scale, expected / scale, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_guided_backprop_guides_every_relu_spelling(spelling: str) -> None:
    act = SPELLINGS[spelling]
    result = explain((lambda x: features(act, x), head), input_layout="channels_last")
    _check(result, oracle(X, np.array([1, 3])))


@pytest.mark.parametrize("spelling", ["relu", "where_gt"])
def test_guided_backprop_reaches_relus_inside_checkpoint(spelling: str) -> None:
    # Every ReLU inside jax.checkpoint: the warning used to say the model had none.
    act = jax.nn.relu if spelling == "relu" else SPELLINGS[spelling]
    result = explain((lambda x: features(act, x, remat=True), head), input_layout="channels_last")
    _check(result, oracle(X, np.array([1, 3]), remat=True))


class Mix(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(nn.Dense(8)(x))


class RematNet(nn.Module):
    """A Flax linen network whose every ReLU is inside ``nn.remat`` blocks."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.remat(Mix)(name="mix1")(x)
        x = nn.remat(Mix)(name="mix2")(x)
        return nn.Dense(5, name="fc")(x.mean(axis=(1, 2)))


def test_guided_backprop_reaches_relus_inside_flax_remat() -> None:
    model = RematNet()
    variables = numpy_init(model, X, np.random.default_rng(3))
    params = variables["params"]

    def dense(name: str, x: jax.Array) -> jax.Array:
        return x @ params[name]["Dense_0"]["kernel"] + params[name]["Dense_0"]["bias"]

    def guided_net(x: jax.Array) -> jax.Array:
        h = guided_relu(dense("mix2", guided_relu(dense("mix1", x))))
        return h.mean(axis=(1, 2)) @ params["fc"]["kernel"] + params["fc"]["bias"]

    np.testing.assert_allclose(guided_net(X), model.apply(variables, X), rtol=1e-5, atol=1e-5)
    expected = np.moveaxis(np.asarray(jax.vjp(guided_net, X)[1](jax.nn.one_hot([1, 3], 5))[0]), -1, 1)
    result = explain((model, variables), "mix2")
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(result.attribution / scale, expected / scale, rtol=1e-4, atol=1e-6)


def test_the_no_relu_warning_is_an_anycam_warning() -> None:
    with pytest.warns(anycam.AnycamWarning, match="no ReLU") as record:
        anycam.Explainer((lambda x: jnp.tanh(x @ W1), head), None, method="guided-backprop", backend="jax").explain(
            X, target=0
        )
    assert all(isinstance(w.message, anycam.AnycamWarning) for w in record if "no ReLU" in str(w.message))
