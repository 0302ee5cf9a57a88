"""ROAD: remove pixels by noisy linear imputation, most- and least-relevant first (Rong et al., ICML 2022).

Deleting pixels by painting them black (or blurring them) moves the image off the data the model
was trained on, so the score collapses whatever the order and a random map can beat a good one.
Rong et al. ("A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022)
fill each removed pixel with the weighted mean of its 8 neighbours instead — a sparse linear
system over the removed set (:func:`noisy_linear_imputation`) — plus a little Gaussian noise, so
the removed pixels' values cannot be read off the mask's shape. :func:`road` scores the model at
the paper's removal percentages, most relevant first (MoRF: the score should fall fast) and least
relevant first (LeRF: it should stay), and combines the two.

>>> import numpy as np
>>> image = np.array([[[0.0, 0.0, 0.0], [0.0, 9.0, 6.0], [0.0, 6.0, 12.0]]])
>>> removed = np.zeros((3, 3), dtype=bool); removed[1, 1] = True
>>> # the centre becomes (1/6 · (0 + 6 + 0 + 6) + 1/12 · (0 + 0 + 0 + 12)) / 1 = 3
>>> noisy_linear_imputation(image, removed, noise=0.0)[0, 1, 1]
np.float64(3.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError, require
from .._progress import progress_bar
from .scoring import Run, as_inputs, check_input_layout, to_numpy

#: The paper's neighbour weights (row offset, column offset) → weight: 1/6 for the four edge
#: neighbours, 1/12 for the four diagonal ones (they sum to 1).
NEIGHBOUR_WEIGHTS: dict[tuple[int, int], float] = {
    (-1, 0): 1 / 6,
    (1, 0): 1 / 6,
    (0, -1): 1 / 6,
    (0, 1): 1 / 6,
    (-1, -1): 1 / 12,
    (-1, 1): 1 / 12,
    (1, -1): 1 / 12,
    (1, 1): 1 / 12,
}

#: The paper's removal fractions: 10 %, 20 %, …, 90 % of the pixels.
ROAD_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: The standard deviation of the Gaussian noise added to every imputed value (the paper's 0.01,
#: on inputs normalised to roughly unit scale, as the ImageNet-normalised images it used).
ROAD_NOISE = 0.01

ORDERS = ("morf", "lerf", "both")


@dataclass(frozen=True)
class RoadResult:
    """A ROAD run: the target's score after removing each percentage of pixels by imputation.

    Attributes:
        percentages: ``(K,)`` the fractions of pixels removed, the curves' x axis.
        original: ``(N,)`` the target's score on the unmodified images.
        morf: ``(N, K)`` scores with the most relevant pixels removed first, or None
            (``order="lerf"``). Lower is better: a faithful map removes what the model needs.
        lerf: ``(N, K)`` scores with the least relevant pixels removed first, or None
            (``order="morf"``). Higher is better: a faithful map keeps what the model needs.
        morf_mean: ``(N,)`` each MoRF curve's mean over the percentages, or None.
        lerf_mean: ``(N,)`` each LeRF curve's mean over the percentages, or None.
        combined: ``(N,)`` ``(lerf_mean − morf_mean) / 2`` per sample, or None unless
            ``order="both"``; **higher is better** (pytorch-grad-cam's ``ROADCombined``). A map
            that orders pixels no better than chance scores about 0.
        target: ``(N,)`` the scored classes, or None for a callable target.
    """

    percentages: np.ndarray
    original: np.ndarray
    morf: np.ndarray | None
    lerf: np.ndarray | None
    morf_mean: np.ndarray | None
    lerf_mean: np.ndarray | None
    combined: np.ndarray | None
    target: np.ndarray | None


def noisy_linear_imputation(
    image: Any,
    removed_mask: Any,
    *,
    noise: float = ROAD_NOISE,
    seed: int | np.random.Generator | None = 0,
    input_layout: str = "channels_first",
) -> np.ndarray:
    """Returns ``image`` with its removed pixels replaced by ROAD's noisy linear imputation.

    Every removed pixel ``i`` takes the weighted mean of its neighbours inside the image,
    ``x_i = Σ_j w_ij x_j / Σ_j w_ij`` with the paper's weights (:data:`NEIGHBOUR_WEIGHTS`:
    1/6 edge, 1/12 diagonal), where a neighbour is a kept pixel (its value is known) or another
    removed pixel (an unknown). That is one sparse linear system over the removed set,
    symmetric and positive definite as long as a pixel is kept; it is factorised once by
    ``scipy.sparse.linalg.splu`` and solved for all channels together. Then Gaussian noise of
    standard deviation ``noise`` is added to each imputed value (the paper's 0.01). Kept pixels
    are returned unchanged.

    Args:
        image: ``(C, H, W)`` one image, or ``(N, C, H, W)`` a batch (``(H, W, C)`` /
            ``(N, H, W, C)`` with ``input_layout="channels_last"``), floating point.
        removed_mask: ``(H, W)`` or ``(N, H, W)`` booleans (or 0/1), True where a pixel is
            removed; all channels of a pixel go together.
        noise: the noise's standard deviation, >= 0 (0: the exact linear imputation).
        seed: an int, a ``numpy.random.Generator`` or None (fresh entropy) for the noise.
        input_layout: ``"channels_first"`` or ``"channels_last"``.

    Raises:
        anycam.InputError: shapes that do not fit, a spatial rank other than 2, or a mask that
            removes every pixel of an image (nothing is left to impute from).
        anycam.ConfigError: a negative or non-finite ``noise``.
        anycam.MissingExtraError: scipy is not installed.
    """
    layout = check_input_layout(input_layout)
    images = as_inputs(image)
    if images.ndim not in (3, 4):
        raise InputError(f"ROAD imputes 2-D images: expected (C, H, W) or (N, C, H, W), got shape {images.shape}")
    single = images.ndim == 3
    batch = images[None] if single else images
    if layout == "channels_last":
        batch = np.moveaxis(batch, -1, 1)
    masks = np.asarray(to_numpy(removed_mask, "removed_mask"))
    if masks.ndim == 2 and single:
        masks = masks[None]
    if masks.shape != (batch.shape[0], *batch.shape[2:]):
        raise InputError(
            f"removed_mask of shape {np.shape(removed_mask)} does not fit the image's spatial shape {batch.shape[2:]}"
        )
    masks = masks.astype(bool)
    rng = np.random.default_rng(seed)
    noise = _noise(noise)
    out = np.stack([_impute(img, m, noise, rng) for img, m in zip(batch, masks, strict=True)]).astype(images.dtype)
    if layout == "channels_last":
        out = np.moveaxis(out, 1, -1)
    return out[0] if single else out


def road(
    predict: Any,
    inputs: Any,
    heatmaps: Any,
    target: Any = None,
    *,
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    order: str = "both",
    noise: float = ROAD_NOISE,
    seed: int = 0,
    score: str | Callable[[np.ndarray], np.ndarray] = "probability",
    batch_size: int = 64,
    progress: bool | None = None,
    input_layout: str | None = None,
) -> RoadResult:
    """ROAD (Rong et al., ICML 2022): the target's score as pixels are removed by noisy linear imputation.

    For each percentage p, the ``round(p · P)`` most relevant pixels (MoRF) or least relevant
    pixels (LeRF) of each map are removed — ranked as in :func:`anycam.metrics.deletion`, ties in
    raster order — and filled by :func:`noisy_linear_imputation`; the model scores each imputed
    image. MoRF should fall (lower is better), LeRF should stay (higher is better), and
    ``combined = (mean LeRF − mean MoRF) / 2`` (higher is better; about 0 for a map no better
    than chance). The paper reports the model's accuracy over a dataset; this scores the
    target's probability per sample, which averages to the same ranking without labels.

    Args:
        predict, inputs, heatmaps, target, score, batch_size, progress, input_layout: as in
            :func:`anycam.metrics.deletion`; the inputs must have 2 spatial axes.
        percentages: the fractions of pixels removed, each in [0, 1) (the paper's 0.1 … 0.9).
        order: ``"morf"``, ``"lerf"`` or ``"both"`` (needed for ``combined``).
        noise: the imputation noise's standard deviation (the paper's 0.01, meant for
            normalised inputs; scale it with your inputs' range, e.g. 0.01 · 255 for 0–255).
        seed: seeds the noise, so a run is reproducible.

    Returns:
        A :class:`RoadResult`; ``result.combined.mean()`` is the one-number summary.

    Raises:
        anycam.InputError, anycam.TargetError, anycam.NonFiniteError: as in
            :func:`anycam.metrics.deletion`, or inputs without exactly 2 spatial axes.
        anycam.ConfigError: a bad ``order``, ``percentages``, ``noise`` or ``batch_size``.
    """
    run = Run(predict, inputs, heatmaps, target, score, batch_size, input_layout)
    if len(run.spatial) != 2:
        raise InputError(f"ROAD imputes 2-D images; these inputs have spatial shape {run.spatial}")
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose one of {', '.join(map(repr, ORDERS))}")
    fractions = _percentages(percentages)
    noise = _noise(noise)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    orders = ("morf", "lerf") if order == "both" else (order,)
    pixels = math.prod(run.spatial)
    counts = np.rint(fractions * pixels).astype(np.int64)
    if counts.max() >= pixels:
        raise ConfigError(
            f"percentages up to {fractions.max():g} remove all {pixels} pixels of these maps: nothing is left "
            "to impute from; use smaller percentages (or larger images)"
        )
    flat = run.heatmaps.reshape(run.count, -1)
    ranks = {name: _ranks(-flat if name == "morf" else flat) for name in orders}
    images = run.inputs if run.layout == "channels_first" else np.moveaxis(run.inputs, -1, 1)
    rng = np.random.default_rng(seed)
    curves = {name: np.empty((run.count, len(fractions)), dtype=np.float64) for name in orders}

    def jobs() -> Iterator[tuple[str, int, int, np.ndarray]]:
        for sample in range(run.count):
            for name in orders:
                for k, count in enumerate(counts):
                    removed = (ranks[name][sample] < count).reshape(run.spatial)
                    imputed = _impute(images[sample], removed, noise, rng).astype(run.inputs.dtype)
                    if run.layout == "channels_last":
                        imputed = np.moveaxis(imputed, 0, -1)
                    yield name, sample, k, imputed

    total = run.count * (1 + len(orders) * len(fractions))
    with progress_bar(progress, total, "ROAD", "image", leave=False) as bar:
        original = run.score_originals(bar)
        pending: list[tuple[str, int, int, np.ndarray]] = []
        for job in jobs():
            pending.append(job)
            if len(pending) == run.batch_size:
                _score_pending(run, pending, curves)
                bar.update(len(pending))
                pending = []
        if pending:
            _score_pending(run, pending, curves)
            bar.update(len(pending))
    morf, lerf = curves.get("morf"), curves.get("lerf")
    morf_mean = None if morf is None else morf.mean(axis=1)
    lerf_mean = None if lerf is None else lerf.mean(axis=1)
    combined = None if morf_mean is None or lerf_mean is None else (lerf_mean - morf_mean) / 2
    return RoadResult(
        percentages=fractions,
        original=original,
        morf=morf,
        lerf=lerf,
        morf_mean=morf_mean,
        lerf_mean=lerf_mean,
        combined=combined,
        target=run.target,
    )


def road_replace(images: np.ndarray, removed: np.ndarray, layout: str, rng: np.random.Generator) -> np.ndarray:
    """Imputes a batch ``(B, ...)`` at ``removed`` ``(B, H, W)`` with ROAD's noise, as the deletion baseline.

    A mask that removes every pixel leaves nothing to impute from: that image becomes a
    constant, each channel's mean, plus the noise (with one pixel kept the imputation is
    already constant: that pixel's value everywhere).
    """
    first = images if layout == "channels_first" else np.moveaxis(images, -1, 1)
    out = np.empty(first.shape, dtype=np.float64)
    for i, (image, mask) in enumerate(zip(first, removed, strict=True)):
        if mask.all():
            means = image.reshape(image.shape[0], -1).mean(axis=1, dtype=np.float64)
            out[i] = means[:, None, None] + ROAD_NOISE * rng.standard_normal(image.shape)
        else:
            out[i] = _impute(image, mask, ROAD_NOISE, rng)
    out = out.astype(images.dtype)
    return out if layout == "channels_first" else np.moveaxis(out, 1, -1)


def _score_pending(run: Run, pending: list[tuple[str, int, int, np.ndarray]], curves: dict[str, np.ndarray]) -> None:
    rows = np.array([sample for _, sample, _, _ in pending])
    values = run.score(np.stack([image for *_, image in pending]), rows)
    for (name, sample, k, _), value in zip(pending, values, strict=True):
        curves[name][sample, k] = value


def _ranks(keys: np.ndarray) -> np.ndarray:
    """Returns each pixel's position in the stable ascending order of ``keys`` ``(N, P)``."""
    order = np.argsort(keys, axis=1, kind="stable")
    rank = np.empty(order.shape, dtype=np.int64)
    np.put_along_axis(rank, order, np.arange(keys.shape[1])[None, :], axis=1)
    return rank


def _percentages(percentages: Any) -> np.ndarray:
    try:
        values = np.asarray(percentages, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"percentages must be numbers in [0, 1), got {percentages!r}") from exc
    if not values.size or not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values >= 1):
        raise ConfigError(
            f"percentages must be fractions in [0, 1) (1 removes every pixel: nothing is left to impute from), "
            f"got {percentages!r}"
        )
    return values


def _noise(noise: Any) -> float:
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) or noise < 0:
        raise ConfigError(f"noise must be a finite number >= 0, got {noise!r}")
    return float(noise)


