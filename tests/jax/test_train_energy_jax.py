"""Training with a penalty on the map works: a few optimiser steps on the energy of the Grad-CAM map
outside the digit's box raise the energy pointing game on held-out canvases (issue 21.3).

The demo network (``anycam.demo``, Flax port in ``backends/jax/demo.py``) and its 48 canvases with
the digits' boxes; the split is seeded (32 to train, 16 held out). Loss: the share of the map's
mass outside the box, plus 0.1 × cross-entropy so the classifier stays one; 15 steps of Adam
(lr 3e-4) on the parameters, through ``jax.grad`` of ``explain_fn`` (second order).

Measured here for split seeds 0-4: the held-out energy pointing game rises by 0.111, 0.087,
0.114, 0.095 and 0.104 (mean 0.102, standard deviation 0.011; before: 0.38-0.41); held-out
accuracy after the steps 0.88-1.00. The test runs seed 0 and asks for a rise of at least 0.05,
about 4.7 standard deviations below the mean and 0.037 below the smallest rise seen; the
metric is ``anycam.metrics.energy_pointing_game`` (NumPy), not the loss itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from anycam.backends.jax.compose import explain_fn
from anycam.backends.jax.demo import build_demo_model

from anycam.demo.data import load_demo
from anycam.metrics import energy_pointing_game

optax = pytest.importorskip("optax")

pytestmark = pytest.mark.jax

SEED, STEPS, RATE = 0, 15, 3e-4
MARGIN = 0.05


def _outside(boxes: np.ndarray, size: int) -> jax.Array:
    rows = np.arange(size)[None, :, None]
    cols = np.arange(size)[None, None, :]
    r0, c0, r1, c1 = (boxes[:, i, None, None] for i in range(4))
    inside = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    return jnp.asarray(~inside, jnp.float32)


def test_an_energy_penalty_on_the_map_raises_the_held_out_energy_pointing_game() -> None:
    demo = load_demo()
    module, variables = build_demo_model(demo["weights"])
    images, labels, boxes = demo["images"].transpose(0, 2, 3, 1), demo["labels"], demo["boxes"]
    order = np.random.default_rng(SEED).permutation(len(images))
    train, held = order[:32], order[32:]
    f = explain_fn((module, variables), "stage3", "gradcam", differentiable=True)
    stats = variables["batch_stats"]
    optimiser = optax.adam(RATE)

    def loss(params, x, y, outside):  # type: ignore[no-untyped-def]
        v = {"params": params, "batch_stats": stats}
        maps = f(v, x, y)
        energy = jnp.mean(jnp.sum(maps * outside, axis=(1, 2)) / (jnp.sum(maps, axis=(1, 2)) + 1e-6))
        logits = module.apply(v, x)
        return energy + 0.1 * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @jax.jit
    def step(params, state, x, y, outside):  # type: ignore[no-untyped-def]
        grads = jax.grad(loss)(params, x, y, outside)
        updates, state = optimiser.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    evaluate = jax.jit(f)

    def held_out(params) -> tuple[float, float]:  # type: ignore[no-untyped-def]
        v = {"params": params, "batch_stats": stats}
        maps = np.asarray(evaluate(v, jnp.asarray(images[held]), jnp.asarray(labels[held])))
        accuracy = float(np.mean(np.argmax(module.apply(v, images[held]), axis=1) == labels[held]))
        return float(energy_pointing_game(maps, boxes[held]).mean()), accuracy

    params = variables["params"]
    before, accuracy_before = held_out(params)
    state = optimiser.init(params)
    x, y, outside = jnp.asarray(images[train]), jnp.asarray(labels[train]), _outside(boxes[train], images.shape[1])
    for _ in range(STEPS):
        params, state = step(params, state, x, y, outside)
    after, accuracy = held_out(params)
    assert after - before >= MARGIN, (before, after)
    assert accuracy >= 0.75, (accuracy_before, accuracy)
