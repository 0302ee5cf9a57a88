"""Compiled once, K maps from one forward pass, batches that equal their samples, any device."""

from __future__ import annotations

import functools

import equinox as eqx
import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from tests.contract.kit_jax import numpy_fill, numpy_init

pytestmark = pytest.mark.jax

CLASSES = 6
TRACES = {"count": 0}


class Counted(nn.Module):
    """conv → conv (explained) → GAP → dense; counts how often Python runs its ``__call__``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        TRACES["count"] += 1
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(5, (3, 3), name="conv2")(x))
        return nn.Dense(CLASSES, name="fc")(jnp.tanh(x).mean((1, 2)))


def inputs(*shape: int, seed: int = 3) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@functools.cache
def counted() -> tuple[Counted, dict]:
    model = Counted()
    return model, numpy_init(model, inputs(2, 8, 8, 3), np.random.default_rng(0))


def test_repeated_calls_do_not_recompile() -> None:
    model, variables = counted()
    x = inputs(4, 8, 8, 3)
    explainer = anycam.Explainer((model, variables), "conv2")
    first = explainer(x)
    traced = TRACES["count"]
    assert traced > 0
    for _ in range(3):
        np.testing.assert_array_equal(explainer(x), first)
    explainer(inputs(4, 8, 8, 3, seed=9))  # new values, same shapes
    assert TRACES["count"] == traced

    # Class indices are an argument of the compiled capture: any int or list of N ints is one trace.
    explainer(x, target=1)
    traced = TRACES["count"]
    explainer(x, target=2)
    explainer(x, target=[0, 5, 1, 2])
    assert TRACES["count"] == traced

    # The compiled capture belongs to (model, layer, target kind, shapes), not to the Explainer:
    # a new Explainer, or another gradient method, reuses it.
    anycam.Explainer((model, variables), "conv2", method="hirescam")(x, target=3)
    anycam.Explainer(model.bind(variables), "conv2")(x)
    assert TRACES["count"] == traced

    # A new batch size is a new shape: compiled once more, then reused.
    explainer(x[:2])
    traced = TRACES["count"]
    explainer(x[1:3])
    assert TRACES["count"] == traced


def test_callable_targets_compile_once_per_function() -> None:
    model, variables = counted()
    x = inputs(4, 8, 8, 3)
    explainer = anycam.Explainer((model, variables), "conv2")

    def score(output: jax.Array) -> jax.Array:
        return output[:, 1] - output[:, 2]

    result = explainer.explain(x, target=score)
    traced = TRACES["count"]
    again = explainer.explain(x, target=score)
    assert TRACES["count"] == traced
    np.testing.assert_array_equal(again.heatmap, result.heatmap)
    assert result.target is None
    # Linear in the output: the map of o1 - o2 is the difference of the two class gradients.
    both = explainer.explain(x, target=np.tile([1, 2], (4, 1)))
    np.testing.assert_allclose(result.scores, both.scores[:, 0] - both.scores[:, 1], rtol=1e-5, atol=1e-6)


def _count_convs(jaxpr: object) -> int:
    """Counts convolutions in a jaxpr, nested jaxprs (pjit, custom_vjp, ...) included."""
    total = 0
    for eqn in jaxpr.eqns:  # type: ignore[attr-defined]
        total += eqn.primitive.name == "conv_general_dilated"
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    total += _count_convs(inner)
    return total


def test_k_targets_share_one_forward_pass() -> None:
    """K one-hot cotangents go through jax.vmap of one vjp: the compiled capture has as many
    convolutions for K = 10 as for K = 1 (the forward once, the head's backward batched)."""
    model, variables = counted()
    x = inputs(4, 8, 8, 3)
    explainer = anycam.Explainer((model, variables), "conv1")
    program, params = explainer.backend._model.snapshot()
    capture = anycam.backends.jax.capture._capture
    one = capture.trace(program, ("given",), params, x, jnp.zeros((4, 1), jnp.int32)).jaxpr.jaxpr
    ten = capture.trace(program, ("given",), params, x, jnp.zeros((4, 10), jnp.int32)).jaxpr.jaxpr
    forward_only = anycam.backends.jax.capture._forward.trace(program, params, x).jaxpr.jaxpr
    # conv1 (explained) and conv2 forward, plus conv2's input gradient: no weight gradients,
    # nothing below the layer differentiated, and the same count for ten targets as for one.
    assert _count_convs(ten) == _count_convs(one) == _count_convs(forward_only) + 1 == 3

    # ... and the K maps equal K separate single-target calls.
    targets = np.tile(np.arange(CLASSES), (4, 1))
    many = explainer.explain(x, target=targets)
    for k in range(CLASSES):
        alone = explainer.explain(x, target=k)
        np.testing.assert_allclose(many.cam[:, k], alone.cam, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(many.scores[:, k], alone.scores, rtol=1e-6)


@pytest.mark.parametrize("target", [None, 4, anycam.top_k(3)], ids=["argmax", "int", "top_k"])
def test_batch_equals_each_sample_alone(target: object) -> None:
    model, variables = counted()
    x = inputs(3, 8, 8, 3)
    explainer = anycam.Explainer((model, variables), "conv2", method="gradcam++")
    batch = explainer.explain(x, target=target)
    for index in range(3):
        alone = explainer.explain(x[index : index + 1], target=target)
        np.testing.assert_allclose(alone.heatmap[0], batch.heatmap[index], atol=1e-5)
        np.testing.assert_array_equal(alone.target[0], batch.target[index])


def test_nnx_and_equinox_reuse_their_compiled_capture() -> None:
    calls = {"nnx": 0, "eqx": 0}

    class NnxNet(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(4, CLASSES, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            calls["nnx"] += 1
            return self.fc(jnp.tanh(self.conv(x)).mean((1, 2)))

    class EqxNet(eqx.Module):
        conv: eqx.nn.Conv2d
        fc: eqx.nn.Linear

        def __init__(self, key: jax.Array) -> None:
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv2d(3, 4, 3, key=k1)
            self.fc = eqx.nn.Linear(4, CLASSES, key=k2)

        def __call__(self, x: jax.Array) -> jax.Array:
            calls["eqx"] += 1
            return self.fc(jnp.tanh(self.conv(x)).mean((1, 2)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    nnx_model = nnx.merge(graphdef, numpy_fill(state, rng))
    eqx_model = numpy_fill(eqx.filter_eval_shape(EqxNet, jax.random.key(0)), rng)
    cases = [
        ("nnx", nnx_model, "conv", inputs(2, 8, 8, 3)),
        ("eqx", eqx_model, "conv", inputs(2, 3, 8, 8)),
    ]
    for name, model, layer, x in cases:
        explainer = anycam.Explainer(model, layer)
        explainer(x)
        traced = calls[name]
        explainer(x)
        anycam.Explainer(model, layer)(x)
        assert calls[name] == traced, name
    # An in-place NNX update keeps the structure, hence the compiled capture.
    nnx_model.fc.bias[...] = nnx_model.fc.bias[...] + 1
    traced = calls["nnx"]
    anycam.Explainer(nnx_model, "conv")(cases[0][3])
    assert calls["nnx"] == traced


def test_reduced_precision_inputs_give_float32_arrays() -> None:
    model, variables = counted()
    x = inputs(2, 8, 8, 3)
    explainer = anycam.Explainer((model, variables), "conv2")
    result = explainer.explain(x.astype(jnp.bfloat16))
    assert result.heatmap.dtype == result.cam.dtype == result.scores.dtype == np.float32
    reference = explainer.explain(x)
    np.testing.assert_allclose(result.heatmap, reference.heatmap, atol=0.1)
    assert np.asarray(explainer.backend.predict(x)).dtype == np.float32


def test_numpy_inputs_and_device_arrays_agree() -> None:
    model, variables = counted()
    x = inputs(2, 8, 8, 3)
    explainer = anycam.Explainer((model, variables), "conv2")
    np.testing.assert_allclose(explainer(np.asarray(x)), explainer(x), atol=1e-6)
    for device in jax.devices():  # CPU here; every GPU or TPU where one is present
        placed = jax.device_put(x, device)
        np.testing.assert_allclose(explainer(placed), explainer(x), atol=1e-4)


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="no GPU in this run")
def test_model_and_inputs_on_a_gpu() -> None:
    model, variables = counted()
    gpu = next(d for d in jax.devices() if d.platform == "gpu")
    x = inputs(2, 8, 8, 3)
    on_gpu = jax.device_put(variables, gpu), jax.device_put(x, gpu)
    heat = anycam.Explainer((model, on_gpu[0]), "conv2")(on_gpu[1], target=anycam.top_k(2))
    cpu = jax.devices("cpu")[0]
    expected = anycam.Explainer((model, jax.device_put(variables, cpu)), "conv2")(
        jax.device_put(x, cpu), target=anycam.top_k(2)
    )
    np.testing.assert_allclose(heat, expected, atol=1e-3)
