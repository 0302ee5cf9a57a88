"""Two readings of the input and the layer, nothing to decide between them: refused (issue 19, item 3).

An Equinox protein model takes a channels-last one-hot sequence ``(N, 77, 26)``: 77 positions of
26 letters. Without a convolution, nothing says that its ``(N, 77, 16)`` layer is not 77 channels
over 16 positions of a channels-first ``(N, 77, 26)`` signal; the map must then be refused, not
drawn over the 26 letters. With ``input_layout=`` it is drawn over the 77 positions, as Grad-CAM
computed here from plain ``jax.vjp``. A model with a convolution keeps its channels-first
convention.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam

pytestmark = pytest.mark.jax

POSITIONS, LETTERS = 77, 26


class Embed(eqx.Module):
    """Each position's one-hot letter → 16 features: ``(77, 26)`` → ``(77, 16)``."""

    linear: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(jax.vmap(self.linear)(x))


class Protein(eqx.Module):
    embed: Embed
    mix: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = Embed(eqx.nn.Linear(LETTERS, 16, key=k1))
        self.mix = eqx.nn.Linear(16, 16, key=k2)
        self.out = eqx.nn.Linear(16, 3, key=k3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.head_features(self.embed(x)))

    def head_features(self, a: jax.Array) -> jax.Array:
        return jnp.tanh(jax.vmap(self.mix)(a)).mean(axis=0)


def sequences(batch: int = 2) -> jax.Array:
    letters = np.random.default_rng(3).integers(0, LETTERS, size=(batch, POSITIONS))
    return jnp.asarray(np.eye(LETTERS, dtype=np.float32)[letters])  # (N, 77, 26)


def gradcam_over_positions(model: Protein, x: jax.Array) -> np.ndarray:
    """Grad-CAM ``(N, 77)`` of the argmax class, the layer read channels-last, by plain jax.vjp."""
    activations = jax.vmap(model.embed)(x)  # (N, 77, 16)
    outputs, pullback = jax.vjp(jax.vmap(lambda a: model.out(model.head_features(a))), activations)
    (gradients,) = pullback(jax.nn.one_hot(jnp.argmax(outputs, axis=1), outputs.shape[1]))
    alpha = gradients.mean(axis=1, keepdims=True)  # over the positions
    return np.asarray(jax.nn.relu((alpha * activations).sum(axis=-1)))


@pytest.mark.parametrize("form", ["equinox", "functions"])
def test_a_sequence_model_that_reads_both_ways_is_refused_until_the_layout_is_given(form: str) -> None:
    protein = Protein(jax.random.key(0))
    model = (
        protein
        if form == "equinox"
        else (jax.vmap(protein.embed), jax.vmap(lambda a: protein.out(protein.head_features(a))))
    )
    layer = "embed" if form == "equinox" else None
    x = sequences()
    for method in ("gradcam", "scorecam", "ablationcam"):
        with pytest.raises(anycam.InputError, match=r"channels_first.*channels_last.*input_layout="):
            anycam.Explainer(model, layer, method=method, backend="jax").explain(x)
    result = anycam.Explainer(model, layer, input_layout="channels_last", backend="jax").explain(x)
    expected = gradcam_over_positions(protein, x)
    assert result.cam.shape == (2, POSITIONS) and result.heatmap.shape == (2, POSITIONS)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)


class Signal(eqx.Module):
    conv: eqx.nn.Conv1d
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(8, 8, 3, padding=1, key=k1)
        self.out = eqx.nn.Linear(8, 3, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.conv(x)).mean(axis=1))


def test_an_equinox_convolution_keeps_its_channels_first_convention() -> None:
    # (N, 8, 20) reads both ways too, but an Equinox convolution takes (C, L): channels first.
    model = Signal(jax.random.key(1))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 20)).astype(np.float32))
    activations = jax.vmap(model.conv)(x)
    outputs, pullback = jax.vjp(jax.vmap(lambda a: model.out(jax.nn.relu(a).mean(axis=1))), activations)
    (gradients,) = pullback(jax.nn.one_hot(jnp.argmax(outputs, axis=1), 3))
    expected = np.asarray(jax.nn.relu((gradients.mean(axis=2, keepdims=True) * activations).sum(axis=1)))
    result = anycam.Explainer(model, "conv").explain(x)
    assert result.cam.shape == (2, 20)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)
