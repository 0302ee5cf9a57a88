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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import InputError, NonFiniteError, TargetError, require
from .core.layout import canonical_layout, spatial_shape
from .core.targets import TargetSpec, parse_target

BASELINES = ("zeros", "mean", "blur")
SCORES = ("probability", "logit")

#: The Gaussian σ (pixels) of the ``"blur"`` baseline: RISE's evaluation code blurs with σ = 5.
BLUR_SIGMA = 5.0

# A bar for a handful of forward passes is noise; beyond this many, a run is worth watching.
_AUTO_PROGRESS_BATCHES = 20

Predict = Callable[[np.ndarray], Any]


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
            ``BLUR_SIGMA``), a number, or an array broadcastable to ``inputs``.
        score: ``"probability"`` (softmax of the outputs), ``"logit"`` (the outputs as they are)
            or a callable from ``(B, classes)`` outputs to ``(B, classes)`` scores (e.g. a
            sigmoid for multi-label models).
        batch_size: images per forward pass.
        progress: show a tqdm bar (``pip install "anycam[metrics]"``; silently none without
            tqdm); None shows one when there are more than 20 forward passes.
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
    run = _Run(predict, inputs, heatmaps, target, score, batch_size, input_layout)
    low, high = float(run.heatmaps.min()), float(run.heatmaps.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise InputError(
            f"heatmaps must lie in [0, 1] for Average Drop, got values in [{low:.4g}, {high:.4g}]; "
            "normalise them first, e.g. anycam.core.normalize(maps)"
        )
    weights = run.channel_mask(np.clip(run.heatmaps, 0.0, 1.0))
    passes = 2 * math.ceil(run.count / run.batch_size)
    bar = _progress_bar(progress, passes, 2 * run.count, "average drop")
    try:
        original = run.score_originals(bar)
        if np.any(original <= 0):
            bad = np.flatnonzero(original <= 0)
            raise InputError(
                f"Average Drop divides by the original score, which is <= 0 for sample(s) "
                f"{bad[:5].tolist()}; use score='probability' (softmax), which is always positive"
            )
        masked = np.empty(run.count, dtype=np.float64)
        for rows in _chunks(run.count, run.batch_size):
            images = (run.inputs[rows] * weights[rows]).astype(run.inputs.dtype, copy=False)
            masked[rows] = run.score(images, rows)
            _advance(bar, len(rows))
    finally:
        _close(bar)
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
    maps = _as_maps(heatmaps)
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
    maps = _as_maps(heatmaps)
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
    layout = _input_layout(input_layout)
    images = _as_inputs(inputs)
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


# --------------------------------------------------------------------------------------------
# Deletion / insertion


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
    run = _Run(predict, inputs, heatmaps, target, score, batch_size, input_layout)
    pixels = math.prod(run.spatial)
    steps = _positive_int(steps, "steps")
    if steps > pixels:
        raise ValueError(f"steps={steps} exceeds the {pixels} pixels of each map; pass steps <= {pixels}")
    background = _baseline(baseline, run.inputs, run.layout)
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
    passes = math.ceil(run.count / run.batch_size) + math.ceil(len(samples) / run.batch_size)
    bar = _progress_bar(progress, passes, run.count * (steps + 1), kind)
    try:
        curves[:, original_step] = run.score_originals(bar)
        for chunk in _chunks(len(samples), run.batch_size):
            rows, at = samples[chunk], step_of[chunk]
            changed = rank[rows] < changed_count[at][:, None]
            original = ~changed if kind == "deletion" else changed
            shown = run.channel_mask(original.reshape(len(rows), *run.spatial)).astype(dtype)
            replacement = background if background.shape[0] == 1 else background[rows]
            # A blend with 0/1 weights is exact for finite values (x·1 + b·0 = x) and about
            # three times faster than np.where on a scattered mask.
            images = run.inputs[rows]  # a copy: fancy indexing
            images *= shown
            images += replacement * (1 - shown)
            curves[rows, at] = run.score(images, rows)
            _advance(bar, len(rows))
    finally:
        _close(bar)
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
            raise ValueError(
                f"unknown baseline {baseline!r}; choose one of {', '.join(map(repr, BASELINES))}, a number or an array"
            )
    else:
        if isinstance(baseline, bool):
            raise InputError("baseline must be a string, a number or an array, not a bool")
        try:
            values = np.asarray(baseline, dtype=np.float64)
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


# --------------------------------------------------------------------------------------------
# Running the model and scoring the target


class _Run:
    """Validated inputs, heatmaps and target of one metric, and the scoring of image batches."""

    def __init__(
        self,
        predict: Any,
        inputs: Any,
        heatmaps: Any,
        target: Any,
        score: Any,
        batch_size: Any,
        input_layout: str | None,
    ) -> None:
        self.predict, self.layout = _predictor(predict, input_layout)
        self.inputs = _as_inputs(inputs)
        self.spatial = spatial_shape(self.inputs.shape, self.layout)
        self.count = self.inputs.shape[0]
        if self.count == 0:
            raise InputError("inputs hold no samples")
        self.heatmaps = _as_maps(heatmaps)
        expected = (self.count, *self.spatial)
        if self.heatmaps.shape != expected:
            if self.heatmaps.shape[:1] + self.heatmaps.shape[2:] == expected:
                raise InputError(
                    f"heatmaps of shape {self.heatmaps.shape} hold several maps per sample; "
                    "metrics take one: pass heatmaps[:, k] with the k-th column of the target"
                )
            raise InputError(
                f"heatmaps of shape {self.heatmaps.shape} do not fit inputs of shape "
                f"{self.inputs.shape} ({self.layout}): expected {expected}; resize maps with "
                f"anycam.core.resize(maps, {self.spatial}), or set input_layout"
            )
        self.spec = _metric_target(target, self.count)
        self.transform = _score_transform(score)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.target: np.ndarray | None = None

    def channel_mask(self, spatial: np.ndarray) -> np.ndarray:
        """Returns ``(B, *S)`` values shaped to broadcast against the ``(B, ...)`` images."""
        return spatial[:, None] if self.layout == "channels_first" else spatial[..., None]

    def score_originals(self, bar: Any) -> np.ndarray:
        """Scores the unmodified inputs, resolving None/int targets on the way; returns ``(N,)``."""
        scores = np.empty(self.count, dtype=np.float64)
        if self.spec.kind != "callable":
            self.target = np.zeros(self.count, dtype=np.int64)
        for rows in _chunks(self.count, self.batch_size):
            outputs = self._forward(self.inputs[rows])
            if self.spec.kind != "callable":
                assert self.target is not None
                classes = outputs.shape[1]
                if self.spec.kind == "argmax":
                    self.target[rows] = np.argmax(outputs, axis=1)
                else:
                    assert self.spec.indices is not None
                    indices = self.spec.indices[:, 0]
                    self.target[rows] = indices if self.spec.kind == "index" else indices[rows]
                    largest = int(self.target[rows].max())
                    if largest >= classes:
                        raise TargetError(f"target class {largest} is out of range: the model has {classes} outputs")
            scores[rows] = self._scores(outputs, rows)
            _advance(bar, len(rows))
        return scores

    def score(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Returns ``(B,)`` scores of ``images``, row b for the target of sample ``rows[b]``."""
        return self._scores(self._forward(images), rows)

    def _forward(self, images: np.ndarray) -> Any:
        outputs = self.predict(images)
        if self.spec.kind == "callable":
            return outputs
        try:
            outputs = np.asarray(outputs, dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"predict must return a NumPy array, got {type(outputs).__name__}; convert it "
                "(e.g. .detach().cpu().numpy()), or pass the anycam.Explainer"
            ) from exc
        if outputs.ndim != 2 or outputs.shape[0] != len(images):
            raise TargetError(
                "class-index targets need predict to return (B, classes) outputs, got "
                f"{outputs.shape} for a batch of {len(images)}; pass a callable target that "
                "maps the output to (B,) scores"
            )
        return outputs

    def _scores(self, outputs: Any, rows: np.ndarray) -> np.ndarray:
        if self.spec.kind == "callable":
            assert self.spec.fn is not None
            values = np.asarray(self.spec.fn(outputs), dtype=np.float64)
            if values.shape not in ((len(rows),), (len(rows), 1)):
                raise TargetError(
                    f"a callable target must map a batch of {len(rows)} outputs to ({len(rows)},) "
                    f"scores, got shape {values.shape}"
                )
            values = values.reshape(len(rows))
        else:
            if not np.all(np.isfinite(outputs)):
                raise NonFiniteError("the model's outputs hold NaN or inf; check the inputs and baseline")
            table = self.transform(outputs)
            if table.shape != outputs.shape:
                raise ValueError(f"a score function must return the outputs' shape {outputs.shape}, got {table.shape}")
            assert self.target is not None
            values = table[np.arange(len(rows)), self.target[rows]]
        if not np.all(np.isfinite(values)):
            raise NonFiniteError("the target's scores hold NaN or inf; check the model, inputs and baseline")
        return values


def _predictor(predict: Any, input_layout: str | None) -> tuple[Predict, str]:
    """Returns the NumPy predict function and the input layout for what the user passed."""
    from .protocol.backend import Backend
    from ._explainer import Explainer

    # An Explainer is itself callable (it returns heatmaps), so it must be recognised first.
    backend = predict.backend if isinstance(predict, Explainer) else predict
    if isinstance(backend, Backend):
        function: Predict = backend.predict
        layout = input_layout or getattr(backend, "input_layout", None) or "channels_first"
    elif callable(predict):
        function = predict
        layout = input_layout or "channels_first"
    else:
        raise TypeError(
            f"predict must be an anycam.Explainer or a callable from a NumPy batch to (N, classes) "
            f"outputs, got {type(predict).__name__}"
        )
    return function, _input_layout(layout)


def _input_layout(layout: str) -> str:
    layout = canonical_layout(layout)
    if layout == "tokens":
        raise InputError("inputs cannot be in a token layout; use 'channels_first' or 'channels_last'")
    return layout


def _metric_target(target: Any, count: int) -> TargetSpec:
    """Parses ``target`` into one class (or a callable) per sample."""
    spec = parse_target(target)
    if spec.kind == "topk":
        raise TargetError(
            "metrics score one class per sample; for top_k maps, run the metric once per column of Explanation.target"
        )
    if spec.kind == "indices":
        assert spec.indices is not None
        if spec.indices.shape[1] != 1:
            raise TargetError(
                f"metrics score one class per sample, got targets of shape {spec.indices.shape}; "
                "run the metric once per column"
            )
        if spec.indices.shape[0] != count:
            raise TargetError(
                f"got {spec.indices.shape[0]} targets for a batch of {count}; pass one per sample, "
                "or a single int for the whole batch"
            )
    return spec


def _score_transform(score: Any) -> Callable[[np.ndarray], np.ndarray]:
    if callable(score):
        return lambda outputs: np.asarray(score(outputs), dtype=np.float64)
    if score == "logit":
        return lambda outputs: outputs
    if score == "probability":
        return _softmax
    raise ValueError(f"unknown score {score!r}; choose 'probability', 'logit' or a callable")


def _softmax(outputs: np.ndarray) -> np.ndarray:
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _as_inputs(inputs: Any) -> np.ndarray:
    try:
        images = np.asarray(inputs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"inputs must be a NumPy array, got {type(inputs).__name__}; convert framework tensors "
            "first (e.g. x.detach().cpu().numpy())"
        ) from exc
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"inputs must be floating point, got dtype {images.dtype}; scale them to floats first")
    if not np.all(np.isfinite(images)):
        raise InputError("inputs hold NaN or inf")
    return images


def _as_maps(heatmaps: Any) -> np.ndarray:
    try:
        maps = np.asarray(heatmaps, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"heatmaps must be a numeric array, got {type(heatmaps).__name__}") from exc
    if maps.ndim < 2:
        raise InputError(f"heatmaps must be (N, *spatial), got shape {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise InputError("heatmaps hold NaN or inf")
    return maps


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _chunks(total: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, total, size):
        yield np.arange(start, min(start + size, total))


def _progress_bar(progress: bool | None, passes: int, total: int, name: str) -> Any:
    """Returns a tqdm bar, or None when not wanted or tqdm is not installed (an optional extra)."""
    if not (progress if progress is not None else passes > _AUTO_PROGRESS_BATCHES):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=name, unit="image", leave=False)


def _advance(bar: Any, count: int) -> None:
    if bar is not None:
        bar.update(count)


def _close(bar: Any) -> None:
    if bar is not None:
        bar.close()


# --------------------------------------------------------------------------------------------
# Regions for the pointing games


def _region_masks(regions: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Returns ``(N, *S)`` boolean masks from masks or boxes."""
    count = shape[0]
    if isinstance(regions, (list, tuple)):
        if len(regions) != count:
            raise InputError(f"got {len(regions)} regions for {count} heatmaps; pass one per sample")
        items = [np.asarray(item) for item in regions]
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
