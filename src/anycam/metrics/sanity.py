"""The model-randomisation sanity check (Adebayo et al., *Sanity Checks for Saliency Maps*, 2018).

A map that explains the model must change when the model's weights are replaced by random
ones. ``sanity_check`` re-initialises a *copy* of the model layer by layer, from the logits
down (cascading) or one layer at a time (independent), and measures how similar each
randomised map still is to the original: Spearman rank correlation of the signed maps and of
their absolute values, and SSIM of the heatmaps. High similarity at full randomisation is a
warning sign: the map reflects the input (edges, bright blobs) more than the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import core
from .._errors import BackendError, ConfigError, ConfigTypeError, InputError, require
from .._progress import progress_bar
from ..explain.explainer import Explainer


def rank(values: np.ndarray) -> np.ndarray:
    """Returns the ranks (0-based, ties averaged) of each row of ``values`` ``(B, P)``.

    ``scipy.stats.rankdata(values, method="average", axis=1) - 1`` (``pip install "anycam[metrics]"``).

    >>> rank(np.array([[10.0, 30.0, 20.0, 20.0]]))
    array([[0. , 3. , 1.5, 1.5]])
    """
    stats = require("scipy.stats", "metrics", "the Spearman rank correlation")
    ranks: np.ndarray = stats.rankdata(np.asarray(values, dtype=np.float64), method="average", axis=1) - 1.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Returns the Spearman rank correlation of each pair of maps ``(N, *S)``: Pearson of ranks.

    A constant map has no ranking; its correlation is 0 (not NaN, where ``scipy.stats.spearmanr``
    warns and returns NaN), so a batch mean stays defined.

    >>> float(spearman(np.array([[1.0, 2.0, 3.0]]), np.array([[10.0, 20.0, 90.0]]))[0])
    1.0
    """
    ra = rank(np.asarray(a).reshape(len(a), -1))
    rb = rank(np.asarray(b).reshape(len(b), -1))
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    safe = np.where(norm > 0, norm, 1.0)
    return np.where(norm > 0, (ra * rb).sum(axis=1) / safe, 0.0)


