"""Average Gain (Opti-CAM) and ADCC (Poppi et al.): how the model scores the image seen through its map.

Both build on Average Drop's masked image ``x ⊙ A(x)`` (:func:`anycam.metrics.average_drop_increase`):
Average Gain measures how much the masked image *raises* the target's probability, ADCC combines
the drop with the map's coherency (does the map of the masked image agree with the map?) and its
complexity (how much of the image it lights up). The model is run through the same path as every
faithfulness metric (``scoring.Run``). Nothing here imports a framework.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import AnycamWarning, ConfigError, ConfigTypeError, InputError
from .scoring import Run, as_maps, chunks, masked_scores


class UndefinedCoherencyWarning(AnycamWarning):
    """A map (or the map of its masked image) is constant, so its Pearson correlation is undefined."""


@dataclass(frozen=True)
class GainResult:
    """Average Gain (Zhang et al., Opti-CAM, 2023).

    Attributes:
        average_gain: mean over samples of max(0, O − Y) / (1 − Y), in percent (higher is better).
        original: ``(N,)`` Y, the target's probability on the image.
        masked: ``(N,)`` O, the target's probability on image ⊙ heatmap.
        gain: ``(N,)`` max(0, O − Y) / (1 − Y) in percent, per sample (0 where Y = 1).
        target: ``(N,)`` the scored classes, or None for a callable target.
    """

    average_gain: float
    original: np.ndarray
    masked: np.ndarray
    gain: np.ndarray
    target: np.ndarray | None


@dataclass(frozen=True)
class AdccResult:
    """ADCC (Poppi et al., CVPR Workshops 2021), per sample and averaged; all in [0, 1].

    Attributes:
        adcc: the mean over samples of ``per_sample`` (higher is better; the paper prints it ×100).
            NaN when a sample's coherency is undefined (a constant map).
        per_sample: ``(N,)`` 3 / (1/coherency + 1/(1 − complexity) + 1/(1 − drop)).
        coherency: ``(N,)`` (Pearson(A(x), A(x ⊙ A(x))) + 1) / 2 (higher is better).
        complexity: ``(N,)`` the mean of A(x) over pixels, its L1 norm per pixel (lower is better).
        drop: ``(N,)`` max(0, Y − O) / Y, Average Drop as a fraction (lower is better).
        original, masked: ``(N,)`` Y and O as in :class:`GainResult`.
        target: ``(N,)`` the scored classes, or None for a callable target.
    """

    adcc: float
    per_sample: np.ndarray
    coherency: np.ndarray
    complexity: np.ndarray
    drop: np.ndarray
    original: np.ndarray
    masked: np.ndarray
    target: np.ndarray | None


def average_gain(
    predict: Any,
    inputs: Any,
    heatmaps: Any,
    target: Any = None,
    *,
    score: str | Callable[[np.ndarray], np.ndarray] = "probability",
    batch_size: int = 64,
    progress: bool | None = None,
    input_layout: str | None = None,
) -> GainResult:
    """Average Gain = mean(max(0, O − Y) / (1 − Y)) · 100 (Zhang et al., Opti-CAM, 2023).

    The counterpart of Average Drop: Y is the target's probability on the image, O on the
    image multiplied by its heatmap (broadcast over channels). A map that keeps exactly what
    the model needs and dims the distractors *raises* the probability; Average Drop alone
    rewards a map that lights up everything. A sample with Y = 1 cannot gain and counts 0.

    Args:
        predict, inputs, heatmaps, target, score, batch_size, progress, input_layout: as in
            :func:`anycam.metrics.average_drop_increase`; ``score`` must give probabilities
            (``"probability"``, or a callable such as a sigmoid), since the gain divides by 1 − Y.

    Returns:
        A :class:`GainResult`.

    Raises:
        anycam.InputError: as in :func:`anycam.metrics.average_drop_increase`, or scores outside
            [0, 1] (e.g. ``score="logit"``).
        anycam.TargetError, anycam.NonFiniteError: as in :func:`anycam.metrics.deletion`.
    """
    run = Run(predict, inputs, heatmaps, target, score, batch_size, input_layout)
    original, masked, _ = masked_scores(run, progress, "average gain")
    for name, values in (("original", original), ("masked", masked)):
        if np.any(values < 0) or np.any(values > 1):
            raise InputError(
                f"Average Gain divides by 1 − score, but the {name} scores leave [0, 1] "
                f"(range [{values.min():.4g}, {values.max():.4g}]); use score='probability'"
            )
    room = 1.0 - original
    rise = np.maximum(0.0, masked - original)
    # Y = 1 leaves no room to gain (and then O ≤ Y, so the rise is 0 too): 0, not 0/0.
    gain = np.divide(rise, room, out=np.zeros_like(rise), where=room > 0) * 100.0
    return GainResult(average_gain=float(gain.mean()), original=original, masked=masked, gain=gain, target=run.target)


def adcc(
    predict: Any,
    inputs: Any,
    heatmaps: Any,
    target: Any = None,
    *,
    explain: Any = None,
    score: str | Callable[[np.ndarray], np.ndarray] = "probability",
    batch_size: int = 64,
    progress: bool | None = None,
    input_layout: str | None = None,
) -> AdccResult:
    """ADCC: the harmonic mean of coherency, 1 − complexity and 1 − Average Drop (Poppi et al., 2021).

    Poppi, Cornia, Baraldi and Cucchiara, "Revisiting the evaluation of class activation mapping
    for explainability: a novel metric and experimental analysis" (CVPR Workshops 2021), per
    image x with its map A(x) in [0, 1] and the masked image x' = x ⊙ A(x):

    - coherency(x) = (ρ(A(x), A_c(x')) + 1) / 2, ρ the Pearson correlation over pixels and
      A_c(x') the map of the masked image for the same class c: a map that captured what
      matters explains its own masked image the same way;
    - complexity(x) = ‖A(x)‖₁ / (H·W), the mean of the map: fewer lit pixels, simpler;
    - drop(x) = max(0, Y − O) / Y, the target's probability on x (Y) and on x' (O);
    - ADCC(x) = 3 / (1/coherency + 1/(1 − complexity) + 1/(1 − drop)); the dataset score is its
      mean (some implementations take the harmonic mean of the three means instead).

    Higher is better; a map that lights everything (complexity 1) or loses the class (drop 1)
    scores 0.

    Args:
        predict, inputs, heatmaps, target, score, batch_size, progress, input_layout: as in
            :func:`anycam.metrics.average_drop_increase` (heatmaps in [0, 1]).
        explain: what explains the masked images, with the method that made ``heatmaps``: an
            ``anycam.Explainer`` or a callable ``(images, target) -> (B, *S)`` maps, called on
            NumPy batches of ``batch_size`` masked images with the resolved ``(B,)`` classes
            (or the callable target as given). None (default) takes ``predict`` when it is an
            Explainer.

    Returns:
        An :class:`AdccResult`.

    Raises:
        anycam.InputError, anycam.TargetError, anycam.NonFiniteError: as in
            :func:`anycam.metrics.average_drop_increase`, or maps from ``explain`` that do not fit.
        anycam.ConfigTypeError: ``explain`` is not callable.
        anycam.ConfigError: no ``explain`` and ``predict`` is not an Explainer.

    Warns:
        UndefinedCoherencyWarning: a constant map (e.g. all zeros) makes ρ undefined; that
            sample's coherency and ADCC are NaN, and so is the mean.
    """
    if explain is None:
        from ..explain.explainer import Explainer

        if not isinstance(predict, Explainer):
            raise ConfigError("ADCC explains the masked images: pass explain= (an Explainer or a function)")
        explain = predict
    if not callable(explain):
        raise ConfigTypeError(f"explain must be an anycam.Explainer or a callable, got {type(explain).__name__}")
    run = Run(predict, inputs, heatmaps, target, score, batch_size, input_layout)
    original, masked, images = masked_scores(run, progress, "ADCC", keep=True)
    assert images is not None  # keep=True
    if np.any(original <= 0):
        raise InputError("ADCC's Average Drop divides by the original score, which is <= 0; use score='probability'")
    again = np.empty_like(run.heatmaps)
    for rows in chunks(run.count, run.batch_size):
        wanted = run.spec.fn if run.spec.kind == "callable" else run.target[rows]  # type: ignore[index]
        maps = as_maps(explain(images[rows], wanted))
        if maps.shape != (len(rows), *run.spatial):
            raise InputError(
                f"explain returned maps of shape {maps.shape} for {len(rows)} masked images; expected "
                f"{(len(rows), *run.spatial)} (one map per image at the input's resolution)"
            )
        again[rows] = maps
    first = run.heatmaps.reshape(run.count, -1)
    second = again.reshape(run.count, -1)
    first = first - first.mean(axis=1, keepdims=True)
    second = second - second.mean(axis=1, keepdims=True)
    norms = np.sqrt((first**2).sum(axis=1) * (second**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(norms > 0, (first * second).sum(axis=1) / np.where(norms > 0, norms, 1.0), np.nan)
    if np.isnan(rho).any():
        warnings.warn(
            f"sample(s) {np.flatnonzero(np.isnan(rho))[:5].tolist()} have a constant map (or the map of "
            "their masked image is constant): coherency is undefined, their ADCC is NaN",
            UndefinedCoherencyWarning,
            stacklevel=2,
        )
    coherency = (np.clip(rho, -1.0, 1.0) + 1.0) / 2.0
    complexity = run.heatmaps.reshape(run.count, -1).mean(axis=1)
    drop = np.maximum(0.0, original - masked) / original
    terms = np.stack([coherency, 1.0 - complexity, 1.0 - drop])
    with np.errstate(divide="ignore"):
        # Any term at 0 sends its reciprocal to inf and the harmonic mean to 0, as it should.
        per_sample = 3.0 / (1.0 / terms).sum(axis=0)
    return AdccResult(
        adcc=float(per_sample.mean()),
        per_sample=per_sample,
        coherency=coherency,
        complexity=complexity,
        drop=drop,
        original=original,
        masked=masked,
        target=run.target,
    )
