"""Target specifications: which output(s) of the model each map explains.

A target is parsed once into a :class:`TargetSpec`; backends resolve it against the model
output of a batch (``resolve_indices``) or call its function on the framework tensor.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import TargetError


@dataclass(frozen=True)
class TopK:
    """The ``k`` highest-scoring classes of each sample, best first (``anycam.top_k(k)``)."""

    k: int


def top_k(k: int) -> TopK:
    """Returns a target meaning "one map for each of the k best classes of every sample".

    Raises:
        TargetError: if ``k`` is not a positive integer.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise TargetError(f"top_k needs a positive integer, got {k!r}")
    return TopK(int(k))


@dataclass(frozen=True)
class TargetSpec:
    """A parsed target.

    kind is one of ``"argmax"``, ``"index"`` (one class for the whole batch), ``"indices"``
    (``(N,)`` or ``(N, K)`` class indices), ``"topk"`` or ``"callable"``. ``squeeze`` says whether
    the K axis is dropped from the results (one map per sample).
    """

    kind: str
    squeeze: bool
    indices: np.ndarray | None = None
    k: int = 1
    fn: Callable[[Any], Any] | None = None


def parse_target(target: Any) -> TargetSpec:
    """Turns any accepted target form into a :class:`TargetSpec`.

    Accepted: ``None`` (argmax per sample), an ``int`` (same class for every sample), a sequence
    or array of N ints, an ``(N, K)`` int array (K maps per sample), ``top_k(k)``, or a callable
    mapping the model output to ``(N,)`` or ``(N, K)`` scores.

    Raises:
        TargetError: for anything else (floats, negative classes, 3-D arrays, ...).
    """
    if target is None:
        return TargetSpec("argmax", squeeze=True)
    if isinstance(target, TopK):
        return TargetSpec("topk", squeeze=False, k=target.k)
    if callable(target):
        return TargetSpec("callable", squeeze=True, fn=target)
    if isinstance(target, bool):
        raise TargetError(f"target must be a class index, got the bool {target!r}")
    if isinstance(target, numbers.Integral):
        if int(target) < 0:
            raise TargetError(f"target class must be >= 0, got {target}")
        if int(target) >= 2**63:
            raise TargetError(f"target class {target} is too large to be a class index")
        return TargetSpec("index", squeeze=True, indices=np.array([[int(target)]], dtype=np.int64))
    try:
        array = np.asarray(target)
    except Exception as exc:
        raise TargetError(f"unsupported target {target!r}") from exc
    integral_floats = (
        array.size > 0
        and np.issubdtype(array.dtype, np.floating)
        and bool(np.all(np.isfinite(array)))
        and bool(np.all(array == np.round(array)))
    )
    if array.dtype == object or array.size == 0 or not (np.issubdtype(array.dtype, np.integer) or integral_floats):
        raise TargetError(
            f"target must hold integer class indices, got dtype {array.dtype} "
            f"and shape {array.shape}; use None, an int, N ints, an (N, K) array, "
            "anycam.top_k(k) or a callable"
        )
    if array.ndim not in (1, 2):
        raise TargetError(f"target array must be (N,) or (N, K), got shape {array.shape}")
    if np.any(array < 0):
        raise TargetError(f"target classes must be >= 0, got {array.min()}")
    # Checked before the cast: uint64 2**63 or a float 1e30 would wrap to a negative index.
    if np.any(array >= 2**63):
        raise TargetError(f"target class {array.max()} is too large to be a class index")
    squeeze = array.ndim == 1
    return TargetSpec("indices", squeeze=squeeze, indices=array.reshape(array.shape[0], -1).astype(np.int64))


def resolve_indices(spec: TargetSpec, outputs: np.ndarray) -> np.ndarray:
    """Returns the ``(N, K)`` int64 class indices that ``spec`` selects from ``outputs`` ``(N, classes)``.

    Raises:
        TargetError: if the output is not ``(N, classes)``, a class is out of range, or the
            number of targets does not match the batch.
    """
    if spec.kind == "callable":
        raise TargetError("callable targets have no class indices")
    if outputs.ndim != 2:
        raise TargetError(
            f"class-index targets need a model output of shape (N, classes), got {outputs.shape}; "
            "select the output with output=..., or pass a callable target that maps the output "
            "to (N,) scores"
        )
    batch, classes = outputs.shape
    if spec.kind == "argmax":
        return np.argmax(outputs, axis=1).astype(np.int64)[:, None]
    if spec.kind == "topk":
        if spec.k > classes:
            raise TargetError(f"top_k({spec.k}) asks for more classes than the model has ({classes})")
        # A stable sort of the negated scores keeps ties in class order.
        return np.argsort(-outputs, axis=1, kind="stable")[:, : spec.k].astype(np.int64)
    assert spec.indices is not None
    indices = spec.indices
    if spec.kind == "index":
        indices = np.broadcast_to(indices, (batch, 1))
    elif indices.shape[0] != batch:
        raise TargetError(
            f"got {indices.shape[0]} targets for a batch of {batch}; pass one per sample, "
            "or a single int for the whole batch"
        )
    if indices.max() >= classes:
        raise TargetError(f"target class {int(indices.max())} is out of range: the model has {classes} outputs")
    return np.array(indices, dtype=np.int64)  # a fresh, writable copy


def one_hot(indices: np.ndarray, classes: int, dtype: Any = np.float32) -> np.ndarray:
    """Returns ``(K, N, classes)`` one-hot cotangents for ``(N, K)`` indices."""
    batch, count = indices.shape
    out = np.zeros((count, batch, classes), dtype=dtype)
    out[np.arange(count)[:, None], np.arange(batch)[None, :], indices.T] = 1
    return out
