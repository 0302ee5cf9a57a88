"""ResNet-style networks in Flax linen and Equinox against a Grad-CAM written with ``jax.vjp``.

Small real architectures (basic residual blocks, an identity and two strided projection shortcuts, BatchNorm in
inference mode for Flax, GroupNorm for Equinox), 32 × 32 inputs, batch 2. The reference splits
each network by hand at its last block (``method=`` of the linen module; the Equinox pytree
called piece by piece), differentiates the head with ``jax.vjp`` and computes Grad-CAM in
``jnp``: nothing of anycam (no interception, no core) is involved.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from tests.contract.kit_jax import numpy_fill, numpy_init

pytestmark = pytest.mark.jax

CLASSES = 10


def gradcam_reference(features, head, x, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Raw Grad-CAM ReLU(Σ_k α_k A_k) of head(features(x)) for each sample's argmax class."""
    activations = features(x)
    outputs, pullback = jax.vjp(head, activations)
    classes = jnp.argmax(outputs, axis=1)
    (gradients,) = pullback(jax.nn.one_hot(classes, outputs.shape[1], dtype=outputs.dtype))
    spatial = tuple(a for a in range(1, activations.ndim) if a != channel_axis % activations.ndim)
    alpha = jnp.mean(gradients, axis=spatial, keepdims=True)
    cam = jax.nn.relu(jnp.sum(alpha * activations, axis=channel_axis))
    return np.asarray(cam), np.asarray(classes)


def assert_raw_map(result: anycam.Explanation, expected: np.ndarray, classes: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    assert scale > 0, "a dead reference map checks nothing"
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)
    np.testing.assert_array_equal(result.target, classes)


# -- Flax linen ----------------------------------------------------------------------------------


class Block(nn.Module):
    features: int
    strides: int = 1

    def setup(self) -> None:
        self.conv1 = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False)
        self.bn1 = nn.BatchNorm(use_running_average=True)
        self.conv2 = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)
        self.bn2 = nn.BatchNorm(use_running_average=True)
        if self.strides != 1:
            self.shortcut = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)
            self.shortcut_bn = nn.BatchNorm(use_running_average=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = self.shortcut_bn(self.shortcut(x)) if self.strides != 1 else x
        return nn.relu(y + skip)


class ResNet(nn.Module):
    widths: Sequence[int] = (8, 16, 32)

    def setup(self) -> None:
        self.stem = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False)
        self.stem_bn = nn.BatchNorm(use_running_average=True)
        # Stage 1 keeps its resolution with an identity shortcut; the others downsample.
        blocks = [Block(width, 1 if stage == 0 else 2) for stage, width in enumerate(self.widths)]
        self.blocks = blocks
        self.fc = nn.Dense(CLASSES)

    def features(self, x: jax.Array) -> jax.Array:
        x = nn.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(x, axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def test_flax_resnet_last_block_matches_a_hand_split_vjp() -> None:
    module = ResNet()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32))
    # Drawn with NumPy (running statistics away from 0 and 1 included): compiling Flax's random
    # initialisers takes longer than the test.
    variables = numpy_init(module, x[:1], np.random.default_rng(0))

    @jax.jit
    def features(images: jax.Array) -> jax.Array:
        return module.apply(variables, images, method=ResNet.features)

    @jax.jit
    def head(activations: jax.Array) -> jax.Array:
        return module.apply(variables, activations, method=ResNet.head)

    expected, classes = gradcam_reference(features, head, x, channel_axis=-1)
    result = anycam.Explainer((module, variables), "blocks_2").explain(x)
    assert result.cam.shape == (2, 8, 8)
    assert_raw_map(result, expected, classes)


# -- Equinox -------------------------------------------------------------------------------------


class EqxBlock(eqx.Module):
    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    shortcut: eqx.nn.Conv2d | None

    def __init__(self, channels_in: int, channels: int, stride: int, key: jax.Array) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(channels_in, channels, 3, stride, padding=1, use_bias=False, key=k1)
        self.norm1 = eqx.nn.GroupNorm(4, channels)
        self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = eqx.nn.GroupNorm(4, channels)
        projected = stride != 1 or channels_in != channels
        self.shortcut = eqx.nn.Conv2d(channels_in, channels, 1, stride, use_bias=False, key=k3) if projected else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class EqxResNet(eqx.Module):
    stem: eqx.nn.Conv2d
    blocks: list[EqxBlock]
    fc: eqx.nn.Linear

    def __init__(self, key: jax.Array, widths: Sequence[int] = (8, 16, 32)) -> None:
        keys = jax.random.split(key, len(widths) + 2)
        self.stem = eqx.nn.Conv2d(3, widths[0], 3, padding=1, key=keys[0])
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            blocks.append(EqxBlock(channels, width, 1 if stage == 0 else 2, keys[1 + stage]))
            channels = width
        self.blocks = blocks
        self.fc = eqx.nn.Linear(widths[-1], CLASSES, key=keys[-1])

    def features(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(x, axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def test_equinox_resnet_last_block_matches_a_hand_split_vjp() -> None:
    model = numpy_fill(eqx.filter_eval_shape(EqxResNet, jax.random.key(2)), np.random.default_rng(2))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 32, 32)).astype(np.float32))
    # Equinox layers take one sample: the reference vmaps the two halves over the batch.
    features, head = jax.jit(jax.vmap(model.features)), jax.jit(jax.vmap(model.head))
    expected, classes = gradcam_reference(features, head, x, channel_axis=1)
    result = anycam.Explainer(model, "blocks.2").explain(x)
    assert result.cam.shape == (2, 8, 8)
    assert_raw_map(result, expected, classes)


def test_auto_picks_the_last_block_in_flax_and_equinox() -> None:
    module = ResNet()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32))
    variables = numpy_init(module, x[:1], np.random.default_rng(0))
    explainer = anycam.Explainer((module, variables), "auto")
    assert explainer.layer_names == () and "chosen at the first call" in repr(explainer)
    chosen = explainer.explain(x)
    # The last block's output is the last 2-D map; fc sees the pooled vector.
    assert explainer.layer_names == ("blocks_2",)
    np.testing.assert_array_equal(chosen.cam, anycam.Explainer((module, variables), "blocks_2").explain(x).cam)

    model = numpy_fill(eqx.filter_eval_shape(EqxResNet, jax.random.key(2)), np.random.default_rng(2))
    explainer = anycam.Explainer(model, None)
    explainer.explain(jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 32, 32)).astype(np.float32)))
    assert explainer.layer_names == ("blocks.2",)
