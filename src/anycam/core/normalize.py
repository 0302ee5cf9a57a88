"""Per-map normalisation to [0, 1], defined for every finite input (flat maps become zeros)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import ConfigError
from ._namespace import compute_dtype, constant, namespace, unit_scaled

NORMALIZATIONS = ("minmax", "max", None)


def normalize(maps: np.ndarray, mode: str | None = "minmax", spatial_ndim: int = 2) -> np.ndarray:
    """Returns each map rescaled: ``"minmax"`` (x − min)/(max − min), ``"max"`` x/max, ``None`` x.

    A map is the trailing ``spatial_ndim`` axes. A map with max = min (``"minmax"``) or max ≤ 0
    (``"max"``) becomes all zeros: the seed's Keras code divides by a zero max and returns NaN.
    ``"max"`` clips negatives to 0, so its result also lies in [0, 1].

    Args:
        maps: ``(..., *S)``, finite.
        mode: ``"minmax"``, ``"max"`` or ``None``.
        spatial_ndim: how many trailing axes form one map.

    Returns:
        float64 array of ``maps``' shape for NumPy input; for torch, JAX and other array-API
        arrays an array of their namespace and device, float32 (float64 for float64 input).

    >>> normalize(np.array([[1.0, 3.0], [2.0, 1.0]]))
    array([[0. , 1. ],
           [0.5, 0. ]])
    """
    xp = namespace(maps)
    if xp is not np:
        return _scaled_xp(xp, xp.astype(maps, compute_dtype(xp, maps)), mode, spatial_ndim, None)
    return scaled(np.asarray(maps, dtype=np.float64), mode, spatial_ndim)


def scaled(
    values: np.ndarray,
    mode: str | None,
    spatial_ndim: int,
    dtype: type[np.floating] = np.float64,
    *,
    overwrite: bool = False,
) -> np.ndarray:
    """Returns :func:`normalize` of float64 ``values``, stored as ``dtype``.

    The same float64 arithmetic as ``normalize(values).astype(dtype)``, bit for bit, in fewer
    passes over the data: at 224² the maps of a batch with K targets are tens of megabytes, and
    each temporary array costs about as much as the network after the layer (issue 14).

    Args:
        values: float64 ``(..., *S)``.
        mode: ``"minmax"``, ``"max"`` or ``None``.
        spatial_ndim: how many trailing axes form one map.
        dtype: the result's dtype (float64 or float32).
        overwrite: the caller owns ``values`` and lets them be used as scratch space.
    """
    if mode not in ("minmax", "max", None):
        raise ConfigError(f"unknown normalisation {mode!r}; choose 'minmax', 'max' or None")
    xp = namespace(values)
    if xp is not np:
        return _scaled_xp(xp, values, mode, spatial_ndim, xp.float32 if dtype == np.float32 else None)
    if mode is None:
        return values.astype(dtype, copy=False)
    axes = tuple(range(values.ndim - spatial_ndim, values.ndim))
    scratch = values if overwrite else None
    high = np.max(values, axis=axes, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        if mode == "minmax":
            low = np.min(values, axis=axes, keepdims=True)
            shifted = np.subtract(values, low, out=scratch)
            span = high - low
        else:
            shifted = np.maximum(values, 0.0, out=scratch)
            span = high
        valid = np.isfinite(span) & (span > 0)
        out = shifted if np.dtype(dtype) == shifted.dtype else np.empty(values.shape, dtype)
        # Computed in float64 and rounded once on store (the float64 loop, same_kind cast).
        # No clip needed: rounding is monotonic, so low ≤ x ≤ high gives 0 ≤ fl(x − low) ≤
        # fl(high − low) and a quotient in [0, 1], also after rounding to float32.
        np.divide(shifted, np.where(valid, span, 1.0), out=out, casting="same_kind")
    if not valid.all():
        np.copyto(out, 0.0, where=~valid)
    return out


def _scaled_xp(xp: Any, values: Any, mode: str | None, spatial_ndim: int, dtype: Any) -> Any:
    """Returns :func:`scaled` on an array-API array: the same formula, no in-place operations.

    Computed in ``values``' dtype and cast to ``dtype`` (None keeps it). Without ``out=`` the
    division by 1 where a map is flat and the zeroing afterwards are two ``where`` calls.
    """
    if mode is not None:
        axes = tuple(range(values.ndim - spatial_ndim, values.ndim))
        # Exact powers of two bring each map's largest |value| into [1, 2): the result is the same
        # (the formula is scale invariant, the scaling exact), but 1/span can no longer be a
        # subnormal number that XLA and GPUs flush to zero (maps beyond 2^126 became all zeros).
        values, _ = unit_scaled(xp, values, axes)
        high = xp.max(values, axis=axes, keepdims=True)
        if mode == "minmax":
            low = xp.min(values, axis=axes, keepdims=True)
            shifted = values - low
            span = high - low
        else:
            shifted = xp.maximum(values, constant(xp, 0.0, values))
            span = high
        valid = xp.isfinite(span) & (span > 0)
        quotient = shifted / xp.where(valid, span, constant(xp, 1.0, span))
        values = xp.where(valid, quotient, constant(xp, 0.0, quotient))
    return values if dtype is None or values.dtype == dtype else xp.astype(values, dtype)
