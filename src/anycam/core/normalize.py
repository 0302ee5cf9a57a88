"""Per-map normalisation to [0, 1], defined for every finite input (flat maps become zeros)."""

from __future__ import annotations

import numpy as np

from .._errors import ConfigError

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
        float64 array of ``maps``' shape.

    >>> normalize(np.array([[1.0, 3.0], [2.0, 1.0]]))
    array([[0. , 1. ],
           [0.5, 0. ]])
    """
    values = np.asarray(maps, dtype=np.float64)
    if mode is None:
        return values
    if mode not in ("minmax", "max"):
        raise ConfigError(f"unknown normalisation {mode!r}; choose 'minmax', 'max' or None")
    axes = tuple(range(values.ndim - spatial_ndim, values.ndim))
    high = np.max(values, axis=axes, keepdims=True)
    if mode == "minmax":
        low = np.min(values, axis=axes, keepdims=True)
        values = values - low
        span = high - low
    else:
        values = np.maximum(values, 0.0)
        span = high
    valid = np.isfinite(span) & (span > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = values / np.where(valid, span, 1.0)
    return np.where(valid, np.clip(scaled, 0.0, 1.0), 0.0)
