"""An array-API-shaped namespace over TensorFlow ops, so the NumPy core computes on TF tensors where they live.

array-api-compat covers NumPy, torch, JAX, CuPy and Dask, not TensorFlow. This module is the
small part of the Python array API standard that ``anycam.core`` calls (and nothing more), each
function a thin wrapper over the TF op of the same meaning. Importing it registers it with
``anycam.core._namespace`` for ``tf.Tensor``: from then on ``core.namespace(tf_tensor)`` answers
this module, and ``core.layer_cam`` / ``core.heatmaps`` / ``core.check_finite`` run on TF tensors
(eager or inside a ``tf.function``) without a copy to NumPy. The core itself never imports TF:
the TensorFlow backend imports this module when it loads.

Why a namespace rather than ``tf.experimental.numpy``: TF's NumPy API follows NumPy's names and
promotion rules (``swapaxes``, ``linalg.svd`` returning ``(s, u, v)`` unchanged…), not the array
API's, and changes between releases; a few dozen explicit wrappers are easy to read and test.

Deviations from the standard, all outside what the core relies on: ``max``/``min`` follow
``tf.reduce_max`` (NaN handling is the kernel's; the core checks finiteness before reducing);
``argmax`` is not provided (TF does not promise the first of tied maxima).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import tensorflow as tf

from anycam.core import _namespace

__all__ = ["register"]

float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64
# The standard's names, shadowing builtins inside this module only (annotations use builtins.bool).
int8, int32, int64, bool = tf.int8, tf.int32, tf.int64, tf.bool

_LOG2 = float(np.log(2.0))


def _axes(axis: int | Sequence[int] | None) -> Any:
    return list(axis) if isinstance(axis, tuple | list) else axis


def device(x: tf.Tensor) -> str:
    """Returns the tensor's device name ('' for a graph tensor not yet placed)."""
    return str(getattr(x, "device", "") or "")


def is_concrete(x: tf.Tensor) -> builtins.bool:
    """Whether ``x`` holds values (an eager tensor), not a symbolic tensor of a ``tf.function`` graph."""
    return not tf.is_symbolic_tensor(x)


def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> tf.Tensor:
    """Returns ``obj`` as a tensor of ``dtype``, made on ``device`` (host values are copied there once)."""
    del copy  # TF tensors are immutable: a copy and a view cannot be told apart
    if isinstance(obj, tf.Tensor):
        return obj if dtype is None or obj.dtype == dtype else tf.cast(obj, dtype)
    values = np.asarray(obj, dtype=None if dtype is None else tf.as_dtype(dtype).as_numpy_dtype)
    with tf.device(device or None):
        return tf.constant(values)


def astype(x: tf.Tensor, dtype: Any, /, *, copy: builtins.bool = True) -> tf.Tensor:
    """Returns ``x`` cast to ``dtype``."""
    return x if x.dtype == dtype else tf.cast(x, dtype)