def _gaussian_filter(images: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Valid-mode Gaussian filter over the trailing two axes: positions whose window fits."""
    ndimage = require("scipy.ndimage", "metrics", "SSIM")
    # Any border mode gives the same interior; the crop keeps only windows inside the map.
    filtered = ndimage.gaussian_filter(images, sigma, radius=radius, axes=(-2, -1))
    height, width = images.shape[-2:]
    return filtered[..., radius : height - radius, radius : width - radius]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Returns the mean structural similarity of each pair of 2-D maps ``(N, H, W)``.

    Wang et al. 2004: Gaussian window σ = 1.5 (11 × 11), K1 = 0.01, K2 = 0.03, averaged over
    the valid window positions. Maps smaller than the window use the largest odd window that
    fits.

    >>> x = np.random.default_rng(0).random((1, 16, 16))
    >>> float(ssim(x, x)[0])
    1.0
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise InputError(f"ssim needs two (N, H, W) arrays of one shape, got {a.shape} and {b.shape}")
    radius = min(5, (min(a.shape[1:]) - 1) // 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a, 1.5, radius), _gaussian_filter(b, 1.5, radius)
    var_a = _gaussian_filter(a * a, 1.5, radius) - mu_a**2
    var_b = _gaussian_filter(b * b, 1.5, radius) - mu_b**2
    cov = _gaussian_filter(a * b, 1.5, radius) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.reshape(len(a), -1).mean(axis=1)


@dataclass(frozen=True)
class SanityResult:
    """Similarity of randomised-model maps to the original, one row per randomisation step.

    Attributes:
        layers: the layer randomised at each step (cascading: that layer and all above it).
        mode: ``"cascading"``, ``"independent"`` or ``"full"``.
        spearman: ``(steps, N)`` rank correlation of the signed raw maps (no final ReLU).
        spearman_abs: ``(steps, N)`` rank correlation of their absolute values.
        ssim: ``(steps, N)`` SSIM of the [0, 1] heatmaps; None for inputs that are not 2-D.
        method: the explainer's method.
        backend: the framework that computed it (names the curves when results are compared).
    """

    layers: tuple[str, ...]
    mode: str
    spearman: np.ndarray
    spearman_abs: np.ndarray
    ssim: np.ndarray | None
    method: str
    backend: str = ""

    def table(self) -> str:
        """Returns a Markdown table of the per-step means over the batch."""
        lines = [
            f"{self.mode} randomisation, {self.method}: similarity to the original map (mean over the batch)",
            "",
            "| randomised down to | Spearman | Spearman (abs) | SSIM |",
            "|---|---|---|---|",
        ]
        for index, layer in enumerate(self.layers):
            ssim_text = "–" if self.ssim is None else f"{self.ssim[index].mean():.3f}"
            lines.append(
                f"| {layer} | {self.spearman[index].mean():.3f} | {self.spearman_abs[index].mean():.3f} | {ssim_text} |"
            )
        return "\n".join(lines)

    def plot(self, path: str | None = None) -> Any:
        """Plots the similarity curves (the Adebayo et al. figure); saves to ``path`` if given.

        Needs matplotlib (``pip install "anycam[viz]"``); see ``anycam.viz.plot_sanity``,
        which also draws several results (methods, frameworks) side by side. Returns the figure.
        """
        from ..viz.figures import plot_sanity

        return plot_sanity(self, path)


def sanity_check(
    explainer: Explainer,
    inputs: Any,
    target: Any = None,
    *,
    mode: str = "cascading",
    layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> SanityResult:
    """Runs the model-parameter randomisation test on ``explainer``'s model.

    Args:
        explainer: an :class:`anycam.Explainer`; its model is copied, never modified.
        inputs: a batch, as for ``explainer.explain``.
        target: as for ``explainer.explain``; class targets are resolved once on the original
            model, so every randomised model explains the same classes.
        mode: ``"cascading"`` (randomise from the output layer down, accumulating),
            ``"independent"`` (one layer at a time, the rest original) or ``"full"`` (one step,
            every layer randomised: the cascade's last step, at a fraction of its cost).
        layers: the layers to randomise, ordered from input to output; default: every layer
            with parameters. A mapping ``{step name: [layers]}`` (input to output) makes each
            step randomise a group at once — a transformer's block is several layers (its norms,
            attention projections and MLP), and its cascade goes block by block.
        seed: seeds the framework's initialiser.
        progress: a bar over the randomised models: True always, False never, None (default)
            once the check has run over 2 s (the rule of every anycam progress bar).

    Returns:
        A :class:`SanityResult` with one row per layer (or per step of a mapping), in
        randomisation order.

    Raises:
        anycam.ConfigTypeError: ``explainer`` is not an ``anycam.Explainer``.
        anycam.ConfigError: for an unknown mode.
        anycam.BackendError: the backend does not declare the ``randomize`` capability (it cannot
            copy and randomise its model); raised before any work.
    """
    if not isinstance(explainer, Explainer):
        raise ConfigTypeError(f"sanity_check takes an anycam.Explainer, got {type(explainer).__name__}")
    if mode not in ("cascading", "independent", "full"):
        raise ConfigError(f"unknown mode {mode!r}; choose 'cascading', 'independent' or 'full'")
    backend = explainer.backend
    if "randomize" not in backend.capabilities:
        raise BackendError(
            f"the {backend.name} backend cannot run the sanity check: it does not declare the randomize capability"
        )
    # Guided methods compare their input-resolution attribution, already signed (Adebayo et al.
    # compare Guided Backprop's and Guided Grad-CAM's maps the same way): nothing to switch off.
    guided = explainer.method in core.GUIDED_METHODS
    signed = explainer if guided else replace_explainer(explainer, relu=False)
    original = explainer.explain(inputs, target)
    groups = _groups(layers if layers is not None else backend.parameter_layers(inputs))
    if original.scores.ndim != 1:
        raise InputError("the sanity check explains one map per sample: pass None, an int, N ints or a callable")
    fixed_target = original.target if original.target is not None else target
    reference_signed = signed.explain(inputs, fixed_target)

    # From the output down; a step randomises its whole group (a cascade step adds one group).
    steps = [name for name, _ in reversed(groups)]
    members = [list(group) for _, group in reversed(groups)]
    if mode == "cascading":
        plan = [[layer for group in members[: index + 1] for layer in group] for index in range(len(members))]
    elif mode == "independent":
        plan = members
    else:
        plan, steps = [[layer for group in members for layer in group]], ["all"]
    two_d = original.heatmap.ndim == 3
    size = original.heatmap.shape[1:]
    rows: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    # "full" uses the seed of the cascade's last step, so it reproduces that step exactly.
    first_seed = seed + len(groups) - 1 if mode == "full" else seed
    with progress_bar(progress, len(plan), f"anycam sanity_check {mode}", "model") as bar:
        for index, chosen in enumerate(plan):
            flipped = replace_explainer(signed, backend=backend.randomized(chosen, seed=first_seed + index)).explain(
                inputs, fixed_target
            )
            _compare(reference_signed, flipped, original, explainer, guided, two_d, size, rows)
            bar.update(1)
    rows_spearman, rows_abs, rows_ssim = rows
    return SanityResult(
        layers=tuple(steps),
        mode=mode,
        spearman=np.array(rows_spearman),
        spearman_abs=np.array(rows_abs),
        ssim=np.array(rows_ssim) if rows_ssim else None,
        method=explainer.method,
        backend=backend.name,
    )


def _compare(
    reference_signed: Any,
    flipped: Any,
    original: Any,
    explainer: Explainer,
    guided: bool,
    two_d: bool,
    size: tuple[int, ...],
    rows: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]],
) -> None:
    """Appends one randomised model's Spearman, |Spearman| and (2-D) SSIM rows to ``rows``."""
    rows_spearman, rows_abs, rows_ssim = rows
    reference_raw, flipped_raw = _flat(_signed_map(reference_signed)), _flat(_signed_map(flipped))
    rows_spearman.append(spearman(reference_raw, flipped_raw))
    rows_abs.append(spearman(np.abs(reference_raw), np.abs(flipped_raw)))
    if two_d and guided:
        rows_ssim.append(ssim(original.heatmap, flipped.heatmap))
    elif two_d:
        # The rectified heatmap is the same pipeline on ReLU(signed map): no second pass.
        rectified = [np.maximum(cam, 0)[:, None] for cam in flipped.cams]
        heat = core.heatmaps(
            rectified,
            None if explainer.upsample is None else size,
            normalization=explainer.normalize,
            resize_mode=explainer.upsample,
            aggregate=explainer.aggregate,
        )[:, 0]
        rows_ssim.append(ssim(original.heatmap, heat))


def _groups(layers: Sequence[str] | Mapping[str, Sequence[str]]) -> list[tuple[str, tuple[str, ...]]]:
    """Returns the randomisation steps, input to output, as (step name, the layers it randomises)."""
    if isinstance(layers, Mapping):
        groups = [(str(name), _names(members, f"step {name!r}")) for name, members in layers.items()]
    else:
        groups = [(name, (name,)) for name in _names(layers, "layers")]
    if not groups:
        raise InputError("the model has no layers with parameters to randomise")
    empty = [name for name, members in groups if not members]
    if empty:
        raise ConfigError(f"randomisation step(s) {', '.join(map(repr, empty))} name no layers")
    return groups


def _names(layers: Any, what: str) -> tuple[str, ...]:
    """Returns ``layers`` as a tuple of layer names (refusing one string, which would split into letters)."""
    if isinstance(layers, str):
        raise ConfigTypeError(f"{what} must be a sequence of layer names, got the string {layers!r}")
    return tuple(layers)


def replace_explainer(explainer: Explainer, **changes: Any) -> Explainer:
    """Returns a shallow copy of ``explainer`` with attributes changed (``backend``, ``relu``)."""
    clone = Explainer.__new__(Explainer)
    clone.__dict__.update(explainer.__dict__)
    for key, value in changes.items():
        if not hasattr(clone, key):
            raise AttributeError(key)
        setattr(clone, key, value)
    return clone


def _signed_map(explanation: Any) -> np.ndarray:
    """The signed map an explanation is compared by: Σ_c attribution_c for the guided methods
    (input resolution), else the raw layer map ``cam``."""
    if explanation.attribution is not None:
        return np.asarray(explanation.attribution).sum(axis=1)
    return np.asarray(explanation.cam)


def _flat(maps: np.ndarray) -> np.ndarray:
    return maps.reshape(len(maps), -1)


__all__ = ["SanityResult", "rank", "replace_explainer", "sanity_check", "spearman", "ssim"]
