"""A model's own failures keep their type; anycam's tap is transparent; misfit inputs are InputErrors.

Issue 19, items 4, 12 and 15: only a failure that the input's shape explains is reported as the
user's input error; a model's own exception (or one raised through anycam's wrapper of an
explained Equinox module) propagates with its own type; an explained Equinox module keeps its
other methods and fields for the model that calls them.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from anycam import core

pytestmark = pytest.mark.jax

RNG = np.random.default_rng(19)


def images(batch: int = 2, channels_last: bool = False) -> jax.Array:
    shape = (batch, 8, 8, 3) if channels_last else (batch, 3, 8, 8)
    return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


# -- 19.15: a model's own exception keeps its type --------------------------------------------


class Raising(eqx.Module):
    """An Equinox model that raises ``error`` after its convolution (the explained layer)."""

    conv: eqx.nn.Conv2d
    error: type[Exception] = eqx.field(static=True)

    def __init__(self, error: type[Exception]) -> None:
        self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=jax.random.key(0))
        self.error = error

    def __call__(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        a = self.conv(x)
        if a.ndim:  # always: the model's own check
            raise self.error("boom")
        return a.mean(axis=(1, 2))


class LinenRaising(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(4, (3, 3), name="conv")(x)
        raise RuntimeError("boom")


@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_a_models_own_exception_keeps_its_type(method: str, error: type[Exception]) -> None:
    explainer = anycam.Explainer(Raising(error), "conv", method=method)
    with pytest.raises(error, match="boom") as info:
        explainer.explain(images(), target=0)
    assert not isinstance(info.value, anycam.AnycamError)


def test_a_linen_models_own_exception_keeps_its_type() -> None:
    model = LinenRaising()
    variables = {"params": {"conv": {"kernel": jnp.ones((3, 3, 3, 4)), "bias": jnp.zeros(4)}}}
    with pytest.raises(RuntimeError, match="boom") as info:
        anycam.Explainer((model, variables), "conv")(images(channels_last=True), target=0)
    assert not isinstance(info.value, anycam.AnycamError)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_a_models_own_exception_with_several_inputs_keeps_its_type(form: str) -> None:
    x, scale = images(), jnp.ones((2, 4))
    inputs = (x, scale) if form == "tuple" else {"x": x, "scale": scale}
    with pytest.raises(RuntimeError, match="boom") as info:
        anycam.Explainer(Raising(RuntimeError), "conv")(inputs, target=0)
    assert not isinstance(info.value, anycam.AnycamError)
    # The note names what the model was given.
    assert any("raised by the model on the inputs" in note for note in getattr(info.value, "__notes__", []))


class Small(eqx.Module):
    conv: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self) -> None:
        k1, k2 = jax.random.split(jax.random.key(1))
        self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
        self.fc = eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        a = jax.nn.relu(self.conv(x))
        if scale is not None:
            a = a * scale[:, None, None]
        return self.fc(a.mean(axis=(1, 2)))


def test_a_wrong_shape_input_is_still_an_input_error() -> None:
    explainer = anycam.Explainer(Small(), "conv")
    with pytest.raises(anycam.InputError, match="shape"):
        explainer(images(channels_last=True), target=0)  # (N, 8, 8, 3) where (N, 3, 8, 8) is expected
    with pytest.raises(anycam.InputError, match="does not accept the inputs"):
        explainer((images(), jnp.ones((2, 5))), target=0)  # the scale of 5 does not fit 4 channels


# -- 19.4: several inputs must share the batch size -------------------------------------------


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_several_inputs_with_different_batch_sizes_are_an_input_error(form: str) -> None:
    # One image, three rows of the second input: an InputError naming each input and its N.
    x, scale = images(1), jnp.ones((3, 4))
    inputs = (x, scale) if form == "tuple" else {"x": x, "scale": scale}
    for method in ("gradcam", "scorecam", "ablationcam"):
        with pytest.raises(anycam.InputError, match="batch") as info:
            anycam.Explainer(Small(), "conv", method=method)(inputs, target=0)
        message = str(info.value)
        first, second = ("0", "1") if form == "tuple" else ("x", "scale")
        assert first in message and second in message and "1" in message and "3" in message, message


# -- 19.12: the tap of an explained Equinox module is transparent --------------------------------


class Block(eqx.Module):
    """A block with methods beside ``__call__`` and a field a model reads."""

    conv: eqx.nn.Conv2d
    proj: eqx.nn.Linear
    index: int = eqx.field(static=True)  # a name anycam's own wrapper must not shadow

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
        self.proj = eqx.nn.Linear(4, 3, key=k2)
        self.index = 7

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))

    def logits(self, x: jax.Array) -> jax.Array:
        """Runs the block (through ``self``) and projects its pooled output."""
        return self.proj(self(x).mean(axis=(1, 2)))

    def encode(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


class CallsLogits(eqx.Module):
    """``__call__`` calls the block's other method, which calls the block itself."""

    block: Block

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block.logits(x) * (self.block.index / 7)


class CallsEncode(eqx.Module):
    """``__call__`` calls ``block.encode``, which runs the explained ``block.conv``."""

    block: Block

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block.proj(self.block.encode(x).mean(axis=(1, 2)))


def _gradcam(features, head, x: jax.Array) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Grad-CAM of the argmax class from plain jax.vjp (channels first, one sample at a time)."""
    activations = jax.vmap(features)(x)
    outputs, pullback = jax.vjp(jax.vmap(head), activations)
    (gradients,) = pullback(jax.nn.one_hot(jnp.argmax(outputs, axis=1), outputs.shape[1]))
    alpha = gradients.mean(axis=(2, 3), keepdims=True)
    return np.asarray(jax.nn.relu((alpha * activations).sum(axis=1)))


@pytest.mark.parametrize(
    ("model_type", "layer"),
    [(CallsLogits, "block"), (CallsEncode, "block.conv")],
    ids=["layer_is_the_block", "layer_inside_the_block"],
)
def test_an_explained_equinox_module_keeps_its_other_methods_and_fields(model_type: type, layer: str) -> None:
    model = model_type(Block(jax.random.key(3)))
    x = images()
    if layer == "block":
        expected = _gradcam(model.block, lambda a: model.block.proj(a.mean(axis=(1, 2))), x)
    else:
        expected = _gradcam(model.block.conv, lambda a: model.block.proj(jax.nn.relu(a).mean(axis=(1, 2))), x)
    result = anycam.Explainer(model, layer).explain(x)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)


class MissingMethod(eqx.Module):
    block: Block

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block.decode(x)  # type: ignore[attr-defined]


def test_a_missing_method_on_an_explained_module_is_the_models_attribute_error() -> None:
    model = MissingMethod(Block(jax.random.key(3)))
    with pytest.raises(AttributeError, match="decode") as info:
        anycam.Explainer(model, "block")(images(), target=0)
    assert not isinstance(info.value, anycam.AnycamError)
    assert "Tap" not in str(info.value)
