"""``"name:input"`` in every JAX model family: the shared-activation case, against a plain vjp.

Each net runs conv1 → act → conv2 → act → pool → fc with ONE activation module used twice, so
the activation's output cannot be explained (it runs twice), but the input of ``pool`` is the
post-activation map of conv2. The reference splits the same net by hand and differentiates the
head with ``jax.vjp``.
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


def reference(features, head, x, channel_axis: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    activations = features(x)
    outputs, pullback = jax.vjp(head, activations)
    (gradients,) = pullback(jax.nn.one_hot(jnp.argmax(outputs, axis=1), outputs.shape[1]))
    spatial = tuple(a for a in range(1, activations.ndim) if a != channel_axis % activations.ndim)
    alpha = jnp.mean(gradients, axis=spatial, keepdims=True)
    return np.asarray(jax.nn.relu(jnp.sum(alpha * activations, axis=channel_axis)))


def check(model, x, features, head, channel_axis: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(anycam.LayerError, match="more than once"):
        anycam.Explainer(model, "act").explain(x)
    result = anycam.Explainer(model, "pool:input").explain(x)
    assert result.layer == "pool:input"
    expected = reference(features, head, x, channel_axis)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)


class Act(nn.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


class Pool(nn.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


class LinenNet(nn.Module):
    def setup(self) -> None:
        self.conv1, self.conv2 = nn.Conv(4, (3, 3)), nn.Conv(6, (3, 3), strides=2)
        self.act, self.pool, self.fc = Act(), Pool(), nn.Dense(3)

    def features(self, x: jax.Array) -> jax.Array:
        return self.act(self.conv2(self.act(self.conv1(x))))

    def head(self, a: jax.Array) -> jax.Array:
        return self.fc(self.pool(a))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def test_linen_pool_input() -> None:
    module = LinenNet()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype(np.float32))
    variables = module.init(jax.random.key(0), x)
    # Act and Pool own no variables; setup registers them, so their paths are known all the same.
    features = jax.jit(lambda xs: module.apply(variables, xs, method=LinenNet.features))
    head = jax.jit(lambda a: module.apply(variables, a, method=LinenNet.head))
    check((module, variables), x, features, head, channel_axis=-1)


class EqxNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    act: eqx.nn.Lambda
    pool: eqx.nn.Lambda
    fc: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, 4, 3, key=k1)
        self.conv2 = eqx.nn.Conv2d(4, 6, 3, stride=2, key=k2)
        self.act = eqx.nn.Lambda(jax.nn.relu)
        self.pool = eqx.nn.Lambda(lambda a: jnp.mean(a, axis=(1, 2)))
        self.fc = eqx.nn.Linear(6, 3, key=k3)

    def features(self, x: jax.Array) -> jax.Array:
        return self.act(self.conv2(self.act(self.conv1(x))))

    def head(self, a: jax.Array) -> jax.Array:
        return self.fc(self.pool(a))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def test_equinox_pool_input() -> None:
    model = EqxNet(jax.random.key(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 10, 10)).astype(np.float32))
    check(model, x, jax.vmap(model.features), jax.vmap(model.head), channel_axis=1)


class NnxAct(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class NnxPool(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)
        self.act, self.pool = NnxAct(), NnxPool()
        self.fc = nnx.Linear(6, 3, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        return self.act(self.conv2(self.act(self.conv1(x))))

    def head(self, a: jax.Array) -> jax.Array:
        return self.fc(self.pool(a))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def test_nnx_pool_input() -> None:
    model = NnxNet(nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 10, 10, 3)).astype(np.float32))
    check(model, x, model.features, model.head, channel_axis=-1)


class DeadBranch(nn.Module):
    """A conv whose output is computed and dropped: on no path to the output."""

    def setup(self) -> None:
        self.conv, self.unused, self.fc = nn.Conv(4, (3, 3)), nn.Conv(2, (1, 1)), nn.Dense(3)

    def __call__(self, x: jax.Array) -> jax.Array:
        features = nn.relu(self.conv(x))
        self.unused(features)
        return self.fc(jnp.mean(features, axis=(1, 2)))


def test_auto_skips_shared_and_dead_modules() -> None:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype(np.float32))
    module = LinenNet()
    variables = module.init(jax.random.key(0), x)
    explainer = anycam.Explainer((module, variables), "auto")
    explainer.explain(x)
    # act runs twice; conv2 is the last module that runs once with a 2-D map.
    assert explainer.layer_names == ("conv2",)
    dead = DeadBranch()
    explainer = anycam.Explainer((dead, dead.init(jax.random.key(1), x)), "auto")
    explainer.explain(x)
    assert explainer.layer_names == ("conv",)
    eqx_model = EqxNet(jax.random.key(1))
    explainer = anycam.Explainer(eqx_model, "auto")
    explainer.explain(jnp.moveaxis(x, -1, 1))
    assert explainer.layer_names == ("conv2",)


def test_auto_with_no_map_names_the_modules_considered() -> None:
    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.Dense(2, name="out")(nn.Dense(4, name="hidden")(x.reshape(x.shape[0], -1)))

    x = jnp.ones((2, 4, 4, 1))
    module = Flat()
    with pytest.raises(anycam.LayerError, match=r"considered.*'hidden'.*'out'"):
        anycam.Explainer((module, module.init(jax.random.key(0), x)), "auto").explain(x)


def test_auto_on_the_parity_net_picks_stage3() -> None:
    from anycam.backends.jax import demo as demo_jax

    from anycam.demo.data import load_demo

    data = load_demo()
    module, variables = demo_jax.build_demo_model(data["weights"])
    x = jnp.asarray(data["images"][:2].transpose(0, 2, 3, 1))
    explainer = anycam.Explainer((module, variables), "auto")
    chosen = explainer.explain(x)
    # The same choice as torch and Keras make on their ports of the net.
    assert explainer.layer_names == ("stage3",)
    np.testing.assert_array_equal(chosen.cam, anycam.Explainer((module, variables), "stage3").explain(x).cam)
