"""The demo CNN of ``anycam.demo.data.DEMO_ARCHITECTURE`` in Flax linen, 1-D, 2-D or 3-D.

The modules nest as torch's do, so a Flax module path is the torch path with "." → "/"
(``stage3/block/conv1``) and each stage is its own submodule whose ``__call__`` returns the
stage's final ReLU: intercepting module path ``stage1`` or ``stage3`` gives exactly torch's stage
output. Every conv pads ``((1, 1),) * d`` explicitly: Flax's ``"SAME"`` pads stride-2 convs only
on the far side and would shift the pixel grid against torch's. The BatchNorms always use their
running statistics, so ``module.apply(variables, x)`` is inference with no ``mutable`` or flags.

>>> from anycam.demo.data import load_demo
>>> demo = load_demo()
>>> module, variables = build_demo_model(demo["weights"])
>>> module.apply(variables, demo["images"][:2].transpose(0, 2, 3, 1)).shape
(2, 10)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anycam.demo.data import BN_EPS, NUM_CLASSES
from anycam.demo.weights import check_demo_weights, random_demo_weights

INPUT_LAYOUT = "channels_last"
"""The port takes ``(N, 64, 64, 1)`` batches: ``load_demo()["images"].transpose(0, 2, 3, 1)`` (``(N, *S, C)``)."""

_STATS = {"running_mean": "mean", "running_var": "var"}


def _conv(features: int, stride: int, spatial_dims: int, name: str) -> nn.Conv:
    return nn.Conv(
        features,
        kernel_size=(3,) * spatial_dims,
        strides=(stride,) * spatial_dims,
        padding=((1, 1),) * spatial_dims,
        use_bias=False,
        name=name,
    )


def _batch_norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)


class ConvBNReLU(nn.Module):
    """conv 3^d (explicit padding 1, no bias) → BatchNorm → ReLU."""

    features: int
    stride: int = 1
    spatial_dims: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.features, self.stride, self.spatial_dims, "conv")(x)
        return nn.relu(_batch_norm("bn")(x))


class ResidualBlock(nn.Module):
    """ReLU(x + BN(conv(ReLU(BN(conv(x)))))) at a constant channel count."""

    spatial_dims: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        residual = nn.relu(_batch_norm("bn1")(_conv(channels, 1, self.spatial_dims, "conv1")(x)))
        residual = _batch_norm("bn2")(_conv(channels, 1, self.spatial_dims, "conv2")(residual))
        return nn.relu(x + residual)


class DownBlock(nn.Module):
    """A stride-2 ``ConvBNReLU`` (``down``) followed by a ``ResidualBlock`` (``block``)."""

    features: int
    spatial_dims: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvBNReLU(self.features, stride=2, spatial_dims=self.spatial_dims, name="down")(x)
        return ResidualBlock(self.spatial_dims, name="block")(x)


class DemoNet(nn.Module):
    """stem → stage1 (↓2) → stage2 (residual) → stage3 (↓2 + residual) → GAP → fc, on ``(N, *S, C)``."""

    spatial_dims: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvBNReLU(16, spatial_dims=self.spatial_dims, name="stem")(x)
        x = ConvBNReLU(32, stride=2, spatial_dims=self.spatial_dims, name="stage1")(x)
        x = ResidualBlock(self.spatial_dims, name="stage2")(x)
        x = DownBlock(64, self.spatial_dims, name="stage3")(x)
        pooled = x.mean(axis=tuple(range(1, 1 + self.spatial_dims)))
        return nn.Dense(NUM_CLASSES, name="fc")(pooled)


def _variables(weights: Mapping[str, np.ndarray], spatial_dims: int) -> dict[str, Any]:
    """Returns ``{"params", "batch_stats"}`` nested by module path from checked torch-named weights."""
    # torch kernels are (O, I, *K) and Flax's (*K, I, O); a Linear's (out, in) is a Dense's (in, out).
    to_kernel = (*range(2, 2 + spatial_dims), 1, 0)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for name, array in weights.items():
        *path, field = name.split(".")
        if field in _STATS:
            collection, key = "batch_stats", _STATS[field]
        elif path == ["fc"]:
            collection, key = "params", "kernel" if field == "weight" else "bias"
            array = array.T if field == "weight" else array
        elif array.ndim > 1:
            collection, key, array = "params", "kernel", array.transpose(to_kernel)
        else:
            collection, key = "params", "scale" if field == "weight" else "bias"
        node = variables[collection]
        for part in path:
            node = node.setdefault(part, {})
        node[key] = jnp.asarray(np.ascontiguousarray(array))
    return variables


def build_demo_model(
    weights: Mapping[str, np.ndarray] | None = None, *, spatial_dims: int = 2, in_channels: int = 1
) -> tuple[DemoNet, dict[str, Any]]:
    """Returns the demo CNN as a Flax linen ``(module, variables)`` pair, with torch-named ``weights`` if given.

    Args:
        weights: name → array under the PyTorch model's ``state_dict`` names and layouts
            (``load_demo()["weights"]``, ``random_demo_weights``); conv kernels are transposed from
            ``(O, I, *K)`` to ``(*K, I, O)``, ``fc.weight`` to ``(in, out)``, and BatchNorm
            ``weight``/``bias``/``running_mean``/``running_var`` become ``scale``/``bias``/``mean``/``var``.
        spatial_dims: 1 (input ``(N, L, C)``), 2 (``(N, H, W, C)``) or 3 (``(N, D, H, W, C)``).
        in_channels: ``C``, the input channels.

    Returns:
        ``(module, variables)``: ``module.apply(variables, x)`` maps channels-last float32 ``x`` of
        any spatial size to ``(N, 10)`` logits; ``variables`` is ``{"params": ..., "batch_stats": ...}``
        (``random_demo_weights(spatial_dims, in_channels, seed=0)`` if ``weights`` is None).

    Raises:
        InputError: for a bad ``spatial_dims`` or ``in_channels``, if names are missing or unknown,
            or a shape does not fit.
    """
    if weights is None:
        # Flax's own ``module.init`` takes ~10 s on a CPU (its initialisers compile op by op); the
        # NumPy draw is instant and gives non-trivial BatchNorm statistics.
        weights = random_demo_weights(spatial_dims, in_channels, seed=0)
    checked = check_demo_weights(weights, spatial_dims, in_channels)
    return DemoNet(spatial_dims), _variables(checked, spatial_dims)
