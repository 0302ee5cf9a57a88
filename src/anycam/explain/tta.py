"""Test-time augmentation: maps of rescaled and flipped views, mapped back and combined.

The multi-scale + flip aggregation of the weakly-supervised segmentation pipelines (AffinityNet,
IRN, SEAM): each view is explained, its raw layer map is resized straight to the original input
grid (one interpolation, not two), flipped views are flipped back, and the views are averaged or
maxed *before* the explainer's normalisation, as those pipelines sum raw CAMs and normalise once.
With the identity view alone this is exactly what the wrapped Explainer computes.

With a native-mode explainer (``arrays="native"`` or ``differentiable=True``) the views are made,
mapped back and combined with the framework's own arrays on the model's device (the core's
namespace functions), and the Explanation holds framework arrays: nothing goes to the host but
the resolved target indices. Its values are the NumPy mode's up to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import core
from .._errors import ConfigError, ConfigTypeError, InputError, TargetError
from .._progress import progress_bar
from ..core._namespace import device_of, is_numpy, namespace
from .explainer import Explainer
from .explanation import Explanation

COMBINES = ("mean", "max")


class TTAExplainer(Explainer):
    """An Explainer over views of the input: ``scales`` × (original, horizontally flipped).

    Usable wherever an Explainer is (``explain_dataset``, the metrics, ``anycam.ray``).

    Args:
        explainer: the ``anycam.Explainer`` to wrap (its model, layers, method and options).
        scales: input scale factors; each view is resized with linear interpolation (half-pixel
            centres, as ``F.interpolate(align_corners=False)``) to ``round(s · size)``.
        flip: also explain every view flipped along the last spatial axis (the width).
        combine: ``"mean"`` or ``"max"`` of the views' raw maps on the original grid.

    Raises:
        anycam.ConfigTypeError: ``explainer`` is not a plain ``anycam.Explainer``.
        anycam.ConfigError: bad scales or combine, a guided method, or an explainer with
            ``upsample=None`` (views of different sizes have no common grid at layer resolution).
    """

    def __init__(
        self,
        explainer: Explainer,
        scales: Sequence[float] = (1.0,),
        *,
        flip: bool = False,
        combine: str = "mean",
    ) -> None:
        if not isinstance(explainer, Explainer):
            raise ConfigTypeError(f"TTAExplainer wraps an anycam.Explainer, got {type(explainer).__name__}")
        if isinstance(explainer, TTAExplainer):
            raise ConfigTypeError("TTAExplainer wraps a plain Explainer; give all scales and flip to one wrapper")
        scales = tuple(scales)
        if not scales or not all(
            isinstance(s, numbers.Real) and not isinstance(s, bool) and np.isfinite(s) and s > 0 for s in scales
        ):
            raise ConfigError(f"scales must be positive numbers, got {scales!r}")
        if combine not in COMBINES:
            raise ConfigError(f"unknown combine={combine!r}; choose 'mean' or 'max'")
        if explainer.method in core.GUIDED_METHODS:
            raise ConfigError(
                f"TTAExplainer combines layer maps; {explainer.method!r} gives an input attribution "
                "(guided backprop), which it does not combine: use a CAM method"
            )
        if explainer.upsample is None:
            raise ConfigError(
                "TTAExplainer needs maps on the input grid; the wrapped Explainer has upsample=None: "
                "use upsample='linear' or 'nearest'"
            )
        # Share the wrapped Explainer's state (backend, method, options), whatever it holds.
        vars(self).update(vars(explainer))
        self.explainer = explainer
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.combine = combine

    def tta_config(self) -> dict[str, Any]:
        """The augmentation settings, as JSON (part of a store's configuration)."""
        return {"scales": list(self.scales), "flip": self.flip, "combine": self.combine}

    def __repr__(self) -> str:
        return f"TTAExplainer({self.explainer!r}, scales={self.scales}, flip={self.flip}, combine={self.combine!r})"

    def views(self) -> list[tuple[float, bool]]:
        """The (scale, flipped) views in the order they are explained (the first resolves targets)."""
        ordered = sorted(self.scales, key=lambda s: s != 1.0)  # the original first, if asked for
        return [(s, f) for s in ordered for f in ((False, True) if self.flip else (False,))]

    def explain(self, inputs: Any, target: Any = None) -> Explanation:
        """Explains every view and combines them on the original grid.

        The first view (the original when ``1.0`` is among ``scales``) resolves the target
        (argmax, ``top_k``), and every other view explains those same classes, so the views
        never disagree on what they explain. ``scores`` and ``target`` are the first view's;
        ``cam``/``cams`` are the combined raw maps on the input grid; ``weights`` is None.

        Raises:
            anycam.InputError: inputs that are not one array (TTA needs the image grid).
            anycam.TargetError: a callable target with ``flip=True``: a callable may read a
                place in the output (a box, a region of a segmentation) that the flipped view
                moves to the mirrored place, and anycam cannot flip a function.
        """
        if self.flip and callable(target):
            # Measured: a region target on flipped views put 35% of the map's mass on the wrong side.
            raise TargetError(
                "TTAExplainer(flip=True) cannot flip a callable target: on a flipped view it would score "
                "the mirrored region (a box, a mask) and blur the map with its mirror image; pass flip=False, "
                "or a class-index target (int, ints, top_k), which no flip changes"
            )
        native = self.explainer.arrays == "native"
        images = self._native_inputs(inputs) if native else _as_array(inputs)
        xp = namespace(images) if native else np
        layout = self.backend.input_layout or "channels_first"
        if layout not in ("channels_first", "channels_last"):
            raise InputError(f"TTAExplainer needs image inputs, got input layout {layout!r}")
        spatial = core.spatial_shape(images.shape, layout)
        first_axis = 2 if layout == "channels_first" else 1
        width_axis = first_axis + len(spatial) - 1
        combined: list[Any] | None = None
        first: Explanation | None = None
        squeeze = False
        views = self.views()
        with progress_bar(self.progress, len(views), "anycam tta", "view", leave=False) as bar:
            for scale, flipped in views:
                view = images
                if scale != 1.0:
                    size = tuple(max(1, round(scale * s)) for s in spatial)
                    last = tuple(range(view.ndim))
                    to_first = (0, view.ndim - 1, *last[1:-1])  # (N, *S, C) -> (N, C, *S)
                    to_last = (0, *last[2:], 1)
                    moved = _permute(xp, view, to_first) if layout == "channels_last" else view
                    moved = _astype(xp, core.resize(moved, size, "linear"), images.dtype)
                    view = _permute(xp, moved, to_last) if layout == "channels_last" else moved
                if flipped:
                    view = _flip(xp, view, width_axis)
                if xp is np:
                    view = np.ascontiguousarray(view)
                explanation = self.explainer.explain(view, target if first is None else _resolved(first, target))
                if first is None:
                    first = explanation
                    squeeze = explanation.heatmap.ndim == images.ndim - 1
                maps = []
                for cam in explanation.cams:
                    cam = cam[:, None] if squeeze else cam  # (N, K, *S_layer)
                    up = core.resize(cam, spatial[-(cam.ndim - 2) :], self.upsample or "linear")
                    maps.append(_flip(xp, up, up.ndim - 1) if flipped else up)
                if combined is None:
                    combined = maps
                elif self.combine == "mean":
                    combined = [total + m for total, m in zip(combined, maps, strict=True)]
                else:
                    combined = [xp.maximum(total, m) for total, m in zip(combined, maps, strict=True)]
                bar.update(1)
        assert combined is not None and first is not None
        count = len(views)
        if self.combine == "mean" and count > 1:
            combined = [total / count for total in combined]
        heatmap = core.heatmaps(combined, None, normalization=self.normalize, aggregate=self.aggregate)
        cams = tuple(c[:, 0] if squeeze else c for c in combined)
        changes: dict[str, Any] = {
            "heatmap": heatmap[:, 0] if squeeze else heatmap,
            "cam": _astype(xp, cams[0], xp.float32),
            "cams": tuple(_astype(xp, c, xp.float32) for c in cams),
            "weights": None,
        }
        if hasattr(first, "attribution"):  # a per-view attribution has no meaning once combined
            changes["attribution"] = None
        return dataclasses.replace(first, **changes)

    def _native_inputs(self, inputs: Any) -> Any:
        """Returns the images as the framework's array: a framework array as given (it stays on its
        device, and on its graph), a NumPy batch moved once to the model's device."""
        if isinstance(inputs, (dict, list, tuple)) or is_numpy(inputs) or not hasattr(inputs, "dtype"):
            return self.backend.to_native(_as_array(inputs))
        if "float" not in str(inputs.dtype):
            raise InputError(f"TTAExplainer needs floating-point images, got dtype {inputs.dtype}")
        return inputs


def _flip(xp: Any, array: Any, axis: int) -> Any:
    """Reverses ``array`` along ``axis`` in its own namespace (a gather where the namespace has no flip)."""
    if xp is np:
        return np.flip(array, axis=axis)
    if hasattr(xp, "flip"):
        return xp.flip(array, axis=axis)
    reverse = xp.asarray(np.arange(array.shape[axis] - 1, -1, -1), device=device_of(array))
    return xp.take(array, reverse, axis=axis)


def _permute(xp: Any, array: Any, axes: tuple[int, ...]) -> Any:
    return np.transpose(array, axes) if xp is np else xp.permute_dims(array, axes)  # NumPy < 2 has no permute_dims


def _astype(xp: Any, array: Any, dtype: Any) -> Any:
    return array.astype(dtype) if xp is np else xp.astype(array, dtype)


def _resolved(first: Explanation, target: Any) -> Any:
    """The first view's classes, so that every view explains the same ones (callables pass on)."""
    if first.target is None:
        return target
    return first.target


def _as_array(inputs: Any) -> np.ndarray:
    if isinstance(inputs, (dict, list, tuple)):
        raise InputError(f"TTAExplainer rescales and flips one image batch; got a {type(inputs).__name__} of inputs")
    if hasattr(inputs, "detach"):  # a torch tensor, on any device
        inputs = inputs.detach().cpu()
    array = np.asarray(inputs)
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"TTAExplainer needs floating-point images, got dtype {array.dtype}")
    return array
