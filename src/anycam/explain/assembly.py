"""From a backend's capture to an ``Explanation``: checked layouts → per-layer maps → heatmaps.

The functions every driver shares (the one-capture methods here, Score-CAM, Ablation-CAM and the
guided methods in their own modules): they read the Explainer's public settings (``layout``,
``token_grid``, ``relu``, ``normalize`` …) and leave every formula to the NumPy core.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import core
from .._errors import AnycamError, ZeroMapWarning, user_stacklevel
from ..protocol.backend import Capture
from .explanation import Explanation

if TYPE_CHECKING:
    from .explainer import Explainer


def capture(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """The driver of the one-capture methods: one forward (and backward) pass, then the core's map."""
    gradients = core.METHODS[explainer.method].kind == "gradient"
    return explanation(explainer, explainer.backend.capture(inputs, spec, gradients=gradients), spec)


def explanation(explainer: Explainer, capture: Capture, spec: core.TargetSpec) -> Explanation:
    """Returns the Explanation of one capture with the Explainer's method."""
    return assemble(explainer, layer_results(explainer, capture), capture, spec)


def read_layouts(explainer: Explainer, capture: Capture) -> tuple[tuple[int, ...], tuple[core.LayerReading, ...]]:
    """Returns the input's spatial shape and each layer's checked layout (core.read_layouts).

    Layouts are checked, not guessed: the backend's guess is kept when the shapes fit it,
    replaced by the one reading that fits when they do not, and a user's ``layout=`` is
    refused when it contradicts them; the input's layout is changed only when no layer fits
    the backend's reading of it and the user did not give ``input_layout=``.
    """
    inputs = [(capture.input_layout or "channels_first", tuple(capture.input_spatial))]
    if capture.input_shape is not None and capture.input_layout in ("channels_first", "channels_last"):
        other = "channels_last" if capture.input_layout == "channels_first" else "channels_first"
        if not explainer.input_layout_given:
            inputs.append((other, core.spatial_shape(capture.input_shape, other)))
    _, spatial, readings = core.read_layouts(
        [a.shape for a in capture.activations],
        capture.layouts,
        inputs,
        given=explainer.layout,
        grid=explainer.token_grid,
        names=explainer.layer_names,
        follow=capture.layouts_follow_input,
        input_shape=capture.input_shape,
    )
    return spatial, readings


def layer_results(explainer: Explainer, capture: Capture, method: str | None = None) -> list[core.LayerResult]:
    """Returns each layer's raw map from one capture (``method`` defaults to the Explainer's)."""
    count = capture.scores.shape[1]
    _, readings = read_layouts(explainer, capture)
    results = []
    for index, name in enumerate(explainer.layer_names):
        activations = capture.activations[index]
        core.check_finite(activations, "activations", name)
        gradients = None
        if capture.gradients is not None:
            gradients = capture.gradients[index]
            core.check_finite(gradients, "gradients", name)
        try:
            results.append(
                core.layer_cam(
                    method or explainer.method,
                    activations,
                    gradients,
                    readings[index].layout,
                    count=count,
                    grid=readings[index].grid,
                    rectify=explainer.relu,
                    seed=explainer.seed,
                )
            )
        except AnycamError as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        warn_zero(explainer, results[-1].cam, gradients, name)
    return results


def warn_zero(explainer: Explainer, cam: np.ndarray, gradients: np.ndarray | None, name: str) -> None:
    """Warns once per Explainer when a map ``(N, K, *S)`` is flat (its heatmap all zeros)."""
    if explainer.warned_zero:
        return
    flat = cam.reshape(*cam.shape[:2], -1)
    dead = flat.max(axis=-1) <= flat.min(axis=-1)
    if not dead.any():
        return
    explainer.warned_zero = True
    sample, target = (int(i) for i in np.argwhere(dead)[0])
    if gradients is not None and not np.any(gradients[sample, target]):
        cause = (
            "its gradient is zero: the explained output does not depend on it there (e.g. the last "
            "ViT block after the class token was read, or a head that ignores the patch tokens); explain "
            "an earlier layer"
        )
    else:
        cause = (
            "the weighted sum of its channels is ≤ 0 everywhere and the final ReLU removes it (e.g. a "
            "pre-activation layer: explain the layer after the activation, or pass relu=False)"
        )
    warnings.warn(
        f"layer {name!r} gives an all-zero map for {int(dead.sum())} of {dead.size} (sample, target) pairs "
        f"(first: sample {sample}, target {target}); {cause}. The heatmaps are returned as zeros. "
        "(This warning is shown once per Explainer.)",
        ZeroMapWarning,
        stacklevel=user_stacklevel(),
    )


def assemble(
    explainer: Explainer,
    results: list[core.LayerResult],
    capture: Capture,
    spec: core.TargetSpec,
    *,
    heatmap: np.ndarray | None = None,
    attribution: np.ndarray | None = None,
) -> Explanation:
    """Returns the Explanation of per-layer maps ``(N, K, *S)``; ``heatmap`` overrides the usual one."""
    count = capture.scores.shape[1]
    if heatmap is None:
        input_spatial, readings = read_layouts(explainer, capture)
        heatmap = core.heatmaps(
            [r.cam for r in results],
            None if explainer.upsample is None else input_spatial,
            normalization=explainer.normalize,
            resize_mode=explainer.upsample,
            aggregate=explainer.aggregate,
            aligned=[r.aligned for r in readings],
        )
    squeeze = spec.squeeze and count == 1

    def shaped(array: np.ndarray | None) -> np.ndarray | None:
        return array[:, 0] if squeeze and array is not None else array

    cams = tuple(shaped(r.cam) for r in results)
    target = capture.target
    names = explainer.layer_names
    # guided-backprop with layer=None/"auto" runs no capture, so no layer is ever chosen: it
    # reads none, and says so with an empty tuple.
    layer: str | tuple[str, ...] = names[0] if explainer.single_layer and names else names
    return Explanation(
        heatmap=shaped(heatmap),  # type: ignore[arg-type]
        cam=cams[0],  # type: ignore[arg-type]
        cams=cams,  # type: ignore[arg-type]
        weights=shaped(results[0].weights),
        scores=shaped(capture.scores),  # type: ignore[arg-type]
        target=shaped(target),
        layer=layer,
        method=explainer.method,
        attribution=shaped(attribution),
    )


def float32(array: np.ndarray) -> np.ndarray:
    """Returns ``array`` as contiguous float32, values beyond float32's range clipped to it."""
    limit = np.finfo(np.float32).max
    return np.ascontiguousarray(np.clip(array, -limit, limit), dtype=np.float32)
