"""From captured arrays to heatmaps: layout → method → upsample → normalise → aggregate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError, NonFiniteError
from ._namespace import as_float, compute_dtype, device_of, namespace
from .layout import to_channels_first
from .methods import compute_cam
from .normalize import scaled
from .resize import resize

AGGREGATIONS = ("mean", "max")


def check_finite(array: np.ndarray, what: str, layer: str) -> None:
    """Raises NonFiniteError naming ``what`` and ``layer`` if ``array`` holds NaN or inf.

    Off NumPy the check reads one boolean from the array's device; only when something is
    non-finite does it read the first bad index, its kind and the count (a few scalars, never
    the whole array).
    """
    xp = namespace(array)
    if xp is np:
        finite = np.isfinite(array)
        if finite.all():
            return
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        nan, count = bool(np.isnan(array[bad])), int((~finite).sum())
    else:
        finite = xp.isfinite(array)
        if bool(xp.all(finite)):
            return
        bad, nan, count = _first_non_finite(xp, array, finite)
    raise NonFiniteError(
        f"{'NaN' if nan else 'inf'} in the {what} of layer {layer!r} (first at index {bad}, "
        f"{count} values in all); check the input and the model's numerics "
        "(a float16 overflow is a common cause)"
    )


def _first_non_finite(xp: Any, array: Any, finite: Any) -> tuple[tuple[int, ...], bool, int]:
    """Returns (index of the first non-finite value in C order, whether it is NaN, how many) on device."""
    flat_bad = xp.reshape(~finite, (-1,))
    count = int(xp.sum(xp.astype(flat_bad, xp.int32)))  # int32: JAX has no int64 by default
    # The smallest flat index where the value is bad (argmax's tie order is not portable).
    positions = xp.arange(flat_bad.shape[0], device=device_of(array))
    first = int(xp.min(xp.where(flat_bad, positions, xp.full_like(positions, flat_bad.shape[0]))))
    nan = bool(xp.isnan(xp.reshape(array, (-1,))[first]))
    index = []
    for size in reversed(tuple(int(d) for d in array.shape)):
        index.append(first % size)
        first //= size
    return tuple(reversed(index)), nan, count


def _to_float32(array: np.ndarray) -> np.ndarray:
    """Returns ``array`` as contiguous float32, values beyond float32's range saturated.

    The core computes in float64 so that A·G may exceed float32's range (activations and
    gradients of 1e30 are both finite float32); a plain cast would turn such values into inf
    with an overflow warning, and upsampling an inf map gives NaN (inf · 0).
    """
    xp = namespace(array)
    if xp is not np:
        # Computed in float32 already (or float64 on request): an overflow there is ±inf,
        # which saturates here just as the NumPy path's finite float64 value does.
        largest = float(np.finfo(np.float32).max)
        return xp.astype(xp.clip(array, -largest, largest), xp.float32)
    limit = np.finfo(np.float32).max
    return np.ascontiguousarray(np.clip(array, -limit, limit), dtype=np.float32)


@dataclass(frozen=True)
class LayerResult:
    """One layer's raw map ``(N, K, *S)`` float32 and channel weights ``(N, K, C)`` or None.

    Values beyond float32's range (about 3.4e38) saturate at its largest finite value.
    """

    cam: np.ndarray
    weights: np.ndarray | None


def layer_cam(
    method: str,
    activations: np.ndarray,
    gradients: np.ndarray | None,
    layout: str,
    *,
    count: int = 1,
    grid: tuple[int, ...] | None = None,
    rectify: bool = True,
    seed: int = 0,
) -> LayerResult:
    """Returns the raw map of one layer for K targets.

    Args:
        method: one of ``anycam.core.CAPTURE_METHODS``.
        activations: ``(N, ...)`` in ``layout``.
        gradients: ``(N, K, ...)`` in ``layout``, or None for gradient-free methods.
        layout: the layer's layout (see ``anycam.core.to_channels_first``).
        count: K, used to repeat a target-independent map.
        grid: the patch grid of a token layout.
        rectify: apply the final ReLU (False gives signed maps).
        seed: the seed of ``randomcam``'s weights.
    """
    acts = to_channels_first(activations, layout, lead=1, grid=grid)[:, None, ...]
    grads = None if gradients is None else to_channels_first(gradients, layout, lead=2, grid=grid)
    cam, weights = compute_cam(method, acts, grads, channel_axis=2, rectify=rectify, seed=seed)
    xp = namespace(cam)
    if cam.shape[1] != count:
        cam = xp.broadcast_to(cam, (cam.shape[0], count, *cam.shape[2:]))
    if weights is not None and weights.shape[1] != count:
        weights = xp.broadcast_to(weights, (weights.shape[0], count, *weights.shape[2:]))
    return LayerResult(_to_float32(cam), None if weights is None else _to_float32(weights))


def heatmaps(
    cams: Sequence[np.ndarray],
    size: Sequence[int] | None,
    *,
    normalization: str | None = "minmax",
    resize_mode: str | None = "linear",
    aggregate: str = "mean",
    aligned: Sequence[tuple[tuple[int, ...], tuple[int, ...]] | None] | None = None,
) -> np.ndarray:
    """Returns normalise(upsample(cam)) per layer, combined over layers.

    Upsampling comes first so every map spans exactly [0, 1] at the output resolution (as in
    pytorch-grad-cam and tf-keras-vis). With several layers each map is upsampled and
    normalised, then averaged (or maxed) and normalised once more.

    Args:
        cams: per layer ``(N, K, *S_layer)``.
        size: output spatial shape; None keeps the layer's (only with one layer).
        normalization: ``"minmax"``, ``"max"`` or None.
        resize_mode: ``"linear"``, ``"nearest"`` or None (same as size=None).
        aggregate: ``"mean"`` or ``"max"`` over layers.
        aligned: per layer, the ``(layer, input)`` spatial shapes at one rank
            (``anycam.core.LayerReading.aligned``): the map is upsampled between those and then
            given the shape ``size``, so a ``(64, 1)`` map of a ``(1024,)`` signal becomes
            ``(1024,)``. None: the map's trailing axes are upsampled to ``size``'s.

    Returns:
        ``(N, K, *size)`` float32.
    """
    if aggregate not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregate {aggregate!r}; choose 'mean' or 'max'")
    maps = []
    # One layer: normalised straight into the float32 result.
    dtype = np.float32 if len(cams) == 1 else np.float64
    xp = namespace(*cams)
    for index, cam in enumerate(cams):
        spatial = cam.ndim - 2
        # Off NumPy in float32 (float64 for float64 cams): a float16 map is never normalised in float16.
        out = np.asarray(cam, dtype=np.float64) if xp is np else as_float(xp, cam, compute_dtype(xp, cam))
        fit = None if aligned is None else aligned[index]
        if size is not None and resize_mode is not None:
            if fit is not None:
                # Upsampled at the rank both agree on, then given the input's own shape.
                layer_shape, input_shape = fit
                lead = cam.shape[:2]
                out = resize(xp.reshape(out, (*lead, *layer_shape)), tuple(input_shape), resize_mode)
                out = xp.reshape(out, (*lead, *size))
                spatial = len(size)
            else:
                out = resize(out, tuple(size)[-spatial:], resize_mode)
        # A resized map is a new array the normalisation may overwrite; the caller's cam is not.
        owned = xp is np and not np.may_share_memory(out, cam)
        maps.append(scaled(out, normalization, spatial, dtype, overwrite=owned))
    if len(maps) == 1:
        return maps[0]
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1:
        raise InputError(f"layers give maps of different shapes {sorted(shapes)}; upsample them to one size")
    stacked = xp.stack(maps)
    combined = xp.mean(stacked, axis=0) if aggregate == "mean" else xp.max(stacked, axis=0)
    return scaled(combined, normalization, maps[0].ndim - 2, np.float32, overwrite=True)
