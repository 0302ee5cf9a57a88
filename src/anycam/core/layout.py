"""Layouts: bringing a layer's output into the core's ``(..., C, *S)`` form.

Frameworks disagree on where the channel axis lives (PyTorch and Equinox first, Keras and Flax
last), and transformers emit tokens ``(N, T, C)`` with class-token prefixes. The core only ever
sees an explicit channel axis, so every layout is converted here, once, in NumPy.
"""

from __future__ import annotations

import math

import numpy as np

from .._errors import ConfigError, InputError

LAYOUTS = ("channels_first", "channels_last", "tokens")


def canonical_layout(layout: str) -> str:
    """Returns ``"channels_first"``, ``"channels_last"`` or ``"tokens"`` for a layout spelling.

    ``"NCHW"``-style strings (``"NCL"``, ``"NCDHW"``) mean channels first; ``"NHWC"``-style strings
    (``"NLC"``, ``"NDHWC"``) channels last.

    Raises:
        ConfigError: for an unknown spelling (also a ``ValueError``).
    """
    if layout in LAYOUTS:
        return layout
    upper = layout.upper() if isinstance(layout, str) else ""
    if len(upper) >= 3 and upper.startswith("NC") and upper.isalpha():
        return "channels_first"
    if len(upper) >= 3 and upper.startswith("N") and upper.endswith("C") and upper.isalpha():
        return "channels_last"
    raise ConfigError(
        f"unknown layout {layout!r}; use 'channels_first' (NCHW), 'channels_last' (NHWC) or 'tokens' (N, T, C)"
    )


def token_grid(tokens: int, grid: tuple[int, ...] | None = None) -> tuple[int, tuple[int, ...]]:
    """Returns ``(prefix, grid)`` for a token sequence of length ``tokens``.

    With no ``grid`` given, the grid is the largest square that leaves at most 8 prefix tokens
    (class and register tokens precede the patches in ViT-style models).

    Raises:
        InputError: if no square grid fits, or ``grid`` needs more tokens than there are.
    """
    if grid is not None:
        patches = math.prod(grid)
        if patches > tokens:
            raise InputError(f"token_grid {grid} needs {patches} tokens, the layer has {tokens}")
        return tokens - patches, tuple(int(g) for g in grid)
    for prefix in range(0, min(tokens, 9)):
        side = math.isqrt(tokens - prefix)
        if side > 0 and side * side == tokens - prefix:
            return prefix, (side, side)
    raise InputError(f"cannot infer a square patch grid from {tokens} tokens; pass token_grid=(rows, cols)")


def to_channels_first(
    array: np.ndarray,
    layout: str,
    *,
    lead: int = 1,
    grid: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Returns ``array`` with the channel axis right after its ``lead`` batch-like axes.

    Args:
        array: ``(*lead, C, *S)``, ``(*lead, *S, C)`` or tokens ``(*lead, T, C)``.
        layout: see :func:`canonical_layout`.
        lead: how many leading axes are batch-like (1 for ``(N, ...)``, 2 for ``(N, K, ...)``).
        grid: the patch grid of a token layout; inferred when square.

    Returns:
        ``(*lead, C, *S)``; a view where no copy is needed.

    Raises:
        InputError: if the array has no spatial axis in that layout.
    """
    layout = canonical_layout(layout)
    if array.ndim < lead + 2:
        raise InputError(
            f"layer output of shape {array.shape[lead:]} (per sample) has no spatial axis; "
            "Grad-CAM needs a convolutional feature map (C, *spatial) or tokens (T, C)"
        )
    if layout == "channels_first":
        return array
    if layout == "channels_last":
        return np.moveaxis(array, -1, lead)
    if array.ndim != lead + 2:
        raise InputError(f"a token layout needs (N, T, C) outputs, got {array.shape}")
    prefix, patch_grid = token_grid(array.shape[lead], grid)
    patches = array[(slice(None),) * lead + (slice(prefix, None),)]
    patches = patches.reshape(*array.shape[:lead], *patch_grid, array.shape[-1])
    return np.moveaxis(patches, -1, lead)


def spatial_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Returns the spatial part of an input of ``shape`` ``(N, ...)`` in ``layout``.

    Raises:
        InputError: if the input has no spatial axis.
    """
    layout = canonical_layout(layout)
    if len(shape) < 3:
        raise InputError(
            f"input of shape {tuple(shape)} has no spatial axis; expected (N, C, *spatial) or (N, *spatial, C)"
        )
    if layout == "channels_first":
        return tuple(shape[2:])
    if layout == "channels_last":
        return tuple(shape[1:-1])
    raise InputError("inputs cannot be in a token layout; pass input_layout='channels_first' or 'channels_last'")
