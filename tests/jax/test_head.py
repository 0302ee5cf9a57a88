"""Ablation-CAM's copies in JAX: a skip connection around the layer, one compile per shapes, and the
part before the layer run once under vmap."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from tests.contract.kit_jax import numpy_init

pytestmark = pytest.mark.jax

CLASSES = 4
TRACES = {"count": 0}


class Residual(nn.Module):
    """conv → conv "mid" (explained) → ReLU → conv → + skip from before "mid" → GAP → dense.

    ``keep`` multiplies the output of "mid" (a channel mask): the oracle runs the full network
    again with channels zeroed. Counts how often Python runs its ``__call__``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        TRACES["count"] += 1
        skip = nn.relu(nn.Conv(4, (3, 3), name="first")(x))
        out = nn.Conv(4, (3, 3), name="mid")(skip)
        if keep is not None:
            out = out * keep[:, None, None, :]
        branch = jnp.tanh(nn.Conv(4, (1, 1), name="after")(nn.relu(out)))
        return nn.Dense(CLASSES, name="fc")((branch + skip).mean((1, 2)))


def batch(*shape: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@functools.cache
def residual() -> tuple[Residual, dict]:
    model = Residual()
    return model, numpy_init(model, batch(2, 8, 8, 3), np.random.default_rng(0))


def test_ablation_cam_with_a_skip_connection_equals_rerunning_with_channels_zeroed() -> None:
    model, variables = residual()
    x = batch(3, 8, 8, 3)
    classes = np.array([0, 1, 2])
    explanation = anycam.Explainer((model, variables), "mid", method="ablationcam", batch_size=5).explain(
        x, target=classes
    )
    rows = np.arange(3)
    full = np.asarray(model.apply(variables, x))[rows, classes]
    expected = np.zeros((3, 4))
    for channel in range(4):
        keep = np.ones((3, 4), np.float32)
        keep[:, channel] = 0
        ablated = np.asarray(model.apply(variables, x, jnp.asarray(keep)))[rows, classes]
        expected[:, channel] = (full - ablated) / full  # Desai & Ramaswamy 2020, eq. 2
    np.testing.assert_allclose(explanation.scores, full, rtol=1e-5)
    np.testing.assert_allclose(explanation.weights, expected, rtol=1e-4, atol=1e-5)


def test_head_scores_compile_once_per_shapes() -> None:
    model, variables = residual()
    x = batch(2, 8, 8, 3)
    explainer = anycam.Explainer((model, variables), "mid", method="ablationcam", batch_size=2)
    first = explainer.explain(x, target=1)  # chunks of one channel × 2 samples
    traced = TRACES["count"]
    explainer.explain(x, target=3)
    explainer.explain(batch(2, 8, 8, 3, seed=5), target=[0, 2])
    assert TRACES["count"] == traced
    np.testing.assert_allclose(explainer.explain(x, target=1).weights, first.weights, rtol=1e-6)


def test_the_prefix_runs_once_under_vmap() -> None:
    """The compiled head_scores convolves the prefix once, unbatched: its jaxpr holds one
    convolution per layer, whatever the number of copies, the copies riding in the batch."""
    model, variables = residual()
    explainer = anycam.Explainer((model, variables), "mid", method="ablationcam")
    program, params = explainer.backend._model.snapshot()
    x = batch(2, 8, 8, 3)
    trace = anycam.backends.jax.head._head_scores.trace
    given = jnp.zeros((2, 1), jnp.int32)
    for copies in (1, 16):
        jaxpr = trace(program, ("given",), params, x, jnp.zeros((copies, 2, 8, 8, 4)), given).jaxpr
        convolutions = [eqn for eqn in _eqns(jaxpr.jaxpr) if eqn.primitive.name == "conv_general_dilated"]
        shapes = [eqn.invars[0].aval.shape for eqn in convolutions]
        assert (2, 8, 8, 3) in shapes  # "first" on the batch itself
        assert (copies * 2, 8, 8, 4) in shapes  # "after" on all copies at once
        assert len(shapes) == 3  # first, mid (unused, traced once) and after: none per copy


def _eqns(jaxpr):  # type: ignore[no-untyped-def]
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)
