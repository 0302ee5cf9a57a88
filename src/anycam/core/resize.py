"""Resizing maps to the input's resolution: separable linear (half-pixel centres) and nearest.

Linear resizing here equals ``torch.nn.functional.interpolate(..., align_corners=False)``,
OpenCV's ``INTER_LINEAR``, ``jax.image.resize(..., "linear")`` when upsampling and
``tf.image.resize(..., antialias=False)``: output pixel i samples the input at
``(i + 0.5) · in/out − 0.5``, clamped to the edge. Every output is a convex combination of
inputs, so the result never leaves the input's range. Each axis is one small matrix product,
so any number of axes and any sizes (up or down, non-square) cost the same code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError
from ._namespace import compute_dtype, device_of, is_concrete, namespace

RESIZE_MODES = ("linear", "nearest")


@lru_cache(maxsize=64)
def interpolation_matrix(size_in: int, size_out: int, mode: str = "linear") -> np.ndarray:
    """Returns the ``(size_out, size_in)`` matrix that resizes one axis.

    ``"nearest"`` follows PyTorch's default ``mode="nearest"`` (index ``floor(i · in/out)``),
    which is also what Captum's ``LayerAttribution.interpolate`` uses by default. The index is
    computed in integers: in floating point ``i · (in/out)`` can round just below an integer
    (11 · (30/22) = 14.999…), picking the wrong pixel where PyTorch picks the right one.

    >>> interpolation_matrix(2, 4)
    array([[1.  , 0.  ],
           [0.75, 0.25],
           [0.25, 0.75],
           [0.  , 1.  ]])
    """
    if size_in < 1 or size_out < 1:
        raise InputError(f"sizes must be positive, got {size_in} -> {size_out}")
    scale = size_in / size_out
    rows = np.arange(size_out)
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    if mode == "nearest":
        matrix[rows, np.minimum(rows * size_in // size_out, size_in - 1)] = 1.0
    elif mode == "linear":
        source = np.maximum((rows + 0.5) * scale - 0.5, 0.0)
        lower = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        upper = np.minimum(lower + 1, size_in - 1)
        upper_weight = source - lower
        np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
        np.add.at(matrix, (rows, upper), upper_weight)
    else:
        raise ConfigError(f"unknown resize mode {mode!r}; choose 'linear' or 'nearest'")
    matrix.flags.writeable = False
    return matrix


# Device copies of the matrices, keyed by everything they depend on: (namespace, sizes, mode,
# dtype, device). A few kB each; least recently used dropped beyond the limit.
_DEVICE_MATRICES: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_DEVICE_MATRICES_LIMIT = 64


def device_matrix(xp: Any, size_in: int, size_out: int, mode: str, dtype: Any, device: Any) -> Any:
    """Returns :func:`interpolation_matrix` transposed, ``(size_in, size_out)``, in ``xp`` on ``device``, cached.

    Built once per (namespace, sizes, mode, dtype, device) on the host and copied over; later
    calls reuse the device copy (no host-to-device copy per call). Arrays that are not concrete
    (made while ``jax.jit`` traces or inside a ``tf.function`` graph) are never cached: they
    live only in their trace.
    """
    key: tuple[Any, ...] | None = (xp, size_in, size_out, mode, dtype, device)
    try:
        cached = _DEVICE_MATRICES.get(key)  # type: ignore[arg-type]
    except TypeError:  # a namespace with unhashable devices or dtypes: no cache
        key, cached = None, None
    if key is not None and cached is not None:
        _DEVICE_MATRICES.move_to_end(key)
        return cached
    # A writable copy: torch warns on read-only NumPy memory (the host cache's matrices are frozen).
    matrix = xp.asarray(np.array(interpolation_matrix(size_in, size_out, mode).T), dtype=dtype, device=device)
    if key is not None and is_concrete(matrix):
        _DEVICE_MATRICES[key] = matrix
        if len(_DEVICE_MATRICES) > _DEVICE_MATRICES_LIMIT:
            _DEVICE_MATRICES.popitem(last=False)
    return matrix


def resize(array: np.ndarray, size: Sequence[int], mode: str = "linear") -> np.ndarray:
    """Returns ``array`` with its last ``len(size)`` axes resized to ``size``.

    Args:
        array: ``(..., *S_in)``.
        size: the output spatial shape ``S_out``, one entry per trailing axis.
        mode: ``"linear"`` or ``"nearest"``.

    Returns:
        ``(..., *size)`` float64 for NumPy input; an array of the input's namespace and device,
        float32 (float64 for float64 input), otherwise.

    Raises:
        ValueError: if ``size`` has more entries than ``array`` has axes, or the mode is unknown.

    >>> resize(np.array([[0.0, 1.0]]), (1, 4))
    array([[0.  , 0.25, 0.75, 1.  ]])
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode {mode!r}; choose 'linear' or 'nearest'")
    size = tuple(int(s) for s in size)
    if len(size) > array.ndim:
        raise InputError(f"cannot resize an array of shape {array.shape} to {size}")
    xp = namespace(array)
    dtype = compute_dtype(xp, array)
    out = np.asarray(array, dtype=np.float64) if xp is np else xp.astype(array, dtype)
    first = array.ndim - len(size)
    for axis, target in enumerate(size, start=first):
        if out.shape[axis] == target:
            continue
        if xp is np:
            transposed = interpolation_matrix(out.shape[axis], target, mode).T
        else:
            transposed = device_matrix(xp, int(out.shape[axis]), target, mode, dtype, device_of(out))
        moved = xp.moveaxis(out, axis, -1)
        out = xp.moveaxis(moved @ transposed, -1, axis)
    return out