def arange(stop: int, /, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """Returns 0, 1, …, stop − 1 (int64 unless ``dtype``)."""
    with tf.device(device or None):
        return tf.range(stop, dtype=dtype or tf.int64)


def full_like(x: tf.Tensor, fill_value: float, /) -> tf.Tensor:
    """Returns a tensor of ``x``'s shape and dtype filled with ``fill_value``."""
    return tf.fill(tf.shape(x), tf.cast(fill_value, x.dtype))


def ones_like(x: tf.Tensor, /) -> tf.Tensor:
    """Returns ones of ``x``'s shape and dtype."""
    return tf.ones_like(x)


def reshape(x: tf.Tensor, shape: Sequence[int], /) -> tf.Tensor:
    """Returns ``x`` reshaped (C order, one ``-1`` allowed)."""
    return tf.reshape(x, [int(d) for d in shape])


def permute_dims(x: tf.Tensor, axes: Sequence[int], /) -> tf.Tensor:
    """Returns ``x`` with its axes permuted."""
    return tf.transpose(x, perm=list(axes))


def moveaxis(x: tf.Tensor, source: int, destination: int, /) -> tf.Tensor:
    """Returns ``x`` with axis ``source`` moved to position ``destination``."""
    order = list(range(x.shape.rank))
    order.insert(destination % len(order), order.pop(source % len(order)))
    return tf.transpose(x, perm=order)


def squeeze(x: tf.Tensor, /, axis: int | tuple[int, ...]) -> tf.Tensor:
    """Returns ``x`` without the given size-1 axes."""
    return tf.squeeze(x, axis=_axes(axis))


def broadcast_to(x: tf.Tensor, shape: Sequence[int], /) -> tf.Tensor:
    """Returns ``x`` broadcast to ``shape``."""
    return tf.broadcast_to(x, [int(d) for d in shape])


def stack(arrays: Sequence[tf.Tensor], /, *, axis: int = 0) -> tf.Tensor:
    """Returns the tensors stacked along a new axis."""
    return tf.stack(list(arrays), axis=axis)


def concat(arrays: Sequence[tf.Tensor], /, *, axis: int = 0) -> tf.Tensor:
    """Returns the tensors joined along an existing axis."""
    return tf.concat(list(arrays), axis=axis)


def take(x: tf.Tensor, indices: tf.Tensor, /, *, axis: int | None = None) -> tf.Tensor:
    """``x`` at the integer ``indices`` along ``axis`` (flattened when None), as ``xp.take``."""
    if axis is None:
        return tf.gather(tf.reshape(x, [-1]), indices)
    return tf.gather(x, indices, axis=axis)


def expand_dims(x: tf.Tensor, /, *, axis: int = 0) -> tf.Tensor:
    """``x`` with a new axis of size 1 at ``axis``."""
    return tf.expand_dims(x, axis)


def where(condition: tf.Tensor, x1: tf.Tensor, x2: tf.Tensor, /) -> tf.Tensor:
    """Returns ``x1`` where ``condition`` holds, else ``x2`` (broadcasting)."""
    return tf.where(condition, x1, x2)


def clip(x: tf.Tensor, /, min: float, max: float) -> tf.Tensor:
    """Returns ``x`` clipped to [min, max]."""
    return tf.clip_by_value(x, tf.cast(min, x.dtype), tf.cast(max, x.dtype))


def matmul(x1: tf.Tensor, x2: tf.Tensor, /) -> tf.Tensor:
    """Returns the (batched, broadcasting) matrix product."""
    return tf.linalg.matmul(x1, x2)


def maximum(x1: tf.Tensor, x2: tf.Tensor, /) -> tf.Tensor:
    """Returns the element-wise maximum; NaN in ``x1`` stays NaN (as NumPy's ``maximum``)."""
    # tf.maximum's NaN handling differs between kernels: NaN is put back explicitly.
    return tf.where(tf.math.is_nan(x1), x1, tf.maximum(x1, x2))


def sum(x: tf.Tensor, /, *, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:
    """Returns the sum over ``axis``."""
    return tf.reduce_sum(x, axis=_axes(axis), keepdims=keepdims)


def mean(x: tf.Tensor, /, *, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:
    """Returns the mean over ``axis``."""
    return tf.reduce_mean(x, axis=_axes(axis), keepdims=keepdims)


def max(x: tf.Tensor, /, *, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:
    """Returns the maximum over ``axis``."""
    return tf.reduce_max(x, axis=_axes(axis), keepdims=keepdims)


def min(x: tf.Tensor, /, *, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:
    """Returns the minimum over ``axis``."""
    return tf.reduce_min(x, axis=_axes(axis), keepdims=keepdims)


def all(x: tf.Tensor, /, *, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:
    """Returns whether every element over ``axis`` is true."""
    return tf.reduce_all(tf.cast(x, tf.bool), axis=_axes(axis), keepdims=keepdims)


def any(x: tf.Tensor, /, *, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:
    """Returns whether some element over ``axis`` is true."""
    return tf.reduce_any(tf.cast(x, tf.bool), axis=_axes(axis), keepdims=keepdims)


def abs(x: tf.Tensor, /) -> tf.Tensor:
    """Returns |x|."""
    return tf.abs(x)


def floor(x: tf.Tensor, /) -> tf.Tensor:
    """Returns ⌊x⌋."""
    return tf.floor(x)


def log2(x: tf.Tensor, /) -> tf.Tensor:
    """Returns log₂ x (rounded: the core only needs it to pick a power of two)."""
    return tf.math.log(x) / tf.cast(_LOG2, x.dtype)


def sqrt(x: tf.Tensor, /) -> tf.Tensor:
    """Returns √x."""
    return tf.sqrt(x)


def tanh(x: tf.Tensor, /) -> tf.Tensor:
    """Returns tanh x."""
    return tf.tanh(x)


def isfinite(x: tf.Tensor, /) -> tf.Tensor:
    """Returns whether each element is finite."""
    return tf.math.is_finite(x)


def isnan(x: tf.Tensor, /) -> tf.Tensor:
    """Returns whether each element is NaN."""
    return tf.math.is_nan(x)


def _svd(x: tf.Tensor, /, *, full_matrices: builtins.bool = True) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    # The standard's order and Vᴴ; tf.linalg.svd returns (s, u, v).
    s, u, v = tf.linalg.svd(x, full_matrices=full_matrices)
    return u, s, tf.linalg.matrix_transpose(v)


def _eigh(x: tf.Tensor, /) -> tuple[tf.Tensor, tf.Tensor]:
    # Eigenvalues ascending, eigenvectors as columns: as the standard.
    values, vectors = tf.linalg.eigh(x)
    return values, vectors


linalg = SimpleNamespace(svd=_svd, eigh=_eigh)


def register() -> None:
    """Makes ``anycam.core`` compute on ``tf.Tensor`` with this namespace (idempotent)."""
    import sys

    _namespace.register(tf.Tensor, sys.modules[__name__])


register()
