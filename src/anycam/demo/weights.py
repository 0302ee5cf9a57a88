"""Shapes and random weights of the demo CNN (``DEMO_ARCHITECTURE``) in 1, 2 or 3 spatial dims.

Pure NumPy, so a parity suite can draw one weight dict and load it into the PyTorch, Keras and
Flax definitions of the same network. Names and layouts are torch's ``state_dict`` ones for every
``spatial_dims``: conv kernels ``(out, in, *[3] * spatial_dims)``, BatchNorm ``weight``/``bias``/
``running_mean``/``running_var`` ``(C,)``, ``fc.weight`` ``(10, 64)`` and ``fc.bias`` ``(10,)``.

>>> weights = random_demo_weights(spatial_dims=3, in_channels=2, seed=0)
>>> weights["stem.conv.weight"].shape, weights["fc.weight"].shape
((16, 2, 3, 3, 3), (10, 64))
>>> bool(min(w.min() for n, w in weights.items() if n.endswith("running_var")) > 0)
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import InputError
from .data import NUM_CLASSES

__all__ = ["SPATIAL_DIMS", "check_demo_weights", "demo_weight_shapes", "random_demo_weights"]

SPATIAL_DIMS = (1, 2, 3)
"""The demo CNN exists as a 1-D signal, a 2-D image and a 3-D volume network."""

KERNEL_SIZE = 3

_CONVS = (
    ("stem.conv", "stem.bn", None, 16),
    ("stage1.conv", "stage1.bn", 16, 32),
    ("stage2.conv1", "stage2.bn1", 32, 32),
    ("stage2.conv2", "stage2.bn2", 32, 32),
    ("stage3.down.conv", "stage3.down.bn", 32, 64),
    ("stage3.block.conv1", "stage3.block.bn1", 64, 64),
    ("stage3.block.conv2", "stage3.block.bn2", 64, 64),
)
"""(conv path, BatchNorm path, input channels (None: the network's), output channels) in call order."""

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _check_variant(spatial_dims: object, in_channels: object) -> None:
    """Raises ``InputError`` unless ``spatial_dims`` is 1, 2 or 3 and ``in_channels`` a positive int."""
    if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
        raise InputError(f"spatial_dims must be 1 (signals), 2 (images) or 3 (volumes), got {spatial_dims!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, (int, np.integer)) or in_channels < 1:
        raise InputError(f"in_channels must be a positive int, got {in_channels!r}")


def demo_weight_shapes(spatial_dims: int = 2, in_channels: int = 1) -> dict[str, tuple[int, ...]]:
    """Returns name → shape of every demo weight, in torch ``state_dict`` order and layout.

    Args:
        spatial_dims: 1, 2 or 3: the rank of the convolutions.
        in_channels: channels of the input (the stem conv's ``in``).

    Returns:
        ``{"stem.conv.weight": (16, in_channels, 3, ...), "stem.bn.weight": (16,), ..., "fc.bias": (10,)}``,
        without the BatchNorms' ``num_batches_tracked`` counters.

    Raises:
        InputError: for ``spatial_dims`` outside 1..3 or a non-positive ``in_channels``.
    """
    _check_variant(spatial_dims, in_channels)
    shapes: dict[str, tuple[int, ...]] = {}
    for conv, norm, conv_in, conv_out in _CONVS:
        shapes[f"{conv}.weight"] = (conv_out, conv_in or in_channels, *[KERNEL_SIZE] * spatial_dims)
        shapes.update({f"{norm}.{field}": (conv_out,) for field in _BN_FIELDS})
    features = _CONVS[-1][3]
    shapes["fc.weight"] = (NUM_CLASSES, features)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


def check_demo_weights(
    weights: Mapping[str, Any], spatial_dims: int = 2, in_channels: int = 1
) -> dict[str, np.ndarray]:
    """Returns ``weights`` as float32 arrays after checking their names and shapes against the variant.

    The same checks (and messages) as the PyTorch definition's ``load_state_dict`` path, so the
    Keras and Flax ports reject a bad dict the way torch does.

    Args:
        weights: name → array under torch ``state_dict`` names; ``num_batches_tracked`` entries
            are allowed and dropped.
        spatial_dims: 1, 2 or 3.
        in_channels: channels of the input.

    Returns:
        name → float32 ``np.ndarray``, in ``demo_weight_shapes`` order.

    Raises:
        InputError: if ``weights`` is not a mapping, names are missing or unknown, or a shape does not fit.
    """
    expected = demo_weight_shapes(spatial_dims, in_channels)
    if not isinstance(weights, Mapping):
        raise InputError(f"demo weights must be a mapping name → array, got {type(weights).__name__}")
    given = {name for name in weights if not str(name).endswith("num_batches_tracked")}
    missing = sorted(set(expected) - given)
    unknown = sorted(given - set(expected))
    if missing or unknown:
        raise InputError(f"demo weights do not fit: missing {missing}, unknown {unknown}")
    arrays = {}
    for name, shape in expected.items():
        array = np.asarray(weights[name], dtype=np.float32)
        if array.shape != shape:
            raise InputError(f"demo weight {name!r} has shape {array.shape}, expected {shape}")
        arrays[name] = array
    return arrays


def random_demo_weights(spatial_dims: int = 2, in_channels: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Returns a float32 weight dict for the demo CNN: He-normal kernels and plausible BatchNorm statistics.

    Kernels are ``N(0, 2 / fan_in)`` (He et al. 2015, Eq. 10) so activations keep their scale through
    the 7 convs; BatchNorm ``weight`` is in [0.5, 1.5], ``bias`` and ``running_mean`` are small, and
    ``running_var`` in [0.5, 2] (strictly positive, as a trained network's). Non-trivial statistics
    make a port that skips or mis-orders a BatchNorm field fail parity, which identity BNs would hide.

    Args:
        spatial_dims: 1, 2 or 3: the rank of the convolutions.
        in_channels: channels of the input.
        seed: seed of ``np.random.default_rng``; equal seeds give equal dicts.

    Returns:
        name → float32 array, the names and shapes of ``demo_weight_shapes(spatial_dims, in_channels)``.

    Raises:
        InputError: for ``spatial_dims`` outside 1..3 or a non-positive ``in_channels``.
    """
    shapes = demo_weight_shapes(spatial_dims, in_channels)
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        field = name.rsplit(".", 1)[1]
        if name == "fc.weight":
            array = rng.normal(0.0, np.sqrt(1.0 / shape[1]), size=shape)
        elif name == "fc.bias":
            array = rng.normal(0.0, 0.1, size=shape)
        elif len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            array = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        elif field == "weight":
            array = rng.uniform(0.5, 1.5, size=shape)
        elif field == "running_var":
            array = rng.uniform(0.5, 2.0, size=shape)
        else:
            array = rng.normal(0.0, 0.1, size=shape)
        weights[name] = array.astype(np.float32)
    return weights