def _impute(image: np.ndarray, removed: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Imputes one channels-first ``(C, H, W)`` image at the True pixels of ``removed`` ``(H, W)``."""
    channels = image.shape[0]
    height, width = removed.shape
    flat = image.reshape(channels, -1).astype(np.float64)
    out = flat.copy()
    unknown = np.flatnonzero(removed.reshape(-1))
    if not unknown.size:
        return out.reshape(image.shape)
    if unknown.size == removed.size:
        raise InputError("the mask removes every pixel: ROAD's imputation needs at least one kept pixel")
    sparse = require("scipy.sparse", "metrics", "ROAD's imputation")
    linalg = require("scipy.sparse.linalg", "metrics", "ROAD's imputation")
    count = unknown.size
    variable = np.full(removed.size, -1, dtype=np.int64)
    variable[unknown] = np.arange(count)
    row, col = np.divmod(unknown, width)
    diagonal = np.zeros(count)
    rhs = np.zeros((count, channels))
    links_from, links_to, links_weight = [], [], []
    for (dr, dc), weight in NEIGHBOUR_WEIGHTS.items():
        r, c = row + dr, col + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        # A neighbour outside the image does not exist: its weight leaves the denominator too.
        diagonal[inside] += weight
        at = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        other = variable[neighbour]
        known = other < 0
        rhs[at[known]] += weight * flat[:, neighbour[known]].T
        links_from.append(at[~known])
        links_to.append(other[~known])
        links_weight.append(np.full(int((~known).sum()), -weight))
    # (Σ w) x_i − Σ_{removed j} w x_j = Σ_{kept j} w v_j: symmetric (the weights are), diagonally
    # dominant, strictly so next to a kept pixel, so positive definite whenever one pixel is kept.
    matrix = sparse.csc_matrix(
        (
            np.concatenate([diagonal, *links_weight]),
            (np.concatenate([np.arange(count), *links_from]), np.concatenate([np.arange(count), *links_to])),
        ),
        shape=(count, count),
    )
    # The matrix is SPD, so no pivoting is needed (stable, and SuperLU keeps the symmetric
    # ordering). The ordering is a geometric nested dissection of the pixel grid: on a large
    # hole it fills the factor less, and factorises ~1.4× faster, than SuperLU's MMD on A + Aᵀ.
    order = np.concatenate(_dissect(row, col, np.arange(count)))
    permuted = matrix[order][:, order].tocsc()
    factor = linalg.splu(permuted, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    solution = np.empty_like(rhs)
    solution[order] = factor.solve(rhs[order])
    if noise:
        solution = solution + noise * rng.standard_normal(solution.shape)
    out[:, unknown] = solution.T
    return out.reshape(image.shape)


def _dissect(row: np.ndarray, col: np.ndarray, members: np.ndarray, leaf: int = 64) -> list[np.ndarray]:
    """Orders ``members`` (indices into ``row``/``col``) by geometric nested dissection.

    The set is cut at the median row (or column, whichever spans more) into the pixels before
    the cut line, after it and on it; with the 8-neighbour stencil nothing before the line
    touches anything after it, so ordering both halves (recursively) before the line keeps
    the factor's fill inside each half.
    """
    if members.size <= leaf:
        return [members]
    rows, cols = row[members], col[members]
    key = rows if np.ptp(rows) >= np.ptp(cols) else cols
    line = np.floor(np.median(key))
    before, after = members[key < line], members[key > line]
    if not before.size or not after.size:
        return [members]
    return [*_dissect(row, col, before, leaf), *_dissect(row, col, after, leaf), members[key == line]]
