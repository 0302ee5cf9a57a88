"""Is the explanation any good? Faithfulness and localisation metrics, in pure NumPy.

A heatmap has no ground truth, so it is judged by what the model does when the pixels it points
at are taken away (deletion), given back (insertion) or kept alone (Average Drop), and by whether
it points inside an annotated object (pointing games). The model is only ever *run*: pass an
``anycam.Explainer`` (its backend's ``predict`` is used, in any framework) or any callable from a
NumPy batch to NumPy ``(N, classes)`` outputs. Nothing here imports a framework.

>>> import numpy as np
>>> def predict(images):  # class 0 looks at the top-left pixel only
...     return np.stack([10 * images[:, 0, 0, 0], np.zeros(len(images))], axis=1)
>>> images = np.ones((1, 1, 2, 2), dtype=np.float32)
>>> heat = np.array([[[1.0, 0.0], [0.0, 0.0]]])
>>> result = deletion(predict, images, heat, target=0, steps=4, score="logit")
>>> result.curves
array([[10.,  0.,  0.,  0.,  0.]])
>>> float(result.auc[0])
1.25
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError, require
from .._progress import progress_bar
from ..core.layout import spatial_shape
from .road import road_replace
from .scoring import Run, as_inputs, check_input_layout, chunks, masked_scores, positive_int, to_numpy

BASELINES = ("zeros", "mean", "blur", "road")
SCORES = ("probability", "logit")

#: The Gaussian σ (pixels) of the ``"blur"`` baseline: RISE's evaluation code blurs with σ = 5.
BLUR_SIGMA = 5.0


@dataclass(frozen=True)
class CurveResult:
    """A deletion or insertion run.

    Attributes:
        auc: ``(N,)`` area under each sample's curve (trapezoid rule over x in [0, 1]).
        curves: ``(N, steps + 1)`` the target's score after each step; column 0 is the original
            image (deletion) or the baseline (insertion).
        fractions: ``(steps + 1,)`` the fraction of pixels removed (or revealed) at each step,
            from 0 to 1: the curves' x axis.
        target: ``(N,)`` the class scored for each sample, or None for a callable target.
        kind: ``"deletion"`` or ``"insertion"``.
    """

    auc: np.ndarray
    curves: np.ndarray
    fractions: np.ndarray
    target: np.ndarray | None
    kind: str


@dataclass(frozen=True)
class ConfidenceResult:
    """Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018).

    Attributes:
        average_drop: mean over samples of max(0, Y − O) / Y, in percent (lower is better).
        increase_in_confidence: percentage of samples with O > Y (higher is better).
        original: ``(N,)`` Y, the target's score on the image.
        masked: ``(N,)`` O, the target's score on image ⊙ heatmap.
        drop: ``(N,)`` max(0, Y − O) / Y in percent, per sample.
        target: ``(N,)`` the scored classes, or None for a callable target.
    """

    average_drop: float
    increase_in_confidence: float
    original: np.ndarray
    masked: np.ndarray
    drop: np.ndarray
    target: np.ndarray | None


def deletion(
    predict: Any,
    inputs: Any,
    heatmaps: Any,
    target: Any = None,
    *,
    steps: int = 100,
    baseline: Any = "zeros",
    score: str | Callable[[np.ndarray], np.ndarray] = "probability",
    batch_size: int = 64,
    progress: bool | None = None,
    input_layout: str | None = None,
) -> CurveResult:
    """Deletion AUC (Petsiuk et al., RISE, BMVC 2018): score while the most salient pixels go.

    Pixels are ranked by the heatmap, highest first (ties in raster order: a stable sort of the
    flattened map), and replaced by the baseline in ``steps`` chunks of equal size; step ``i``
    has removed ``floor(i · P / steps)`` of the P pixels, all channels of a pixel together. A
    faithful map makes the target's score collapse at once: lower AUC is better. Every step of
    every sample is scored in forward passes of ``batch_size`` images.

    Args:
        predict: an ``anycam.Explainer`` (its backend's ``predict``), an ``anycam.Backend``, or
            a callable from a NumPy batch ``(B, ...)`` to ``(B, classes)`` outputs.
        inputs: ``(N, C, *S)`` NumPy floats (``(N, *S, C)`` with ``input_layout="channels_last"``).
        heatmaps: ``(N, *S)`` at the input's resolution, finite (e.g. ``explainer(x)``).
        target: None (each sample's argmax on the original image), an int, N ints, or a callable
            from ``predict``'s NumPy output ``(B, ...)`` to ``(B,)`` scores, row by row (then
            ``score`` is not used).
        steps: number of chunks; the curve has ``steps + 1`` points. At most P.
        baseline: what replaces a removed pixel: ``"zeros"`` (RISE's choice for deletion),
            ``"mean"`` (each sample's per-channel mean), ``"blur"`` (:func:`blur` with σ =
            ``BLUR_SIGMA``), ``"road"`` (ROAD's noisy linear imputation of the removed pixels
            from the kept ones, :func:`anycam.metrics.noisy_linear_imputation` with the paper's
            noise and seed 0; one sparse solve per step and sample, so take ``steps`` near 10;
            the step that removes every pixel has nothing to impute from and shows each
            channel's mean), a number, or an array broadcastable to ``inputs``.
        score: ``"probability"`` (softmax of the outputs), ``"logit"`` (the outputs as they are)
            or a callable from ``(B, classes)`` outputs to ``(B, classes)`` scores (e.g. a
            sigmoid for multi-label models).
        batch_size: images per forward pass.
        progress: a tqdm bar over the scored images: True always (``pip install tqdm`` or
            ``"anycam[metrics]"``), False never, None (default) only once the run has taken over
            2 s, and none without tqdm (the rule of every anycam progress bar).
        input_layout: ``"channels_first"`` or ``"channels_last"``; None takes the Explainer's,
            else channels first.

    Returns:
        A :class:`CurveResult`; ``result.auc.mean()`` is the usual summary.

    Raises:
        anycam.InputError: inputs, heatmaps or baseline of the wrong shape, type or values.
        anycam.TargetError: a target that does not fit the batch or the model output.
        anycam.NonFiniteError: the model's scores hold NaN or inf.
        ValueError: a bad ``steps``, ``batch_size``, ``baseline`` or ``score`` option.
    """
    return _curve(
        "deletion", predict, inputs, heatmaps, target, steps, baseline, score, batch_size, progress, input_layout
    )


def insertion(
    predict: Any,
    inputs: Any,
    heatmaps: Any,
    target: Any = None,
    *,
    steps: int = 100,
    baseline: Any = "blur",
    score: str | Callable[[np.ndarray], np.ndarray] = "probability",
    batch_size: int = 64,
    progress: bool | None = None,
    input_layout: str | None = None,
) -> CurveResult:
    """Insertion AUC (Petsiuk et al., RISE, BMVC 2018): score while the most salient pixels return.

    Starts from the baseline (a blurred image by default, as in RISE) and reveals the original
    pixels in the heatmap's order, in ``steps`` equal chunks; higher AUC is better. Arguments,
    tie order, batching and errors as in :func:`deletion`.
    """
    return _curve(
        "insertion", predict, inputs, heatmaps, target, steps, baseline, score, batch_size, progress, input_layout
    )


def average_drop_increase(
    predict: Any,
    inputs: Any,
    heatmaps: Any,
    target: Any = None,
    *,
    score: str | Callable[[np.ndarray], np.ndarray] = "probability",
    batch_size: int = 64,
    progress: bool | None = None,
    input_layout: str | None = None,
) -> ConfidenceResult:
    """Average Drop = mean(max(0, Y − O) / Y) · 100 and Increase in Confidence = mean(O > Y) · 100.

    Y is the target's score on the image, O on the image multiplied by its heatmap (broadcast
    over channels), as defined in the Grad-CAM++ paper (Chattopadhyay et al., WACV 2018, §5.1).
    The heatmap must already lie in [0, 1] (Explainer heatmaps do; raw maps can be normalised
    with ``anycam.core.normalize``), so the masked image only ever dims pixels.

    Args:
        predict, inputs, heatmaps, target, score, batch_size, progress, input_layout: as in
            :func:`deletion`.

    Returns:
        A :class:`ConfidenceResult`.

    Raises:
        anycam.InputError: as in :func:`deletion`, a heatmap outside [0, 1], or an original score
            Y ≤ 0 (the drop divides by it: use ``score="probability"``).
        anycam.TargetError, anycam.NonFiniteError: as in :func:`deletion`.
    """
    run = Run(predict, inputs, heatmaps, target, score, batch_size, input_layout)
    original, masked, _ = masked_scores(run, progress, "average drop", name="Average Drop", positive=True)
    drop = np.maximum(0.0, original - masked) / original * 100.0
    increase = masked > original
    return ConfidenceResult(
        average_drop=float(drop.mean()),
        increase_in_confidence=float(increase.mean() * 100.0),
        original=original,
        masked=masked,
        drop=drop,
        target=run.target,
    )


def blur(inputs: Any, sigma: float = BLUR_SIGMA, input_layout: str = "channels_first") -> np.ndarray:
    """Returns ``inputs`` convolved with a Gaussian of std ``sigma`` pixels along each spatial axis.

    ``scipy.ndimage.gaussian_filter`` over the spatial axes (``pip install "anycam[metrics]"``),
    the kernel truncated at 4σ and edges clamped (``mode="nearest"``), so a constant image stays
    constant. RISE's insertion baseline uses σ = 5 with an 11×11 zero-padded kernel, which also
    darkens the borders; this one does not.

    Args:
        inputs: ``(N, C, *S)`` or, with ``input_layout="channels_last"``, ``(N, *S, C)``.
        sigma: the standard deviation in pixels, >= 0 (0 returns a copy).
        input_layout: ``"channels_first"`` or ``"channels_last"``.

    Raises:
        anycam.InputError: inputs without a spatial axis, or a negative or non-finite sigma.
        anycam.MissingExtraError: scipy is not installed.
    """
    layout = check_input_layout(input_layout)
    images = as_inputs(inputs)
    spatial = spatial_shape(images.shape, layout)
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma >= 0):
        raise InputError(f"blur sigma must be a finite number >= 0, got {sigma!r}")
    ndimage = require("scipy.ndimage", "metrics", "the blur baseline")
    first = 2 if layout == "channels_first" else 1
    # sigma 0 on the batch and channel axes: scipy skips them.
    sigmas = [0.0] * images.ndim
    sigmas[first : first + len(spatial)] = [float(sigma)] * len(spatial)
    blurred = ndimage.gaussian_filter(images.astype(np.float64), sigmas, mode="nearest", truncate=4.0)
    return np.asarray(blurred).astype(images.dtype)


def _curve(
    kind: str,
    predict: Any,
    inputs: Any,
    heatmaps: Any,
    target: Any,
    steps: Any,
    baseline: Any,
    score: Any,
    batch_size: Any,
    progress: bool | None,
    input_layout: str | None,
) -> CurveResult:
    run = Run(predict, inputs, heatmaps, target, score, batch_size, input_layout)
    pixels = math.prod(run.spatial)
    steps = positive_int(steps, "steps")
    if steps > pixels:
        raise ConfigError(f"steps={steps} exceeds the {pixels} pixels of each map; pass steps <= {pixels}")
    imputed = isinstance(baseline, str) and baseline == "road"
    if imputed and len(run.spatial) != 2:
        raise InputError(f"the 'road' baseline imputes 2-D images; these inputs have spatial shape {run.spatial}")
    background = None if imputed else _baseline(baseline, run.inputs, run.layout)
    rng = np.random.default_rng(0)
    dtype = run.inputs.dtype
    # Rank of every pixel in the removal order; a stable sort keeps ties in raster order.
    order = np.argsort(-run.heatmaps.reshape(run.count, -1), axis=1, kind="stable")
    rank = np.empty(order.shape, dtype=np.int32 if pixels < 2**31 else np.int64)
    np.put_along_axis(rank, order, np.arange(pixels, dtype=rank.dtype)[None, :], axis=1)
    changed_count = np.arange(steps + 1) * pixels // steps
    # The original image is one point of every curve (deletion's first, insertion's last).
    original_step = 0 if kind == "deletion" else steps
    other_steps = np.array([i for i in range(steps + 1) if i != original_step])
    samples = np.repeat(np.arange(run.count), steps)
    step_of = np.tile(other_steps, run.count)

    curves = np.empty((run.count, steps + 1), dtype=np.float64)
    with progress_bar(progress, run.count * (steps + 1), kind, "image", leave=False) as bar:
        curves[:, original_step] = run.score_originals(bar)
        for chunk in chunks(len(samples), run.batch_size):
            rows, at = samples[chunk], step_of[chunk]
            changed = rank[rows] < changed_count[at][:, None]
            original = ~changed if kind == "deletion" else changed
            if background is None:
                removed = (~original).reshape(len(rows), *run.spatial)
                curves[rows, at] = run.score(road_replace(run.inputs[rows], removed, run.layout, rng), rows)
                bar.update(len(rows))
                continue
            shown = run.channel_mask(original.reshape(len(rows), *run.spatial)).astype(dtype)
            replacement = background if background.shape[0] == 1 else background[rows]
            # A blend with 0/1 weights is exact for finite values (x·1 + b·0 = x) and about
            # three times faster than np.where on a scattered mask.
            images = run.inputs[rows]  # a copy: fancy indexing
            images *= shown
            images += replacement * (1 - shown)
            curves[rows, at] = run.score(images, rows)
            bar.update(len(rows))
    fractions = changed_count / pixels
    widths = np.diff(fractions)
    auc = ((curves[:, 1:] + curves[:, :-1]) * 0.5 * widths).sum(axis=1)
    return CurveResult(auc=auc, curves=curves, fractions=fractions, target=run.target, kind=kind)


def _baseline(baseline: Any, inputs: np.ndarray, layout: str) -> np.ndarray:
    """Returns the replacement images, ``(1 or N, ...)`` broadcastable to ``inputs``."""
    if isinstance(baseline, str):
        if baseline == "zeros":
            values = np.zeros((), dtype=inputs.dtype)
        elif baseline == "mean":
            first = 2 if layout == "channels_first" else 1
            axes = tuple(range(first, first + inputs.ndim - 2))
            values = inputs.mean(axis=axes, keepdims=True, dtype=np.float64)
        elif baseline == "blur":
            values = blur(inputs, BLUR_SIGMA, layout)
        else:
            raise ConfigError(
                f"unknown baseline {baseline!r}; choose one of {', '.join(map(repr, BASELINES))}, a number or an array"
            )
    else:
        if isinstance(baseline, bool):
            raise InputError("baseline must be a string, a number or an array, not a bool")
        try:
            values = np.asarray(to_numpy(baseline, "baseline"), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"baseline must be a string, a number or an array, got {type(baseline).__name__}") from exc
        if not np.all(np.isfinite(values)):
            raise InputError("baseline holds NaN or inf")
    try:
        fits = np.broadcast_shapes(values.shape, inputs.shape) == inputs.shape
    except ValueError:
        fits = False
    if not fits or values.ndim > inputs.ndim:
        raise InputError(f"baseline of shape {values.shape} does not broadcast to the inputs' shape {inputs.shape}")
    values = values.reshape((1,) * (inputs.ndim - values.ndim) + values.shape)
    return values.astype(inputs.dtype, copy=False)
