"""JAX models with several inputs: extra positional arguments and keyword arguments.

A linen, an NNX and an Equinox model take ``(image, scale)`` — the image and a per-sample
scale vector that multiplies the feature map — and are explained with the inputs as a tuple
(positional) or a dict (keywords); the reference is the same map from ``jax.vjp`` of the model
split by hand with the scale bound.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import anycam

pytestmark = pytest.mark.jax

RNG = np.random.default_rng(5)


def reference(features, head, x, channel_axis: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    activations = features(x)
    outputs, pullback = jax.vjp(head, activations)
    (gradients,) = pullback(jax.nn.one_hot(jnp.argmax(outputs, axis=1), outputs.shape[1]))
    spatial = tuple(a for a in range(1, activations.ndim) if a != channel_axis % activations.ndim)
    alpha = jnp.mean(gradients, axis=spatial, keepdims=True)
    return np.asarray(jax.nn.relu(jnp.sum(alpha * activations, axis=channel_axis)))


def assert_map(result: anycam.Explanation, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)


class LinenTwo(nn.Module):
    def setup(self) -> None:
        self.conv, self.fc = nn.Conv(4, (3, 3)), nn.Dense(3)

    def features(self, image: jax.Array) -> jax.Array:
        return self.conv(image)

    def head(self, a: jax.Array, scale: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(nn.relu(a) * scale[:, None, None, :], axis=(1, 2)))

    def __call__(self, image: jax.Array, scale: jax.Array) -> jax.Array:
        return self.head(self.features(image), scale)


def test_linen_positional_and_keyword_inputs() -> None:
    module = LinenTwo()
    image = jnp.asarray(RNG.normal(size=(2, 8, 8, 3)).astype(np.float32))
    scale = jnp.asarray(RNG.uniform(0.5, 2.0, size=(2, 4)).astype(np.float32))
    variables = module.init(jax.random.key(0), image, scale)
    expected = reference(
        lambda x: module.apply(variables, x, method=LinenTwo.features),
        lambda a: module.apply(variables, a, scale, method=LinenTwo.head),
        image,
        channel_axis=-1,
    )
    explainer = anycam.Explainer((module, variables), "conv")
    positional = explainer.explain((image, scale))
    assert_map(positional, expected)
    # The first floating input with spatial axes is the image, wherever it stands.
    keywords = explainer.explain({"scale": scale, "image": image})
    np.testing.assert_allclose(keywords.cam, positional.cam, rtol=1e-6)
    assert keywords.heatmap.shape == (2, 8, 8)
    with pytest.raises(anycam.InputError, match=r"spatial_input=2 names no input.*0: \(2, 8, 8, 3\)"):
        anycam.Explainer((module, variables), "conv", spatial_input=2).explain((image, scale))
    # A key the model does not take: its own message, with the inputs given.
    refused = r"does not accept the inputs given \('image'.*'scales'.*unexpected keyword"
    with pytest.raises(anycam.InputError, match=refused):
        explainer.explain({"image": image, "scales": scale})


class EqxTwo(eqx.Module):
    conv: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.conv, self.fc = eqx.nn.Conv2d(3, 4, 3, key=k1), eqx.nn.Linear(4, 3, key=k2)

    def features(self, image: jax.Array) -> jax.Array:
        return self.conv(image)

    def head(self, a: jax.Array, scale: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(jax.nn.relu(a) * scale[:, None, None], axis=(1, 2)))

    def __call__(self, image: jax.Array, scale: jax.Array) -> jax.Array:
        return self.head(self.features(image), scale)


def test_equinox_extra_positional_input_is_vmapped_with_the_image() -> None:
    model = EqxTwo(jax.random.key(1))
    image = jnp.asarray(RNG.normal(size=(2, 3, 8, 8)).astype(np.float32))
    scale = jnp.asarray(RNG.uniform(0.5, 2.0, size=(2, 4)).astype(np.float32))
    expected = reference(jax.vmap(model.features), lambda a: jax.vmap(model.head)(a, scale), image, channel_axis=1)
    assert_map(anycam.Explainer(model, "conv").explain((image, scale)), expected)
    assert_map(anycam.Explainer(model, "conv").explain({"image": image, "scale": scale}), expected)


class NnxTwo(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv, self.fc = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, image: jax.Array, *, scale: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(jax.nn.relu(self.conv(image)) * scale[:, None, None, :], axis=(1, 2)))


def test_nnx_keyword_input() -> None:
    model = NnxTwo(nnx.Rngs(3))
    image = jnp.asarray(RNG.normal(size=(2, 8, 8, 3)).astype(np.float32))
    scale = jnp.asarray(RNG.uniform(0.5, 2.0, size=(2, 4)).astype(np.float32))

    def head(a: jax.Array) -> jax.Array:
        return model.fc(jnp.mean(jax.nn.relu(a) * scale[:, None, None, :], axis=(1, 2)))

    expected = reference(model.conv, head, image, channel_axis=-1)
    # A positional image and a keyword-only scale: a dict gives both by name.
    assert_map(anycam.Explainer(model, "conv").explain({"image": image, "scale": scale}), expected)
