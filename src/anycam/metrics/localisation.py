"""Localisation metrics: does the heatmap point inside the annotated object?

The pointing game (Zhang et al., ECCV 2016) and its energy-based form (Score-CAM, Wang et al.
2020), from boolean masks or boxes; pure NumPy (SciPy only for a tolerance).

>>> import numpy as np
>>> heat = np.array([[[0.0, 1.0], [0.0, 0.0]]])
>>> pointing_game(heat, np.array([[0, 1, 1, 2]])).tolist()
[True]
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .._errors import InputError, require
from .scoring import as_maps, to_numpy


def pointing_game(heatmaps: Any, regions: Any, tolerance: int = 0) -> np.ndarray:
    """Returns ``(N,)`` hits: the heatmap's maximum lies within ``tolerance`` pixels of the region.

    The pointing game of Zhang et al. (Top-down Neural Attention by Excitation Backprop, ECCV
    2016), which counts a hit within 15 pixels of the annotation (``tolerance=15``); the distance
    is Euclidean between pixel centres. When several pixels share the maximum, the sample is a hit
    if *any* of them is inside, so a constant map hits every non-empty region: filter such maps
    out if that matters. An empty region is never hit. Accuracy is ``hits.mean()``.

    Args:
        heatmaps: ``(N, *S)``, finite.
        regions: boolean masks ``(N, *S)``, or boxes for 2-D maps: ``(N, 4)`` as
            ``(row0, col0, row1, col1)`` with exclusive ends (numpy slicing
            ``map[row0:row1, col0:col1]``; fractional edges take every pixel the box touches,
            edges outside the map are clipped), ``(N, B, 4)``, or a list of N ``(B_i, 4)`` arrays
            (a hit in any box counts).
        tolerance: a non-negative whole number of pixels.

    Raises:
        anycam.InputError: mismatched shapes, non-finite maps, malformed boxes, bad tolerance.
    """
    maps = as_maps(heatmaps)
    masks = _region_masks(regions, maps.shape)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Integral) or tolerance < 0:
        raise InputError(f"tolerance must be a non-negative whole number of pixels, got {tolerance!r}")
    masks = _dilate(masks, int(tolerance))
    axes = tuple(range(1, maps.ndim))
    peaks = maps == maps.max(axis=axes, keepdims=True)
    return np.any(peaks & masks, axis=axes)


def energy_pointing_game(heatmaps: Any, regions: Any) -> np.ndarray:
    """Returns ``(N,)`` Σ heatmap inside the region / Σ heatmap (0 for an all-zero map).

    The energy-based pointing game of Score-CAM (Wang et al., CVPR Workshops 2020): the share of
    the map's mass that falls on the object, in [0, 1], higher is better.

    Args:
        heatmaps: ``(N, *S)``, finite and non-negative.
        regions: masks or boxes, as in :func:`pointing_game`.

    Raises:
        anycam.InputError: as in :func:`pointing_game`, or negative heatmap values.
    """
    maps = as_maps(heatmaps)
    if maps.size and maps.min() < 0:
        raise InputError(
            "the energy pointing game needs non-negative heatmaps, got a minimum of "
            f"{maps.min():.4g}; "
            "normalise them first, e.g. anycam.core.normalize(maps)"
        )
    masks = _region_masks(regions, maps.shape)
    axes = tuple(range(1, maps.ndim))
    total = maps.sum(axis=axes)
    inside = np.where(masks, maps, 0.0).sum(axis=axes)
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def _region_masks(regions: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Returns ``(N, *S)`` boolean masks from masks or boxes."""
    count = shape[0]
    regions = to_numpy(regions, "regions")
    if isinstance(regions, (list, tuple)):
        if len(regions) != count:
            raise InputError(f"got {len(regions)} regions for {count} heatmaps; pass one per sample")
        items = [np.asarray(to_numpy(item, "regions")) for item in regions]
        if all(item.dtype == bool for item in items):
            return _check_masks(np.stack(items) if items else np.zeros(shape, bool), shape)
        return _boxes_to_masks(items, shape)
    array = np.asarray(regions)
    if array.dtype == bool:
        return _check_masks(array, shape)
    if array.shape == shape:
        raise InputError(
            f"regions of the heatmaps' shape {shape} must be boolean masks, got dtype "
            f"{array.dtype}; cast 0/1 masks with .astype(bool)"
        )
    if array.ndim in (2, 3) and array.shape[0] == count and array.shape[-1] == 4:
        return _boxes_to_masks(list(array.reshape(count, -1, 4)), shape)
    raise InputError(
        f"regions of shape {array.shape} and dtype {array.dtype} fit neither boolean masks {shape} "
        f"nor boxes ({count}, 4) / ({count}, B, 4); cast 0/1 masks with .astype(bool)"
    )


def _check_masks(masks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if masks.shape != shape:
        raise InputError(f"masks of shape {masks.shape} do not match heatmaps of shape {shape}")
    return masks


def _boxes_to_masks(boxes: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) != 3:
        raise InputError(
            f"boxes (row0, col0, row1, col1) need 2-D heatmaps, got heatmaps of shape {shape}; "
            "pass boolean masks instead"
        )
    height, width = shape[1:]
    masks = np.zeros(shape, dtype=bool)
    for index, item in enumerate(boxes):
        if item.dtype == bool or not np.issubdtype(item.dtype, np.number) or item.size % 4:
            raise InputError(f"boxes of sample {index} must be numbers in groups of 4, got {item!r}")
        for row0, col0, row1, col1 in np.asarray(item, dtype=np.float64).reshape(-1, 4):
            if not np.all(np.isfinite([row0, col0, row1, col1])) or row1 < row0 or col1 < col0:
                raise InputError(
                    f"box {[float(v) for v in (row0, col0, row1, col1)]} of sample {index} is not "
                    "(row0, col0, row1, col1) "
                    "with row0 <= row1 and col0 <= col1 (an (x0, y0, x1, y1) box is (col, row): "
                    "reorder it to (y0, x0, y1, x1))"
                )
            top, left = max(math.floor(row0), 0), max(math.floor(col0), 0)
            bottom, right = min(math.ceil(row1), height), min(math.ceil(col1), width)
            if bottom > top and right > left:
                masks[index, top:bottom, left:right] = True
    return masks


def _dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """Returns ``masks`` ``(N, *S)`` grown by every pixel within Euclidean distance ``radius``.

    The binary dilation of each sample by a ball, computed as the Euclidean distance transform
    to the region (``scipy.ndimage.distance_transform_edt``), exact and faster than dilating by a
    ball structuring element; pixels outside the map count as False.
    """
    if radius == 0 or not masks.any():
        return masks
    ndimage = require("scipy.ndimage", "metrics", "the pointing game with a tolerance")
    out = masks.copy()
    for index, mask in enumerate(masks):
        if mask.any():  # an empty region has no distance to grow from and stays empty
            # Distances are square roots of integers: exact where they equal a whole radius.
            out[index] = ndimage.distance_transform_edt(~mask) <= radius
    return out
